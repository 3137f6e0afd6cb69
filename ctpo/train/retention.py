"""Checkpoint retention for verl runs: keep what evaluation reads and the latest (for resume), delete the rest
as training goes.

A verl checkpoint `checkpoints/global_step_N/` holds, per FSDP rank, the actor's fp32 shards
(`actor/model_world_size_W_rank_R.pt`, 4 bytes per parameter in all), its AdamW state
(`actor/optim_world_size_W_rank_R.pt`, 8 bytes per parameter) and `extra_state_*` (lr scheduler, RNG), plus
`actor/huggingface/` (config, tokenizer), `actor/fsdp_config.json` and the dataloader's `data.pt`. verl's
model merger (`verl.model_merger merge --backend fsdp`, the `merge` rule) reads only the model shards,
`fsdp_config.json` and `huggingface/`; resuming needs all of it, of the latest step only.

`prune(root, latest, keep)` runs in verl's driver after every save (`ctpo.train.verl_save_hook`, env
CTPO_KEEP_STEPS = the steps `ctpo.configure.keep_steps` plans for evaluation) and:
  - leaves `global_step_<latest>` whole (the resume point) and any later, incomplete save alone;
  - of an older step evaluation reads, deletes the optimizer and extra state (2/3 of its size);
  - deletes every other older step.

verl's own retention (`trainer.max_actor_ckpt_to_keep`, verl/utils/checkpoint/checkpoint_manager.py
`register_checkpoint`) does not fit: it keeps the N most recent saves, not the evaluated ones; it only knows the
paths saved by the current process (`previous_saved_paths` starts empty after a resume, so a preempted run keeps
every earlier checkpoint); and it deletes `actor/` but leaves `global_step_N/data.pt`. This module scans the
directory instead, so a resumed run is pruned as well.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ctpo.layout import WORKDIR_FILES

ENV_KEEP = "CTPO_KEEP_STEPS"  # comma-separated steps; unset = keep everything
_STEP_DIR = WORKDIR_FILES["verl_actor"].split("/")[1]  # verl's per-step directory under checkpoints/
STEP_DIR = re.compile("^" + re.escape(_STEP_DIR).replace(re.escape("{step}"), r"(\d+)") + "$")
RESUME_ONLY = ("optim_world_size_", "extra_state_world_size_")  # actor/ files only a resume reads


def keep_from_env(env=os.environ) -> set[int] | None:
    raw = env.get(ENV_KEEP)
    if raw is None:
        return None
    return {int(s) for s in raw.split(",") if s.strip()}


def env_value(keep: list[int] | None) -> dict[str, str]:
    """The environment entry that hands `keep` to verl's driver ({} = keep every checkpoint)."""
    return {} if keep is None else {ENV_KEEP: ",".join(str(int(s)) for s in sorted(set(keep)))}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prune(root: str | Path, latest: int, keep: set[int]) -> dict:
    """Delete what neither evaluation (`keep`) nor a resume (`latest`) needs under verl's checkpoint dir `root`.
    Returns {"deleted": [steps], "slimmed": [steps], "freed_bytes": n}."""
    root = Path(root)
    out = {"deleted": [], "slimmed": [], "freed_bytes": 0}
    if not root.is_dir():
        return out
    for entry in sorted(root.iterdir()):
        m = STEP_DIR.match(entry.name)
        if not m or not entry.is_dir() or int(m.group(1)) >= latest:
            continue
        step = int(m.group(1))
        if step in keep:
            victims = [f for f in (entry / "actor").glob("*") if f.name.startswith(RESUME_ONLY)]
            if victims:
                for f in victims:
                    out["freed_bytes"] += _size(f)
                    f.unlink()
                out["slimmed"].append(step)
        else:
            out["freed_bytes"] += _size(entry)
            shutil.rmtree(entry)
            out["deleted"].append(step)
    return out


def summary_line(result: dict, latest: int) -> str:
    return (f"[ctpo] checkpoints after step {latest}: deleted steps {result['deleted'] or 'none'}, kept the model "
            f"only of evaluated steps {result['slimmed'] or 'none'}, freed {result['freed_bytes'] / 2**30:.2f} GiB")
