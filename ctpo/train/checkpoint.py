"""Local-backend checkpoints: `<workdir>/checkpoints/step{N}/` holds

    policy/              HF `save_pretrained` + tokenizer (loadable by ctpo.agent.load_policy)
    trainer_state.pt     optimizer state, RNG states (python, numpy, torch), data cursor, step,
                         the metrics rows so far, and the run's config and resume fingerprint

A checkpoint directory is built under a temporary name and renamed into place, so `step{N}/`
exists only when complete; a SIGKILL mid-save leaves a `.step{N}.*` temp dir that is ignored
(and cleaned up on the next save). Checkpoints live outside Snakemake outputs (paths: ctpo.layout).
"""
from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from ctpo import layout
from ctpo.io import atomic_dir

STATE_FILE = "trainer_state.pt"
POLICY_DIR = layout.POLICY


@dataclass
class TrainerState:
    """Everything besides the weights that a resumed run needs to continue bit-for-bit."""

    step: int  # RL steps completed
    consumed_prompts: int  # data cursor: prompts drawn so far (epoch = consumed // n_train)
    optimizer: dict | None  # torch optimizer state_dict (None at step 0: fresh AdamW)
    rng: dict  # python / numpy / torch RNG states
    fingerprint: str  # hash of the config minus the schedule keys; resume refuses a mismatch
    config: dict  # the resolved config that wrote this checkpoint (to name differing keys)
    metrics_rows: list  # metrics.jsonl rows up to `step` (restored even if the results dir was wiped)


def capture_rng() -> dict:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(states: dict) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def checkpoint_dir(workdir: str | Path, step: int) -> Path:
    return layout.workdir(workdir).path("checkpoint", step=step)


def list_checkpoints(workdir: str | Path) -> list[int]:
    """Steps of the complete checkpoints under `<workdir>/checkpoints/`, ascending."""
    wd = layout.workdir(workdir)
    return [s for s in wd.steps("checkpoint")
            if (wd.path("checkpoint", step=s) / STATE_FILE).is_file()
            and (wd.path("policy", step=s) / "config.json").is_file()]


def save_checkpoint(workdir: str | Path, model, tokenizer, state: TrainerState) -> Path:
    """Write step{state.step}/ atomically; returns its path."""
    import torch

    final = checkpoint_dir(workdir, state.step)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(".step*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(final) as tmp:
        model.save_pretrained(str(tmp / POLICY_DIR), safe_serialization=True)
        tokenizer.save(tmp / POLICY_DIR)
        torch.save(state.__dict__, tmp / STATE_FILE)
    return final


def load_trainer_state(workdir: str | Path, step: int) -> TrainerState:
    import torch

    path = checkpoint_dir(workdir, step) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: trainer state missing")
    # weights_only=False: the file holds RNG tuples and numpy arrays we wrote ourselves
    data = torch.load(path, map_location="cpu", weights_only=False)
    return TrainerState(**data)
