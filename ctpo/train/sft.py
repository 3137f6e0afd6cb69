"""Toy warm start: a short SFT of the tiny Qwen3 model on generated tool-use demonstrations.

    python -m ctpo.train.sft --config results/toy/configs/toy_grpo/seed0.json \\
        --out runs/toy/sft/seed0 [--done runs/toy/sft/seed0/done.json]

A demonstration is built with the agent's own turn logic (`ctpo.agent.turns.EpisodeState`), so its
tokens are exactly what a rollout of the same behaviour would hold: prompt, a model turn printing the
expression in a fenced Python block, the sandbox observation (mask 0, never trained on), and a model
turn with the boxed answer and EOS. Loss: cross-entropy on model tokens only. The warm start is then
scored through the real agent loop and sandbox at the rollout temperature on the held-out set
(`data.val[0]`); that accuracy goes into the done marker, which is written last. A warm start whose
accuracy lands outside `sft.accuracy_band` writes no done marker and exits EXIT_PERMANENT (78) with one line
naming the seed and the accuracy, so a seed that did not learn never reaches RL. Idempotent: if the done
marker exists, exit at once.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ctpo import layout
from ctpo.config import RunConfig, load_run_config
from ctpo.data.problems import read_questions
from ctpo.data.toy_task import Problem, demo_turns, sample_problems
from ctpo.exitcodes import PermanentError, fail_permanent
from ctpo.io import read_json, write_json
from ctpo.seeding import seed_everything


def noisy_answer(answer_turn: str, noise: float, rng: random.Random) -> str:
    """Replace each digit of `answer_turn` by a different random digit with probability `noise`."""
    return "".join(
        rng.choice([d for d in "0123456789" if d != c]) if c.isdigit() and rng.random() < noise else c
        for c in answer_turn
    )


def demo_example(problem: Problem, tokenizer, cfg: RunConfig, rng: random.Random) -> tuple[list[int], list[int]]:
    """(input ids, loss mask) of one demonstration; mask 1 on model tokens, 0 on prompt / observation.
    The boxed answer carries copy errors at rate `sft.answer_digit_noise` (drawn from `rng`)."""
    from ctpo.agent.template import load_template, render_prompt
    from ctpo.agent.turns import EpisodeState
    from ctpo.sandbox import ExecResult

    template = load_template(cfg.rollout.template)
    prompt_ids = tokenizer.encode(render_prompt(problem.question, cfg.rollout.template, cfg.rollout.enable_thinking))
    code_turn, answer_turn = demo_turns(problem)
    ep = EpisodeState.from_rollout_config(prompt_ids, cfg.rollout)
    code_ids = tokenizer.encode(code_turn)
    if ep.add_model_turn(code_ids, [0.0] * len(code_ids), "stop", code_turn) is None:
        raise RuntimeError(f"demo code turn for '{problem.expression}' was not recognised as code")
    result = ExecResult(stdout=f"{problem.answer}\n", stderr="", exit_code=0, timed_out=False, truncated=False,
                        wall_s=0.0, status="ok")  # what the sandbox returns for print(expression)
    ep.add_tool_result(result, template, tokenizer.encode, tokenizer.encode_plain)
    answer_turn = noisy_answer(answer_turn, cfg.sft.answer_digit_noise, rng)
    answer_ids = tokenizer.encode(answer_turn) + [tokenizer.eos_token_id]
    ep.add_model_turn(answer_ids, [0.0] * len(answer_ids), "eos", answer_turn)
    if ep.finish_reason != "answer":
        raise RuntimeError(f"demo for '{problem.expression}' does not fit the rollout budget ({ep.finish_reason})")
    return prompt_ids + ep.response_ids, [0] * len(prompt_ids) + ep.response_mask


def demo_problems(cfg: RunConfig) -> list[Problem]:
    """`sft.n_demos` training-distribution problems, none of them in the validation sets."""
    held_out = set()
    for path in cfg.data.val:
        questions, _ = read_questions(path)
        held_out |= {q.removeprefix("Compute ").removesuffix(".") for q in questions}
    return sample_problems(cfg.sft.n_demos, "toy_arith", seed=cfg.seed + 10_000, exclude=held_out)


def _pad(batch: list[tuple[list[int], list[int]]], pad_id: int):
    L = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.float32)
    attn = torch.zeros((len(batch), L), dtype=torch.long)
    for b, (x, m) in enumerate(batch):
        ids[b, : len(x)] = torch.as_tensor(x)
        mask[b, : len(m)] = torch.as_tensor(m, dtype=torch.float32)
        attn[b, : len(x)] = 1
    return ids, mask, attn


def sft_train(model, examples: list[tuple[list[int], list[int]]], cfg: RunConfig, pad_id: int) -> list[float]:
    """`sft.steps` AdamW steps of masked next-token cross-entropy (batches drawn by a seeded generator,
    linear warm-up over the first 10% then cosine decay); returns the loss per step."""
    sft = cfg.sft
    gen = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=sft.lr, weight_decay=0.0)
    warm = max(1, sft.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, sft.steps) / sft.steps))
    )
    model.train()
    losses = []
    for _ in range(sft.steps):
        rows = gen.choice(len(examples), size=sft.batch_size, replace=False)
        ids, mask, attn = _pad([examples[i] for i in rows], pad_id)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]  # (B, L-1, V)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, L-1)
        m = mask[:, 1:]
        loss = (nll * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def measure_accuracy(model, tokenizer, cfg: RunConfig, questions: list[str], truths: list[str]) -> float:
    """Fraction of `questions` answered correctly by one episode each through the real agent loop and
    sandbox, sampled at the rollout temperature (what RL starts from)."""
    from ctpo.agent import HFGenerator, SamplingParams, run_episodes
    from ctpo.grading import score_fn
    from ctpo.sandbox import SandboxPool

    score = score_fn(cfg.reward.grader)
    params = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
    with SandboxPool.for_rollout(cfg.rollout) as pool:
        episodes = run_episodes(HFGenerator(model, tokenizer), tokenizer, questions, cfg.rollout, params, sandbox=pool)
    return float(np.mean([score(e.graded_text, t).score == 1.0 for e, t in zip(episodes, truths)]))


def run_sft(cfg: RunConfig, out: Path, done: Path) -> dict:
    """Build, train, score and save the warm start; returns the done record."""
    from ctpo.tokenizer import CharTokenizer
    from ctpo.train.toy_model import build_toy_model, save_policy

    if not cfg.data.val:
        raise ValueError("data.val: the SFT warm start needs a held-out parquet to measure accuracy on")
    seed_everything(cfg.seed)
    t0 = time.time()
    tokenizer = CharTokenizer()
    model = build_toy_model(cfg.model, tokenizer, seed=cfg.seed)
    if not 0.0 <= cfg.sft.answer_digit_noise < 1.0:
        raise ValueError(f"sft.answer_digit_noise must be in [0, 1), got {cfg.sft.answer_digit_noise}")
    noise_rng = random.Random(cfg.seed)
    examples = [demo_example(p, tokenizer, cfg, noise_rng) for p in demo_problems(cfg)]
    if len(examples) < cfg.sft.batch_size:
        raise ValueError(f"sft.n_demos ({len(examples)}) must be at least sft.batch_size ({cfg.sft.batch_size})")
    losses = sft_train(model, examples, cfg, tokenizer.pad_token_id)
    train_s = time.time() - t0
    questions, truths = read_questions(cfg.data.val[0])
    if cfg.eval.max_problems is not None:
        questions, truths = questions[: cfg.eval.max_problems], truths[: cfg.eval.max_problems]
    seed_everything(cfg.seed)
    accuracy = measure_accuracy(model, tokenizer, cfg, questions, truths)
    save_policy(model, tokenizer, out / layout.POLICY)
    record = {
        "policy": str(out / layout.POLICY),
        "seed": cfg.seed,
        "sft": {"steps": cfg.sft.steps, "batch_size": cfg.sft.batch_size, "lr": cfg.sft.lr, "n_demos": cfg.sft.n_demos,
                "answer_digit_noise": cfg.sft.answer_digit_noise, "accuracy_band": list(cfg.sft.accuracy_band)},
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "accuracy": accuracy,
        "accuracy_set": str(cfg.data.val[0]),
        "accuracy_n": len(questions),
        "accuracy_temperature": cfg.rollout.temperature,
        "train_seconds": round(train_s, 2),
        "total_seconds": round(time.time() - t0, 2),
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    check_band(record, cfg)
    write_json(done, record)  # last: the marker means everything above exists
    return record


def check_band(record: dict, cfg: RunConfig) -> None:
    """Raise PermanentError (one line: seed, accuracy, band) when the warm start's accuracy is outside
    `sft.accuracy_band`; the policy stays on disk for inspection, the done marker is not written."""
    lo, hi = cfg.sft.accuracy_band
    acc, n = record["accuracy"], record["accuracy_n"]
    if not lo <= acc <= hi:
        raise PermanentError(
            f"sft: warm start seed {cfg.seed} reached held-out accuracy {acc:.3f} ({round(acc * n)}/{n}, loss "
            f"{record['loss_last']:.3f}), outside sft.accuracy_band [{lo:g}, {hi:g}] of experiment "
            f"'{cfg.experiment}': this seed's warm start did not land where RL can learn from it"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctpo.train.sft", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="resolved run config (.json)")
    ap.add_argument("--out", required=True, help="output dir, e.g. runs/toy/sft/seed0")
    ap.add_argument("--done", default=None, help="done marker (default <out>/done.json)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    done = Path(args.done) if args.done else out / "done.json"
    if done.is_file():
        print(f"sft: already done ({done}): accuracy {read_json(done)['accuracy']:.3f}")
        return 0
    cfg = load_run_config(args.config)
    if cfg.model.kind != "toy":
        raise SystemExit(f"{args.config}: the SFT warm start is for model.kind=toy (either train.backend)")
    try:
        rec = run_sft(cfg, out, done)
    except PermanentError as e:
        fail_permanent(str(e))
    print(f"sft: {cfg.sft.steps} steps, loss {rec['loss_first']:.3f} -> {rec['loss_last']:.3f}, "
          f"warm-start accuracy {rec['accuracy']:.3f} on {rec['accuracy_n']} held-out problems "
          f"(T={rec['accuracy_temperature']}), {rec['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
