"""The local trainer's run state: data, policy, optimizer, sandbox, tracking, and their persistence
(fresh start from the init policy, or resume from the newest checkpoint; metrics rows; done marker)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ctpo.config import ConfigError, RunConfig, effective_batch_sizes
from ctpo.io import write_json, write_text
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


class Run:
    """Everything one local training run holds between steps."""

    def __init__(self, cfg: RunConfig, cfg_dict: dict, results_dir: Path, workdir: Path) -> None:
        self.cfg, self.cfg_dict = cfg, cfg_dict
        self.results_dir, self.workdir = results_dir, workdir
        self.metrics_path = results_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        self.step = 0
        self.consumed = 0
        self.last_saved: int | None = None
        self.tracker = None
        self.sandbox = None

    @classmethod
    def open(cls, cfg: RunConfig, results_dir: Path, workdir: Path, init: str | Path | None) -> "Run":
        from ctpo.agent import load_policy
        from ctpo.data.problems import read_questions
        from ctpo.provenance import provenance
        from ctpo.sandbox import SandboxPool
        from ctpo.tracking import start_tracking

        run = cls(cfg, dataclasses.asdict(cfg), results_dir, workdir)
        run.questions, run.truths = read_questions(cfg.data.train)
        if cfg.train.prompts_per_step > len(run.questions):
            raise ConfigError(
                f"train.prompts_per_step ({cfg.train.prompts_per_step}) exceeds the {len(run.questions)} prompts "
                f"in data.train ({cfg.data.train})"
            )
        seed_everything(cfg.seed)
        claim(workdir, run.cfg_dict)  # a changed config sets the old checkpoints aside and starts fresh
        fingerprint, ident = run_identity(run.cfg_dict)
        steps = ckpt.list_checkpoints(workdir)
        if steps:
            run.step = steps[-1]
            state = ckpt.load_trainer_state(workdir, run.step)
            if state.fingerprint != fingerprint:
                _, old_ident = run_identity(state.config)
                raise ConfigError(
                    f"{ckpt.checkpoint_dir(workdir, run.step)}: written by a different run config (keys differ: "
                    f"{_diff_keys(old_ident, ident)}); use a new workdir or restore the config"
                )
            run.model, run.tokenizer = load_policy(str(ckpt.checkpoint_dir(workdir, run.step) / ckpt.POLICY_DIR),
                                                   dtype=cfg.model.dtype)
            run.optimizer = run._new_optimizer()
            if state.optimizer is not None:
                run.optimizer.load_state_dict(state.optimizer)
            ckpt.restore_rng(state.rng)
            run.consumed = state.consumed_prompts
            run.rows = [r for r in state.metrics_rows if r["step"] <= run.step]
            run.last_saved = run.step
            print(f"train: resuming from {ckpt.checkpoint_dir(workdir, run.step)} (step {run.step})", flush=True)
        else:
            if init is None:
                raise ConfigError("train.backend=local: --init <policy dir> (the SFT warm start) is required "
                                  f"to start a run (no checkpoint under {workdir}/checkpoints)")
            run.model, run.tokenizer = load_policy(str(init), dtype=cfg.model.dtype)
            run.optimizer = run._new_optimizer()
        # the metrics file holds exactly the rows up to the resume step (later rows were not checkpointed)
        results_dir.mkdir(parents=True, exist_ok=True)
        write_text(run.metrics_path, "")
        from ctpo.io import append_jsonl

        append_jsonl(run.metrics_path, run.rows)
        (results_dir / "done.json").unlink(missing_ok=True)  # stale marker of a shorter schedule
        if not steps:
            run.save(0)  # step 0 = the init policy
        rec = provenance(run.cfg_dict)
        rec.update({
            "effective_batch_sizes": effective_batch_sizes(cfg),
            "seeds": {"python": cfg.seed, "numpy": cfg.seed, "torch": cfg.seed,
                      "sampling": "step_seed(seed, step) = (seed * 1000003 + step) mod (2^31 - 1)",
                      "data_order": "numpy default_rng([seed, epoch]).permutation(n_train)"},
            "init_policy": None if init is None else str(init),
            "resumed_from_step": run.step if steps else None,
            "torch_threads": torch.get_num_threads(),
        })
        write_json(results_dir / "provenance.json", rec)
        run.tracker = start_tracking(run.cfg_dict, workdir)
        run.sandbox = SandboxPool.for_rollout(cfg.rollout)
        return run

    def _new_optimizer(self):
        t = self.cfg.train
        return torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)

    def record(self, row: dict) -> None:
        """Append one step's row to metrics.jsonl (atomic rewrite) and to W&B."""
        from ctpo.io import append_jsonl

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
        dumps = sorted(int(p.stem.removeprefix("step")) for p in (self.workdir / "rollouts").glob("step*.npz"))
        record = {
            "final_step": self.step,
            "saved_steps": ckpt.list_checkpoints(self.workdir),
            "dump_steps": dumps,
            "wandb_run_id": self.tracker.run_id,
            "wandb_mode": self.tracker.mode,
            "checkpoints": str(self.workdir / "checkpoints"),
            "final": {k: v for k, v in self.rows[-1].items()} if self.rows else {},
        }
        self.close()
        write_json(done_path, record)

    def close(self, exit_code: int = 0) -> None:
        if self.tracker is not None:
            self.tracker.finish(exit_code=exit_code)
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None

