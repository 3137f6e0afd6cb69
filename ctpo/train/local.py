"""The CPU toy RL trainer (train.backend = local), structured as the paper's verl runs.

One RL step (`train_step` -> `rl_step`):
  1. draw `prompts_per_step` prompts (`draw_prompts`: seeded per-epoch permutation; the cursor is
     checkpointed) and run `rollout.n` episodes per prompt through the real agent loop and sandbox
     (`sample_episodes`), sampling with a per-step seed;
  2. reward each episode (`score_episodes`); void-turn / infra episodes are masked out (`pack_kept`);
     group-relative advantages (`step_advantages`: verl's compute_grpo_outcome_advantage);
  3. old_log_prob: one no-grad forward of the behaviour policy over the whole batch (as verl recomputes it);
     rollout-vs-trainer IS weights from the generator's log-probs (`rollout_is_weights`, `train.rollout_is`:
     verl's compute_rollout_correction_weights);
  4. `prompts_per_step / mini_batch_prompts` AdamW mini-batch updates (grad clip `train.grad_clip`) with
     `ctpo.losses.compute_policy_loss` (the method is `loss.method`; verl's agg_loss), so from the second
     mini-batch on the policy has moved and the ratios differ from 1 (`update_policy`); the row (`metrics_row`).

Outputs: `<results>/metrics.jsonl` (ctpo.schema.TRAIN_KEYS per step, val/<bench>/avg_at_k at test_freq and
the final step), `<results>/provenance.json`, `<workdir>/checkpoints/step{N}/` (step 0 = the init policy,
every save_freq, the final step), `<workdir>/rollouts/step{N}.npz` at train.dump_steps, and
`<results>/done.json` last. Resume: a restarted run continues from its newest checkpoint (weights,
optimizer, RNG, data cursor, metrics rows). Preemption: SIGTERM / SIGUSR1 finish the current step, save a
checkpoint and exit with EXIT_PREEMPTED (75, EX_TEMPFAIL) and no done.json, so a requeued job resumes.
Fault injection: with CTPO_PAUSE_AFTER_STEP=N in the environment the trainer, after step N is recorded (and
saved when due), writes `<workdir>/paused_after_step{N}` and waits for a signal, so a test can kill or
preempt it at a known step on a machine of any speed (`pause_after_step`).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctpo import layout, schema
from ctpo.config import RunConfig, effective_batch_sizes
from ctpo.exitcodes import EXIT_PREEMPTED  # 75: checkpoint saved on SIGTERM / SIGUSR1, run not done; rerun resumes
from ctpo.io import write_text
from ctpo.progress import Progress
from ctpo.train.rollout_batch import pack_episodes, response_log_probs

PAUSE_ENV = "CTPO_PAUSE_AFTER_STEP"
def step_seed(seed: int, step: int) -> int:
    """The sampling seed of RL step `step` (a resumed run samples exactly what it would have)."""
    return (seed * 1_000_003 + step) % (2**31 - 1)


def draw_prompts(n_prompts: int, consumed: int, count: int, seed: int) -> list[int]:
    """Indices of the next `count` prompts after `consumed` in the epoch-wise shuffled order: epoch e is
    a permutation drawn from (seed, e), so the order is a pure function of the cursor (epoch boundaries
    included: a cursor at the end of an epoch continues with the next epoch's permutation)."""
    out = []
    while len(out) < count:
        epoch, pos = divmod(consumed, n_prompts)
        perm = np.random.default_rng([seed, epoch]).permutation(n_prompts)
        take = min(count - len(out), n_prompts - pos)
        out.extend(int(i) for i in perm[pos : pos + take])
        consumed += take
    return out


def rollout_is_weights(old_log_prob, rollout_log_prob, mask, mode: str | None, threshold: float):
    """Truncated rollout-vs-trainer IS weights (B, T), verl's `compute_rollout_correction_weights` (per token
    min(exp(old - rollout), thr), or per sequence min(exp(sum_t (old - rollout)), thr); log ratios clamped to
    +-20 first); None when off. old_log_prob, rollout_log_prob, mask: (B, T)."""
    if mode is None:
        return None
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    weights, _ = compute_rollout_correction_weights(old_log_prob - rollout_log_prob, mask, rollout_is=mode,
                                                    rollout_is_threshold=threshold)
    return weights


@dataclass
class StepResult:
    """One RL step: its metrics row and, for dumps and tests, the tensors the loss saw."""

    row: dict
    old_log_prob: torch.Tensor  # (B, T) behaviour policy
    log_prob: torch.Tensor  # (B, T) policy at each row's mini-batch update
    response_mask: torch.Tensor  # (B, T) after void / infra masking
    advantages: torch.Tensor  # (B,) sequence advantages
    minibatch_abs_log_ratio: list[float] = field(default_factory=list)  # max |log r_t| per mini-batch
    update_s: float = 0.0  # seconds in the mini-batch updates (forward, loss, backward, AdamW)


def rl_step(model, optimizer, tokenizer, cfg: RunConfig, questions, truths, indices, step: int, sandbox) -> StepResult:
    """Rollout, advantages, old_log_prob, and the mini-batch updates of one RL step (module docstring)."""
    t0 = time.time()
    t, r = cfg.train, cfg.rollout
    qs = [questions[i] for i in indices for _ in range(r.n)]  # rows i*n .. i*n+n-1 share a prompt
    gts = [truths[i] for i in indices for _ in range(r.n)]
    episodes = sample_episodes(model, tokenizer, cfg, qs, step, sandbox)
    rewards = score_episodes(episodes, gts, cfg.reward.grader)
    batch, keep = pack_kept(episodes, tokenizer.pad_token_id)
    mask = batch.response_mask  # (B, T)
    adv = step_advantages(rewards, episodes, mask, r.n, t.norm_adv_by_std)  # (B, T)
    adv_seq = (adv * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
    with torch.no_grad():
        old_log_prob, _ = response_log_probs(model, batch, r.temperature, with_entropy=False)  # (B, T)
    is_w = rollout_is_weights(old_log_prob, batch.rollout_log_prob, mask, t.rollout_is, t.rollout_is_threshold)
    upd = update_policy(model, optimizer, batch, old_log_prob, adv, is_w, cfg)
    row = metrics_row(step, episodes, rewards, keep, upd)
    row[schema.STEP_TIME_S] = time.time() - t0
    return StepResult(row, old_log_prob, upd.log_prob, mask, adv_seq, upd.minibatch_abs_log_ratio, upd.seconds)


def sample_episodes(model, tokenizer, cfg: RunConfig, questions: list[str], step: int, sandbox) -> list:
    """Step 1: one episode per question through the agent loop and sandbox, sampled with the step's seed."""
    from ctpo.agent import HFGenerator, SamplingParams, run_episodes

    r = cfg.rollout
    params = SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_response_tokens,
                            seed=step_seed(cfg.seed, step))
    model.eval()
    return run_episodes(HFGenerator(model, tokenizer), tokenizer, questions, r, params, sandbox=sandbox)


def score_episodes(episodes, truths: list[str], grader: str) -> torch.Tensor:
    """(B,) float32 rewards: `reward.grader`'s score (ctpo.grading) of each response against its ground truth."""
    from ctpo.grading import score_fn

    score = score_fn(grader)
    return torch.tensor([score(e.graded_text, gt).score for e, gt in zip(episodes, truths)], dtype=torch.float32)


def pack_kept(episodes, pad_id: int):
    """(PackedBatch whose response_mask (B, T) is 0 on void-turn and infra episodes, keep (B,) float 1/0)."""
    keep = torch.tensor([e.finish_reason not in ("void", "infra") for e in episodes], dtype=torch.float32)
    batch = pack_episodes(episodes, pad_id)
    batch.response_mask = batch.response_mask * keep[:, None]  # (B, T)
    return batch, keep


def step_advantages(rewards, episodes, mask, n: int, norm_by_std: bool) -> torch.Tensor:
    """(B, T) group-relative advantages, verl's `compute_grpo_outcome_advantage` (A_i = (R_i - mean) / (std + 1e-6)
    over the group, unbiased std; a group of one gets A = R), on model tokens. Rows i*n .. i*n+n-1 form a group;
    an infra episode is a group of its own (the sandbox failed, so it says nothing about the prompt).
    rewards (B,); mask (B, T)."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    groups = np.array([str(i // n) if e.finish_reason != "infra" else f"infra{i}" for i, e in enumerate(episodes)],
                      dtype=object)
    # one scalar reward per response: verl sums token_level_rewards over its last dim, (B, 1) here
    adv, _ = compute_grpo_outcome_advantage(rewards.float()[:, None], mask.float(), groups,
                                            norm_adv_by_std_in_grpo=norm_by_std)
    return adv  # (B, T)


@dataclass
class UpdateStats:
    """What the mini-batch updates of one step measured."""

    log_prob: torch.Tensor  # (B, T) policy at each row's mini-batch update
    grad_norms: list[float]
    pg_losses: list[float]
    minibatch_abs_log_ratio: list[float]  # max |log r_t| per mini-batch
    entropy: float  # token mean over model tokens
    loss_metrics: dict[str, list[float]]  # per mini-batch
    seconds: float


def update_policy(model, optimizer, batch, old_log_prob, adv, is_w, cfg: RunConfig) -> UpdateStats:
    """Step 4: `prompts_per_step / mini_batch_prompts` AdamW updates with `compute_policy_loss`, in row order."""
    from ctpo.losses import compute_policy_loss

    t, r = cfg.train, cfg.rollout
    model.train()
    t0 = time.time()
    mask, mb = batch.response_mask, t.mini_batch_prompts * r.n
    new_log_prob = torch.zeros_like(old_log_prob)
    loss_metrics: dict[str, list[float]] = {}
    grad_norms, pg_losses, mb_abs = [], [], []
    ent_sum, ent_n = 0.0, 0.0
    for start in range(0, mask.shape[0], mb):
        rows = slice(start, start + mb)
        log_prob, entropy = response_log_probs(model, batch.select(rows), r.temperature, with_entropy=True)
        m = mask[rows]
        # seq-mean modes average over every response of the mini-batch, one without model tokens included (as
        # verl 0.9.1's global_batch_size and the release's 1/accumulation do)
        loss, metrics = compute_policy_loss(old_log_prob[rows], log_prob, adv[rows], m, cfg.loss,
                                            rollout_is_weights=None if is_w is None else is_w[rows],
                                            global_batch_size=m.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)))
        optimizer.step()
        pg_losses.append(float(loss.detach()))
        new_log_prob[rows] = log_prob.detach()
        mb_abs.append(float(((log_prob.detach() - old_log_prob[rows]).abs() * m).max()) if m.any() else 0.0)
        ent_sum += float((entropy.detach() * m).sum())
        ent_n += float(m.sum())
        for k, v in metrics.items():
            loss_metrics.setdefault(k, []).append(float(v))
    return UpdateStats(new_log_prob, grad_norms, pg_losses, mb_abs, ent_sum / max(ent_n, 1.0), loss_metrics,
                       time.time() - t0)


def metrics_row(step: int, episodes, rewards, keep, upd: UpdateStats) -> dict:
    """The step's metrics row: every ctpo.schema.TRAIN_KEYS key but time/step_s (the caller's clock)."""
    kept = keep.bool()
    row = {
        schema.STEP: step,
        schema.REWARD_MEAN: float(rewards[kept].mean()) if kept.any() else 0.0,
        schema.ACCURACY: float((rewards[kept] == 1.0).float().mean()) if kept.any() else 0.0,
        schema.RESPONSE_LENGTH: float(np.mean([len(e.response_ids) for e in episodes])),
        schema.MODEL_TOKENS: float(np.mean([sum(e.response_mask) for e in episodes])),
        schema.TURNS: float(np.mean([e.turns for e in episodes])),
        schema.TOOL_CALLS: float(np.mean([e.tool_calls for e in episodes])),
        schema.ENTROPY: upd.entropy,
        schema.GRAD_NORM: float(np.mean(upd.grad_norms)),
        schema.PG_LOSS: float(np.mean(upd.pg_losses)),
    }
    for k, vals in upd.loss_metrics.items():
        row[k] = float(np.max(vals)) if k == schema.LOG_RATIO_ABS_MAX else float(np.mean(vals))
    missing = [k for k in schema.TRAIN_KEYS if k not in row and k != schema.STEP_TIME_S]
    if missing:
        raise RuntimeError(f"rl_step: metrics row lacks {missing} (ctpo.schema.TRAIN_KEYS)")
    return row


def validate(model, tokenizer, cfg: RunConfig, step: int, sandbox) -> dict:
    """val/<bench>/avg_at_k on each `data.val` file: eval.k samples per problem at eval.temperature
    (capped at eval.max_problems problems), with a seed that does not touch the training RNG stream."""
    from ctpo.agent import HFGenerator, SamplingParams, run_episodes
    from ctpo.data.problems import read_questions
    from ctpo.grading import score_fn

    score = score_fn(cfg.reward.grader)
    out = {}
    for path in cfg.data.val:
        questions, truths = read_questions(path)
        if cfg.eval.max_problems is not None:
            questions, truths = questions[: cfg.eval.max_problems], truths[: cfg.eval.max_problems]
        k = cfg.eval.k
        params = SamplingParams(temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                                max_new_tokens=cfg.rollout.max_response_tokens, seed=step_seed(cfg.seed + 7919, step))
        qs = [q for q in questions for _ in range(k)]
        eps = run_episodes(HFGenerator(model, tokenizer), tokenizer, qs, cfg.rollout, params, sandbox=sandbox)
        correct = [score(e.graded_text, truths[i // k]).score == 1.0 for i, e in enumerate(eps)]
        out[f"{schema.VAL_PREFIX}{Path(path).stem}/avg_at_k"] = float(np.mean(correct))
    return out


def write_dump(workdir: Path, step: int, res: StepResult) -> Path:
    """`<workdir>/rollouts/step{N}.npz` with ctpo.schema.ROLLOUT_ARRAYS."""
    from ctpo.diagnostics import dump

    return dump.save(layout.workdir(workdir).path("rollout", step=step), {
        "old_log_prob": res.old_log_prob.numpy().astype(np.float32),
        "log_prob": res.log_prob.numpy().astype(np.float32),
        "response_mask": res.response_mask.numpy().astype(np.int8),
        "advantages": res.advantages.numpy().astype(np.float32),
    })


class _StopFlag:
    """Set by SIGTERM / SIGUSR1: finish the current step, checkpoint, exit EXIT_PREEMPTED."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = {}

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGUSR1):
            self._old[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        print(f"train: got signal {signum}; checkpointing after this step", file=sys.stderr, flush=True)


def pause_after_step(step: int, stop: _StopFlag, workdir: Path) -> None:
    """When $CTPO_PAUSE_AFTER_STEP == step: write `<workdir>/paused_after_step{step}`, then block until a
    signal (SIGTERM/SIGUSR1 set `stop`; SIGINT raises KeyboardInterrupt; SIGKILL ends the process)."""
    if os.environ.get(PAUSE_ENV) != str(step):
        return
    print(f"train: paused after step {step} ({PAUSE_ENV}); waiting for a signal", flush=True)
    write_text(workdir / f"paused_after_step{step}", f"{os.getpid()}\n")
    while stop.signum is None:
        time.sleep(0.2)


def train_step(run, step: int) -> dict:
    """RL step `step` of a `trainer_setup.Run`: the next prompts, `rl_step`, validation at test_freq and the
    last step, the rollout dump at a dump step; the row is recorded (metrics.jsonl, W&B) and returned."""
    cfg = run.cfg
    idx = draw_prompts(len(run.questions), run.consumed, cfg.train.prompts_per_step, cfg.seed)
    res = rl_step(run.model, run.optimizer, run.tokenizer, cfg, run.questions, run.truths, idx, step, run.sandbox)
    run.consumed += len(idx)
    row = dict(res.row)
    if step % cfg.train.test_freq == 0 or step == cfg.train.total_steps:
        row.update(validate(run.model, run.tokenizer, cfg, step, run.sandbox))
    if step in cfg.train.dump_steps:
        write_dump(run.workdir, step, res)
    run.record(row)
    return row


def main(cfg: RunConfig, results_dir: str | Path, workdir: str | Path, init: str | Path | None) -> int:
    """Train (or resume, or return at once when done). Returns 0 when done, EXIT_PREEMPTED on a signal."""
    from ctpo.train.trainer_setup import Run

    results_dir, workdir = Path(results_dir), Path(workdir)
    done_path = layout.train_dir(results_dir).path("train_done")
    if done_path.is_file() and layout.read_done(done_path).final_step == cfg.train.total_steps:
        print(f"train: {done_path} says the run is done ({cfg.train.total_steps} steps); nothing to do")
        return 0
    sizes = effective_batch_sizes(cfg)
    print("train: effective batch sizes " + ", ".join(f"{k}={v}" for k, v in sizes.items()), flush=True)
    run = Run.open(cfg, results_dir, workdir, init)
    stop = _StopFlag()
    stop.install()
    clock = Progress(cfg.train.total_steps, start=run.step)
    try:
        for step in range(run.step + 1, cfg.train.total_steps + 1):
            row = train_step(run, step)
            print(f"train: {clock.line(step)} " + " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in row.items()), flush=True)
            if layout.is_saved_step(step, cfg.train.total_steps, cfg.train.save_freq) or stop.signum is not None:
                run.save(step)
            pause_after_step(step, stop, workdir)
            if stop.signum is not None and step < cfg.train.total_steps:
                run.save(step)  # a no-op when saved above; a signal during the pause saves here
                run.close(exit_code=EXIT_PREEMPTED)
                print(f"train: preempted at step {step}; checkpoint saved, rerun to resume", file=sys.stderr)
                return EXIT_PREEMPTED
        run.finish(done_path)
    finally:
        stop.restore()
        run.close()
    return 0
