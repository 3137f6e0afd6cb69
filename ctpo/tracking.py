"""Weights & Biases tracking that is never required.

- project = `wandb.project`, group = "<experiment>/<method>", name = "<run>-seed<seed>";
- run id = a hash of (experiment, run, seed), stored at `<workdir>/wandb_run_id` beside the checkpoints
  and reused with resume="allow", so a restarted or requeued run continues the same W&B run;
- mode "auto": online when a key is configured (WANDB_API_KEY or a ~/.netrc entry for api.wandb.ai),
  else offline (an explicit WANDB_MODE in the environment wins); "online" | "offline" | "disabled" as given;
- if wandb is missing or fails to start, a warning is printed and training goes on untracked.
"""
from __future__ import annotations

import hashlib
import netrc
import os
import sys
import warnings
from pathlib import Path

RUN_ID_FILE = "wandb_run_id"
MODES = ("auto", "online", "offline", "disabled")


def run_id_for(experiment: str, run: str, seed: int, identity: str = "") -> str:
    """Deterministic W&B run id: the same (experiment, run, seed, run identity) always maps to the same id.

    `identity` is `ctpo.train.workdir.run_identity(cfg)[0]`: a requeued job keeps its run, a run whose config
    changed (and is retrained from scratch) opens a new one."""
    key = f"{experiment}/{run}/seed{seed}" + (f"/{identity}" if identity else "")
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    """The concrete wandb mode for a configured `wandb.mode`."""
    if mode not in MODES:
        raise ValueError(f"wandb.mode must be one of {MODES}, got '{mode}'")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if _has_api_key() else "offline"


class Tracker:
    """A W&B run, or nothing (`run is None`) when disabled or when wandb failed to start."""

    def __init__(self, run, run_id: str, mode: str) -> None:
        self.run = run
        self.run_id = run_id
        self.mode = mode

    @property
    def run_dir(self) -> Path | None:
        return Path(self.run.dir).parent if self.run is not None else None

    def log(self, metrics: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as e:  # never let tracking stop training
            warnings.warn(f"wandb: log failed at step {step}: {e}")

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:
            warnings.warn(f"wandb: finish failed: {e}")
        self.run = None


def start_tracking(cfg_dict: dict, workdir: str | Path) -> Tracker:
    """Open (or resume) the W&B run of a resolved run config. `workdir` holds the id file and wandb/."""
    from ctpo.io import write_text

    workdir = Path(workdir)
    id_file = workdir / RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        from ctpo.train.workdir import run_identity

        run_id = run_id_for(cfg_dict["experiment"], cfg_dict["run"], cfg_dict["seed"], run_identity(cfg_dict)[0])
        write_text(id_file, run_id + "\n")
    mode = resolve_mode(cfg_dict["wandb"]["mode"])
    if mode == "disabled":
        return Tracker(None, run_id, mode)
    try:
        import wandb

        (workdir / "wandb").mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=cfg_dict["wandb"]["project"],
            entity=cfg_dict["wandb"]["entity"],
            group=f"{cfg_dict['experiment']}/{cfg_dict['loss']['method']}",
            name=f"{cfg_dict['run']}-seed{cfg_dict['seed']}",
            id=run_id,
            resume="allow",
            mode=mode,
            dir=str(workdir),
            config=cfg_dict,
            settings=wandb.Settings(silent=True, console="off"),
        )
    except Exception as e:
        print(f"warning: wandb did not start ({type(e).__name__}: {e}); training continues untracked", file=sys.stderr)
        return Tracker(None, run_id, "failed")
    return Tracker(run, run_id, mode)
