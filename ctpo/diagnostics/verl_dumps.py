"""Rollout dumps of a verl run -> `runs/.../rollouts/step{N}.npz` (ctpo.schema.ROLLOUT_ARRAYS).

Here, beside the dump reader, and not under ctpo.train: the writing half runs inside verl's workers through
`ctpo.verl_plugin`, which the launcher (ctpo.train.verl_backend) imports, so neither may import the other's
package for it (tests/test_import_arrows.py).

verl's own `trainer.rollout_data_dir` writes decoded text, scores and ground truths per step (JSONL),
not log-probs, so the diagnostics cannot use it. The log-probs come from our loss instead: with
CTPO_DUMP_DIR and CTPO_DUMP_STEPS set (by `ctpo.train.verl_command.verl_command`), `ctpo.verl_plugin` writes, at each
dump step, one or more shards per rank

    $CTPO_DUMP_DIR/step{N}/<any name>.npz   arrays ROLLOUT_ARRAYS:
        old_log_prob, log_prob   float (n_i, T_i)   behaviour / current-policy log-probs of response tokens
        response_mask            int   (n_i, T_i)   1 = model token, 0 = observation or padding
        advantages               float (n_i,) or (n_i, T_i) (per-token, constant over a sequence)

`convert_dumps` pads the shards to a common T (mask 0) and concatenates them in shard-name order.

Writing side: `record(old_log_prob, log_prob, response_mask, advantages)` is what the plugin's loss
calls once per micro-batch (a no-op unless CTPO_DUMP_DIR is set). verl 0.9.1 passes no training step to
a policy loss, so the step is counted: the launcher sets CTPO_DUMP_START_STEP (first step of this
launch = last checkpointed step + 1) and CTPO_DUMP_CALLS_PER_STEP (loss calls per rank per step =
prompts_per_step * n / world_size / micro_batch_size_per_gpu * train.verl.ppo_epochs, exact with
use_dynamic_bsz=false; the paper runs one epoch). A step's calls are buffered and written as one shard per rank when
the step's last call arrives, so a step cut by preemption leaves no shard.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ctpo.diagnostics.dump import save
from ctpo.schema import ROLLOUT_ARRAYS


class DumpError(ValueError):
    """A malformed dump shard; the message names the file and the array."""


def _load_shard(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        missing = [k for k in ROLLOUT_ARRAYS if k not in z.files]
        if missing:
            raise DumpError(f"{path}: missing arrays {missing} (expected {list(ROLLOUT_ARRAYS)})")
        arr = {k: np.asarray(z[k]) for k in ROLLOUT_ARRAYS}
    shape = arr["response_mask"].shape
    if len(shape) != 2:
        raise DumpError(f"{path}: response_mask must be 2-D (n, T), got shape {shape}")
    for k in ("old_log_prob", "log_prob"):
        if arr[k].shape != shape:
            raise DumpError(f"{path}: {k} has shape {arr[k].shape}, expected {shape} like response_mask")
    adv = arr["advantages"]
    if adv.shape == shape:  # per-token advantages: take each sequence's value at its first model token
        mask = arr["response_mask"] != 0
        first = np.where(mask.any(axis=1), mask.argmax(axis=1), 0)
        adv = adv[np.arange(shape[0]), first] * mask.any(axis=1)
    elif adv.shape != (shape[0],):
        raise DumpError(f"{path}: advantages has shape {adv.shape}, expected ({shape[0]},) or {shape}")
    arr["advantages"] = adv
    return arr


def _pad_cat(parts: list[np.ndarray]) -> np.ndarray:
    """(n_i, T_i) arrays -> (sum n_i, max T_i), each right-padded with 0."""
    t_max = max(a.shape[1] for a in parts)
    return np.concatenate([np.pad(a, ((0, 0), (0, t_max - a.shape[1]))) for a in parts])


def merge_shards(paths: list[Path]) -> dict[str, np.ndarray]:
    """Shards -> one set of arrays: (N, T_max) right-padded with 0 (mask 0), advantages (N,)."""
    shards = [_load_shard(p) for p in sorted(paths)]
    if not shards:
        raise DumpError("no dump shards to merge")
    out = {key: _pad_cat([s[key].astype(dtype) for s in shards])
           for key, dtype in (("old_log_prob", np.float32), ("log_prob", np.float32), ("response_mask", np.int8))}
    out["advantages"] = np.concatenate([s["advantages"].astype(np.float32) for s in shards])
    return out


def convert_dumps(dump_dir: str | Path, out_dir: str | Path, steps: list[int]) -> list[int]:
    """Write `out_dir/step{N}.npz` for each requested step that has shards; returns the steps written."""
    dump_dir, out_dir = Path(dump_dir), Path(out_dir)
    written = []
    for step in steps:
        shards = sorted((dump_dir / f"step{step}").glob("*.npz"))
        if not shards:
            continue
        save(out_dir / f"step{step}.npz", merge_shards(shards))
        written.append(step)
    return written


# ----------------------------------------------------------------------------- writing (inside verl's workers)


class DumpWriter:
    """Buffers the loss inputs of the dump steps and writes `dump_dir/step{N}/rank{R}.npz` per finished step."""

    def __init__(self, dump_dir: str | Path, steps: list[int], start_step: int, calls_per_step: int, rank: str) -> None:
        if calls_per_step <= 0 or start_step <= 0:
            raise ValueError(f"CTPO_DUMP_CALLS_PER_STEP / CTPO_DUMP_START_STEP must be positive, got "
                             f"{calls_per_step} / {start_step}")
        self.dump_dir, self.steps, self.rank = Path(dump_dir), set(steps), rank
        self.start_step, self.calls_per_step = start_step, calls_per_step
        self.calls = 0
        self.buffer: list[dict[str, np.ndarray]] = []

    @property
    def step(self) -> int:
        """The training step of the next loss call."""
        return self.start_step + self.calls // self.calls_per_step

    def record(self, old_log_prob, log_prob, response_mask, advantages) -> None:
        """One micro-batch: tensors (n, T) (advantages (n, T) or (n,)); copied to host only at dump steps."""
        step = self.step
        if step in self.steps:
            def host(x):
                return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)

            self.buffer.append({"old_log_prob": host(old_log_prob), "log_prob": host(log_prob),
                                "response_mask": host(response_mask).astype(np.int8), "advantages": host(advantages)})
        self.calls += 1
        if self.calls % self.calls_per_step == 0 and self.buffer:
            self._flush(step)

    def _flush(self, step: int) -> None:
        arrays = {key: _pad_cat([b[key] for b in self.buffer]) for key in ("old_log_prob", "log_prob", "response_mask")}
        advs = [b["advantages"] for b in self.buffer]
        if all(a.ndim == 2 for a in advs):
            arrays["advantages"] = _pad_cat(advs)
        else:
            arrays["advantages"] = np.concatenate([a if a.ndim == 1 else a[:, 0] for a in advs])
        self.buffer = []
        save(self.dump_dir / f"step{step}" / f"rank{self.rank}.npz", arrays)


_WRITER: DumpWriter | None = None


def writer_from_env(env: dict | None = None) -> DumpWriter | None:
    """The process's writer when CTPO_DUMP_DIR is set (all four CTPO_DUMP_* variables are then required)."""
    env = os.environ if env is None else env
    if not env.get("CTPO_DUMP_DIR"):
        return None
    try:
        steps = [int(s) for s in env["CTPO_DUMP_STEPS"].split(",") if s.strip()]
        start, per_step = int(env["CTPO_DUMP_START_STEP"]), int(env["CTPO_DUMP_CALLS_PER_STEP"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"CTPO_DUMP_DIR is set, so CTPO_DUMP_STEPS (comma-separated ints), CTPO_DUMP_START_STEP "
                         f"and CTPO_DUMP_CALLS_PER_STEP (ints) must be too: {e}") from None
    rank = env.get("RANK") or f"pid{os.getpid()}"
    return DumpWriter(env["CTPO_DUMP_DIR"], steps, start, per_step, rank)


def record(old_log_prob, log_prob, response_mask, advantages) -> None:
    """Called by the plugin's loss once per micro-batch; does nothing unless CTPO_DUMP_DIR is set."""
    global _WRITER
    if _WRITER is None:
        if not os.environ.get("CTPO_DUMP_DIR"):
            return
        _WRITER = writer_from_env()
    _WRITER.record(old_log_prob, log_prob, response_mask, advantages)
