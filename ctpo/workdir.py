"""A run's work directory (`runs/{exp}/{run}/seed{seed}/`): checkpoints, rollout dumps, the W&B id.

The directory belongs to one *run identity*: the resolved config without the keys a resumed run may
change (the schedule: total_steps, save_freq, test_freq, dump_steps; and the W&B settings). A rerun with
the same identity resumes; a rerun after the config changed (a user edited a method file and Snakemake
reran the job) must train the new config from scratch, and must lose nothing of the old one. So
`claim` moves the old state aside to `superseded/<old identity>/` and starts clean. No torch here: the
verl launcher uses it too.
"""
from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

from ctpo.config import config_hash
from ctpo.io import write_text
from ctpo.layout import WORKDIR_FILES

SCHEDULE_KEYS = ("total_steps", "save_freq", "test_freq", "dump_steps")  # train.* keys a resume may change
IDENTITY_FILE = WORKDIR_FILES["run_identity"]
SUPERSEDED_DIR = WORKDIR_FILES["superseded"]
LOCK_FILE = WORKDIR_FILES["writer_lock"]  # the claimant's own lock (ctpo.runlock) stays in place


def run_identity(cfg_dict: dict) -> tuple[str, dict]:
    """(hash, identity dict) of a resolved run config: the config less schedule keys and W&B settings."""
    ident = copy.deepcopy(cfg_dict)
    for k in SCHEDULE_KEYS:
        ident["train"].pop(k, None)
    ident.pop("wandb", None)
    return config_hash(ident), ident


def claim(workdir: str | Path, cfg_dict: dict) -> str | None:
    """Make `workdir` belong to this config's identity; returns where older state was moved, else None.

    Everything in the directory except `superseded/` and the writer's lock is moved when the stored identity
    differs.
    """
    workdir = Path(workdir)
    identity, _ = run_identity(cfg_dict)
    id_file = workdir / IDENTITY_FILE
    moved = None
    if id_file.is_file():
        old = id_file.read_text().strip()
        if old != identity:
            dest = workdir / SUPERSEDED_DIR / f"{old}-{time.strftime('%Y%m%d-%H%M%S')}"
            dest.mkdir(parents=True)
            for entry in sorted(workdir.iterdir()):
                if entry.name not in (SUPERSEDED_DIR, LOCK_FILE):
                    shutil.move(str(entry), str(dest / entry.name))
            moved = str(dest)
            print(f"run config changed (identity {old} -> {identity}): previous checkpoints, dumps and W&B id "
                  f"moved to {dest}; training this config from scratch", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    if not id_file.is_file():
        write_text(id_file, identity + "\n")
    return moved
