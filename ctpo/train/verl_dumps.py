"""Rollout dumps of a verl run -> `runs/.../rollouts/step{N}.npz` (ctpo.schema.ROLLOUT_ARRAYS).

verl's own `trainer.rollout_data_dir` writes decoded text, scores and ground truths per step (JSONL),
not log-probs, so the diagnostics cannot use it. The log-probs come from our loss instead: with
CTPO_DUMP_DIR and CTPO_DUMP_STEPS set (by `verl_backend.run_env`), `ctpo.verl_plugin` writes, at each
dump step, one or more shards per rank

    $CTPO_DUMP_DIR/step{N}/<any name>.npz   arrays ROLLOUT_ARRAYS:
        old_log_prob, log_prob   float (n_i, T_i)   behaviour / current-policy log-probs of response tokens
        response_mask            int   (n_i, T_i)   1 = model token, 0 = observation or padding
        advantages               float (n_i,) or (n_i, T_i) (per-token, constant over a sequence)

`convert_dumps` pads the shards to a common T (mask 0) and concatenates them in shard-name order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ctpo.io import atomic_path
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


def merge_shards(paths: list[Path]) -> dict[str, np.ndarray]:
    """Shards -> one set of arrays: (N, T_max) right-padded with 0 (mask 0), advantages (N,)."""
    shards = [_load_shard(p) for p in sorted(paths)]
    if not shards:
        raise DumpError("no dump shards to merge")
    t_max = max(s["response_mask"].shape[1] for s in shards)
    out = {}
    for key, dtype in (("old_log_prob", np.float32), ("log_prob", np.float32), ("response_mask", np.int8)):
        out[key] = np.concatenate(
            [np.pad(s[key].astype(dtype), ((0, 0), (0, t_max - s[key].shape[1]))) for s in shards], axis=0
        )
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
        arrays = merge_shards(shards)
        target = out_dir / f"step{step}.npz"
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        written.append(step)
    return written
