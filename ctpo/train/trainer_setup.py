"""The local trainer's run state: data, policy, optimizer, sandbox, tracking, and their persistence
(fresh start from the init policy, or resume from the newest checkpoint; metrics rows; done marker)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ctpo import layout
from ctpo.config import ConfigError, RunConfig, config_hash, effective_batch_sizes
from ctpo.io import append_jsonl, write_json, write_text
from ctpo.run_health import DEGENERATE_KEY, degenerate_reward
from ctpo.train import checkpoint as ckpt
from ctpo.seeding import seed_everything
from ctpo.workdir import claim, run_identity


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def read_train_prompts(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """(questions, ground truths) of `data.train`; a step's `train.prompts_per_step` must fit in them."""
    from ctpo.data.problems import read_questions

    questions, truths = read_questions(cfg.data.train)
    if cfg.train.prompts_per_step > len(questions):
        raise ConfigError(
            f"train.prompts_per_step ({cfg.train.prompts_per_step}) exceeds the {len(questions)} prompts "
            f"in data.train ({cfg.data.train})"
        )
    return questions, truths


def check_same_identity(fingerprint: str, written_by: dict, cfg_dict: dict, where: Path) -> None:
    """A checkpoint at `where` (its identity `fingerprint`, written under config `written_by`) belongs to
    this run config's identity; else ConfigError naming the keys that differ."""
    this, ident = run_identity(cfg_dict)
    if fingerprint != this:
        _, old_ident = run_identity(written_by)
        raise ConfigError(
            f"{where}: written by a different run config (keys differ: "
            f"{_diff_keys(old_ident, ident)}); use a new workdir or restore the config"
        )


class Run:
    """Everything one local training run holds between steps."""

    def __init__(self, cfg: RunConfig, cfg_dict: dict, results_dir: Path, workdir: Path) -> None:
        self.cfg, self.cfg_dict = cfg, cfg_dict
        self.results_dir, self.workdir = results_dir, workdir
        self.metrics_path = layout.train_dir(results_dir).path("metrics")
        self.rows: list[dict] = []
        self.step = 0
        self.consumed = 0
        self.last_saved: int | None = None
        self.tracker = None
        self.sandbox = None

    @classmethod
    def open(cls, cfg: RunConfig, results_dir: Path, workdir: Path, init: str | Path | None) -> "Run":
        """Data, seeds, the workdir claim, the policy (resumed from the newest checkpoint, else `init`), the
        metrics file, provenance, W&B and the sandbox pool, in that order."""
        from ctpo.sandbox import SandboxPool
        from ctpo.tracking import start_tracking

        run = cls(cfg, dataclasses.asdict(cfg), results_dir, workdir)
        run.questions, run.truths = read_train_prompts(cfg)
        seed_everything(cfg.seed)
        claim(workdir, run.cfg_dict)  # a changed config sets the old checkpoints aside and starts fresh
        steps = ckpt.list_checkpoints(workdir)
        if steps:
            run._resume(steps[-1])
        else:
            run._start_fresh(init)
        run._reset_results()
        if not steps:
            run.save(0)  # step 0 = the init policy
        write_json(layout.train_dir(results_dir).path("provenance"), run._provenance(init, resumed=bool(steps)))
        run.tracker = start_tracking(run.cfg_dict, workdir)
        run.sandbox = SandboxPool.for_rollout(cfg.rollout)
        return run

    def _resume(self, step: int) -> None:
        """Weights, optimizer, RNG, data cursor and metrics rows of checkpoint `step` (same run identity)."""
        from ctpo.agent import load_policy

        self.step = step
        where = ckpt.checkpoint_dir(self.workdir, step)
        state = ckpt.load_trainer_state(self.workdir, step)
        check_same_identity(state.fingerprint, state.config, self.cfg_dict, where)
        self.model, self.tokenizer = load_policy(str(where / ckpt.POLICY_DIR), dtype=self.cfg.model.dtype)
        self.optimizer = self._new_optimizer()
        if state.optimizer is not None:
            self.optimizer.load_state_dict(state.optimizer)
        ckpt.restore_rng(state.rng)
        self.consumed = state.consumed_prompts
        self.rows = [r for r in state.metrics_rows if r["step"] <= step]
        self.last_saved = step
        print(f"train: resuming from {where} (step {step})", flush=True)

    def _start_fresh(self, init: str | Path | None) -> None:
        """The policy from `init` (the SFT warm start) and a new optimizer."""
        from ctpo.agent import load_policy

        if init is None:
            raise ConfigError("train.backend=local: --init <policy dir> (the SFT warm start) is required "
                              f"to start a run (no checkpoint under {layout.workdir(self.workdir).path('checkpoints')})")
        self.model, self.tokenizer = load_policy(str(init), dtype=self.cfg.model.dtype)
        self.optimizer = self._new_optimizer()

    def _reset_results(self) -> None:
        """metrics.jsonl holds exactly the rows up to the resume step (later rows were not checkpointed);
        a done.json left by an earlier, shorter schedule goes."""
        self.results_dir.mkdir(parents=True, exist_ok=True)
        write_text(self.metrics_path, "")
        append_jsonl(self.metrics_path, self.rows)
        layout.train_dir(self.results_dir).path("train_done").unlink(missing_ok=True)

    def _provenance(self, init: str | Path | None, resumed: bool) -> dict:
        """provenance.json: `ctpo.provenance` plus batch sizes, seeding rules, init policy, resume step."""
        from ctpo.provenance import provenance

        cfg = self.cfg
        rec = provenance(self.cfg_dict)
        rec.update({
            "effective_batch_sizes": effective_batch_sizes(cfg),
            "seeds": {"python": cfg.seed, "numpy": cfg.seed, "torch": cfg.seed,
                      "sampling": "step_seed(seed, step) = (seed * 1000003 + step) mod (2^31 - 1)",
                      "data_order": "numpy default_rng([seed, epoch]).permutation(n_train)"},
            "init_policy": None if init is None else str(init),
            "resumed_from_step": self.step if resumed else None,
            "torch_threads": torch.get_num_threads(),
        })
        return rec

    def _new_optimizer(self):
        t = self.cfg.train
        return torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)

    def record(self, row: dict) -> None:
        """Append one step's row to metrics.jsonl (atomic rewrite) and to W&B."""
        self.rows.append(row)
        self.step = row["step"]
        append_jsonl(self.metrics_path, [row])
        self.tracker.log(row, step=row["step"])

    def save(self, step: int) -> None:
        if self.last_saved == step:
            return
        fingerprint, _ = run_identity(self.cfg_dict)
        state = ckpt.TrainerState(
            step=step, consumed_prompts=self.consumed,
            optimizer=self.optimizer.state_dict() if step > 0 else None,
            rng=ckpt.capture_rng(), fingerprint=fingerprint, config=self.cfg_dict, metrics_rows=list(self.rows),
        )
        ckpt.save_checkpoint(self.workdir, self.model, self.tokenizer, state)
        self.last_saved = step

    def finish(self, done_path: Path) -> None:
        """Write done.json (last) and close the W&B run."""
        wd, c = layout.workdir(self.workdir), self.cfg
        record = layout.TrainDone(
            experiment=c.experiment, run=c.run, seed=c.seed, backend="local", final_step=self.step,
            total_steps=c.train.total_steps, saved_steps=ckpt.list_checkpoints(self.workdir),
            dump_steps=layout.dumped_steps(self.workdir), metrics_rows=len(self.rows),
            wandb_run_id=self.tracker.run_id, config_hash=config_hash(self.cfg_dict),
            checkpoints=str(wd.path("checkpoints")), wandb_mode=self.tracker.mode,
            final=dict(self.rows[-1]) if self.rows else {}, degenerate=degenerate_reward(self.rows),
        )
        if record.degenerate:
            print(f"train: WARNING {c.run} seed {c.seed} learned nothing: {record.degenerate}", flush=True)
            self.tracker.summarize({DEGENERATE_KEY: record.degenerate})
        self.close()
        layout.write_done(done_path, record)

    def close(self, exit_code: int = 0) -> None:
        if self.tracker is not None:
            self.tracker.finish(exit_code=exit_code)
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None

