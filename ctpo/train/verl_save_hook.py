"""Save-on-request inside verl's driver: `trainer.checkpoint_callback_class=ctpo.train.verl_save_hook.SaveOnRequest`.

verl 0.9.1's v1 trainer (the default, `trainer.use_v1=true`) builds this callback in its driver process
(Ray's TaskRunner) and calls `on_save` after every checkpoint. verl's own expiration-aware save
(`should_save_ckpt_esi`, `trainer.esi_redundant_time`, env MLP_/SAGEMAKER_..._EXPIRATION_TIMESTAMP) lives
only in the legacy trainer (trainer/ppo/ray_trainer.py); the v1 loop (trainer/ppo/v1/trainer_base.py
`fit`) saves only when `save_freq > 0 and (is_last_step or global_steps % save_freq == 0)`.

The launcher (`ctpo.train.verl_preempt`, outside Ray) decides *when* to save (SIGTERM/SIGUSR1, or the
SLURM end time too close for another step) and writes the request file named by env CTPO_SAVE_REQUEST.
This callback acts on it:
  1. a watcher thread sees the file and sets `trainer.save_freq = 1` on verl's live config, so verl's own
     save runs at the end of the step in progress (`global_steps % 1 == 0`);
  2. `on_save` (called after `latest_checkpointed_iteration.txt` is written) restores `save_freq`, writes
     `<request>.done` = {"step": N, ...} (atomically) and sets the trainer's `total_training_steps` to N, so
     the loop logs step N's metrics and ends; verl exits cleanly and the next launch resumes from N.
Retention: after every durable save, `on_save` deletes the checkpoints neither evaluation nor a resume needs
(`ctpo.train.retention.prune`, env CTPO_KEEP_STEPS; unset keeps everything).
Fault injection, as in the local trainer: with CTPO_PAUSE_AFTER_STEP=N, `on_save` of step N writes
`W/verl/paused_after_stepN` and waits for the launcher's save request (a signal), then stops after step N;
tests signal the launcher at a known step instead of racing a poll against verl.
Imported only inside verl's process (it subclasses verl's CheckpointCallback).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from verl.trainer.ppo.checkpoint_callback import CheckpointCallback

from ctpo.io import write_text

ENV_REQUEST = "CTPO_SAVE_REQUEST"
PAUSE_ENV = "CTPO_PAUSE_AFTER_STEP"  # the same name as ctpo.train.local.PAUSE_ENV
POLL_S = 2.0


def done_path(request: str | Path) -> Path:
    return Path(str(request) + ".done")


class SaveOnRequest(CheckpointCallback):
    """verl CheckpointCallback: a save at the end of the current step when the request file appears, then stop."""

    def __init__(self, config=None):
        super().__init__(config=config)
        path = os.environ.get(ENV_REQUEST)
        self.request = Path(path) if path else None
        self.armed = threading.Event()  # set once save_freq was forced to 1
        self._orig_save_freq = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if self.request is not None and config is not None:
            threading.Thread(target=self._watch, name="ctpo-save-on-request", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self.request.exists():
                self.arm()
                return
            self._stop.wait(POLL_S)

    def arm(self) -> None:
        """Make verl save at the end of the step in progress."""
        with self._lock:
            if self.armed.is_set():
                return
            trainer_cfg = self.config.trainer
            self._orig_save_freq = trainer_cfg.save_freq
            trainer_cfg.save_freq = 1
            self.armed.set()
        reason = self.request.read_text().strip() if self.request and self.request.exists() else "request"
        print(f"[ctpo] save requested ({reason}): verl saves a checkpoint at the end of this step, then stops",
              flush=True)

    def pause_after_step(self, global_step: int) -> None:
        """When $CTPO_PAUSE_AFTER_STEP == global_step: write the marker, wait for the save request, arm."""
        if self.request is None or os.environ.get(PAUSE_ENV) != str(global_step):
            return
        write_text(self.request.parent / f"paused_after_step{global_step}", f"{os.getpid()}\n")
        print(f"[ctpo] paused after saving step {global_step} ({PAUSE_ENV}); waiting for a save request", flush=True)
        while not self.request.exists():
            time.sleep(0.2)
        self.arm()

    def prune(self, global_step: int) -> None:
        from ctpo.train import retention

        keep = retention.keep_from_env()
        if keep is None or self.config is None:
            return
        result = retention.prune(self.config.trainer.default_local_dir, int(global_step), keep)
        print(retention.summary_line(result, int(global_step)), flush=True)

    def on_save(self, trainer, global_step: int, checkpoint_dir: str, async_save: bool = False, **kwargs) -> None:
        if not async_save:
            self.prune(global_step)  # the new save is complete (latest_checkpointed_iteration.txt written)
            self.pause_after_step(global_step)
        if not self.armed.is_set() or async_save:  # an async save is not durable yet: keep going
            return
        with self._lock:
            self.config.trainer.save_freq = self._orig_save_freq
            self._stop.set()
        trainer.total_training_steps = min(int(trainer.total_training_steps), int(global_step))
        write_text(done_path(self.request),
                   json.dumps({"step": int(global_step), "checkpoint_dir": str(checkpoint_dir)}) + "\n")
        print(f"[ctpo] checkpoint of step {global_step} saved on request; training stops after this step",
              flush=True)
