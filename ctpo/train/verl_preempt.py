"""Preemption and time limits for the verl launcher: save a checkpoint first, then exit for the requeue.

The launcher decides *when*; verl's driver saves (`ctpo.train.verl_save_hook.SaveOnRequest`, verl's
`trainer.checkpoint_callback_class`). They meet in two files under the run's workdir:
  W/verl/save_request       written here: the reason ("SIGTERM", "deadline: ...")
  W/verl/save_request.done  written by the hook after verl saved: {"step": N, "checkpoint_dir": ...}

When to ask:
  * SIGTERM or SIGUSR1 reaches the launcher (a second one stops verl at once; SIGINT always does);
  * the job's end time (CTPO_JOB_END_TIME, else SLURM_JOB_END_TIME, else `squeue -h -j $SLURM_JOB_ID -o %e`)
    is so close that, if this step does not save, the next chance (the end of the following step) could
    come too late: step_start + 2 * step_s + save_s + margin_s >= end (`must_save`). step_s and save_s are
    the longest step (with its validation) and save seen in this run's verl logs, any attempt.
The save lands at the end of the step in progress, so a time limit loses the minutes after that save, and
a signal that arrives with enough grace time loses only the unfinished step. No torch, no verl import.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ctpo import layout
from ctpo.io import write_text
from ctpo.train import launch_tree

ENV_REQUEST = "CTPO_SAVE_REQUEST"  # the same name as ctpo.train.verl_save_hook.ENV_REQUEST (no verl import here)
HOOK_CLASS = "ctpo.train.verl_save_hook.SaveOnRequest"
MARGIN_S = 300.0  # slack before the end time: Ray/W&B shutdown, a slow file system
SAVE_S_UNSEEN = 600.0  # a save's duration before one was measured (14B FSDP model + optimizer: minutes)
EXIT_GRACE_S = 900.0  # after verl saved on request, how long it may take to log, validate and exit
POLL_S = 10.0
SAVE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
TREE_SCAN_S = 5.0  # how often the launch's process tree is walked for its shared-memory segments
STOP_GRACE_S = 60.0  # after a forwarded stop signal, how long verl may take before its tree is killed
# after a traceback in verl's output, how long without a new step before verl is taken to hang on a dead
# worker (verl 0.9.1 waits forever on a rollout server whose weight sync failed); a step of the paper's
# 14B run can take this long, so a logged-and-survived error never ends a healthy run
ERROR_GRACE_S = 1800.0


def request_path(workdir: str | Path) -> Path:
    return layout.workdir(Path(workdir).resolve()).path("save_request")


def done_path(request: str | Path) -> Path:
    return Path(str(request) + ".done")


# ----------------------------------------------------------------------------- the job's end time


def job_end_time(env: dict | None = None, run=subprocess.run) -> tuple[float | None, str]:
    """(unix time the job is killed, where that came from); (None, why not) outside SLURM or when unknown."""
    env = os.environ if env is None else env
    for key in ("CTPO_JOB_END_TIME", "SLURM_JOB_END_TIME"):
        v = env.get(key, "").strip()
        if v:
            try:
                return float(v), key
            except ValueError:
                return None, f"{key}={v!r} is not a unix time"
    job = env.get("SLURM_JOB_ID", "").strip()
    if not job:
        return None, "not a SLURM job"
    try:
        out = run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"squeue failed ({e})"
    text = (out.stdout or "").strip()
    if out.returncode != 0 or not text:
        return None, f"squeue -j {job} -o %e gave nothing (rc {out.returncode})"
    try:
        return datetime.fromisoformat(text.splitlines()[0].strip()).timestamp(), "squeue %e"
    except ValueError:
        return None, f"squeue end time {text!r} (no time limit?)"


# ----------------------------------------------------------------------------- step timings


@dataclass
class Timings:
    step_s: float | None = None  # longest step incl. its save and validation
    save_s: float | None = None  # longest checkpoint save


def _steps(path: Path) -> dict[int, dict]:
    """{step: merged data} of one verl file-logger file; unreadable or cut lines are skipped."""
    per_step: dict[int, dict] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return per_step
    for line in lines:
        try:
            rec = json.loads(line)
            step, data = int(rec["step"]), dict(rec["data"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill, or not verl's
        per_step.setdefault(step, {}).update(data)
    return per_step


def steps_logged(path: Path) -> dict[int, dict]:
    """The steps verl's file logger has written to `path` so far (a launch's progress)."""
    return _steps(path)


def read_timings(logs: list[Path]) -> Timings:
    """The longest step and save in verl's file-logger lines (`timing_s/step`, `/testing`, `/save_checkpoint`)."""
    t = Timings()
    for path in logs:
        for data in _steps(path).values():
            step_s = _num(data.get("timing_s/step"))
            if step_s is not None:
                step_s += _num(data.get("timing_s/testing")) or 0.0
                t.step_s = max(t.step_s or 0.0, step_s)
            save_s = _num(data.get("timing_s/save_checkpoint"))
            if save_s is not None:
                t.save_s = max(t.save_s or 0.0, save_s)
    return t


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def must_save(step_start: float, end: float, step_s: float, save_s: float, margin_s: float = MARGIN_S) -> bool:
    """Save at the end of the step that started at `step_start`? Yes when skipping it could push the next
    save (at the end of the following step) past `end`: step_start + 2 * step_s + save_s + margin_s >= end."""
    return step_start + 2.0 * step_s + save_s + margin_s >= end


# ----------------------------------------------------------------------------- the controller


@dataclass
class SaveController:
    """Runs beside verl: turns signals and the end time into one save request, then sees it through."""

    request: Path
    end_time: float | None = None
    logs_dir: Path | None = None  # verl_logs/: attempt*.jsonl of every launch (timings)
    current_log: Path | None = None  # this launch's file (when its steps are logged)
    margin_s: float = MARGIN_S
    exit_grace_s: float = EXIT_GRACE_S
    reason: str | None = None  # why a save was requested (None: not requested)
    signum: int | None = None  # the signal that asked, if one did
    saved_step: int | None = None
    _step_start: float = field(default_factory=time.time)
    _steps_seen: int = -1
    _saved_at: float | None = None

    def __post_init__(self) -> None:
        self.request.parent.mkdir(parents=True, exist_ok=True)
        for p in (self.request, done_path(self.request)):  # a previous attempt's request is spent
            p.unlink(missing_ok=True)

    def ask(self, reason: str) -> bool:
        """Write the request (once); False when one was already made."""
        if self.reason is not None:
            return False
        self.reason = reason
        write_text(self.request, reason + "\n")
        print(f"[ctpo] {reason}: asking verl to save a checkpoint at the end of this step, then stop",
              file=sys.stderr, flush=True)
        return True

    def on_signal(self, signum: int) -> bool:
        """A save signal: True if it asked for a save, False if one was already asked (stop verl now)."""
        self.signum = self.signum or signum
        return self.ask(f"{signal.Signals(signum).name} received")

    def tick(self, now: float | None = None) -> bool:
        """Called every few seconds while verl runs; True when verl should be stopped now."""
        now = time.time() if now is None else now
        if self.reason is None and self.end_time is not None and self.logs_dir is not None:
            t = read_timings(sorted(self.logs_dir.glob("attempt*.jsonl")))
            n = len(_steps(self.current_log)) if self.current_log is not None else 0
            if n == 0 or n != self._steps_seen:  # no step yet (start unknown: assume now), or the next began
                self._steps_seen, self._step_start = n, now
            if t.step_s is not None:
                save_s = t.save_s if t.save_s is not None else SAVE_S_UNSEEN
                if must_save(self._step_start, self.end_time, t.step_s, save_s, self.margin_s):
                    left = (self.end_time - now) / 60
                    self.ask(f"deadline: the job ends in {left:.0f} min; steps take up to {t.step_s / 60:.1f} min")
        if self.reason is not None and self._saved_at is None:
            done = done_path(self.request)
            if done.is_file():
                self.saved_step = int(json.loads(done.read_text())["step"])
                self._saved_at = now
                print(f"[ctpo] verl saved step {self.saved_step}; waiting for it to exit", file=sys.stderr, flush=True)
        return self._saved_at is not None and now - self._saved_at > self.exit_grace_s

    def exit_code(self) -> int:
        """The launcher's exit code after a save on request: 128 + signal, or 75 (EX_TEMPFAIL) for the deadline."""
        return 128 + self.signum if self.signum else 75


@dataclass
class LaunchOutcome:
    """How a supervised verl launch ended (`run_with_saves`)."""

    rc: int
    first_error: str | None = None  # the first exception a traceback in verl's output ended with
    killed_for: str | None = None  # why the launcher ended the tree itself (None: verl exited on its own)
    leftover_pids: list[int] = field(default_factory=list)  # descendants still alive after verl's driver
    shm_removed: list[str] = field(default_factory=list)  # /dev/shm segments of the launch it unlinked

    def error_line(self) -> str:
        """One line for the log: why the launch failed and the first error seen."""
        why = self.killed_for or f"verl exited with {self.rc}"
        return f"{why}; first error: {self.first_error}" if self.first_error else why


def _tee(stream, sink, scanner: launch_tree.ErrorScanner, errors: list[float]) -> None:
    """Copy verl's output line by line to `sink` (bytes), feeding each line to `scanner`."""
    for raw in iter(stream.readline, b""):
        try:
            sink.write(raw)
            sink.flush()
        except (OSError, ValueError):
            pass  # our own stdout is gone: keep draining so verl never blocks on a full pipe
        if scanner.feed(raw.decode("utf-8", "replace")):  # a traceback ended: an exception was raised
            errors.append(time.monotonic())
    stream.close()


def run_with_saves(start, ctl: SaveController | None, poll_s: float | None = None, *,
                   progress=None, error_grace_s: float = ERROR_GRACE_S, sink=None,
                   outcome: list | None = None) -> int:
    """Start verl (`start()` -> Popen in its own process group; with stdout=PIPE its output is copied to
    `sink`, default our stdout, and scanned for errors) and supervise it until its whole process tree is gone.

    Signals: SIGINT is forwarded at once; SIGTERM/SIGUSR1 with a controller: the first asks for a save,
    later ones are forwarded; without one, forwarded at once. The handlers are in place before verl starts
    and removed after it ended. A forwarded stop that verl does not obey within STOP_GRACE_S ends the tree.
    Errors: when a traceback in verl's output was followed by no new step (`progress()`: steps logged so far)
    for `error_grace_s`, verl is taken to hang on a dead worker and the tree is ended.
    Always, once verl's driver is gone: what is left of the tree (Ray, vLLM processes, re-parented to this
    process, a child subreaper meanwhile) is killed, and the launch's shared-memory segments are unlinked.
    Returns verl's exit code (1 when the launcher ended it for an error); `outcome` receives a LaunchOutcome."""
    poll_s = POLL_S if poll_s is None else poll_s
    procs: list[subprocess.Popen] = []
    early: list[int] = []  # signals that came while verl was starting (before its pid was known)
    stop_at: list[float] = []  # when a stop signal was forwarded

    def forward(signum: int) -> None:
        if not procs:
            early.append(signum)
            return
        stop_at.append(time.monotonic())
        try:
            os.killpg(procs[0].pid, signum)
        except ProcessLookupError:
            pass

    def handler(signum, _frame):
        if ctl is None or signum not in SAVE_SIGNALS or not ctl.on_signal(signum):
            forward(signum)

    scanner, errors = launch_tree.ErrorScanner(), []
    ledger = launch_tree.ShmLedger()
    was_reaper = launch_tree.is_subreaper()
    launch_tree.set_subreaper(True)
    others = launch_tree.descendants()  # our children that are not verl's (never touched)
    previous = {s: signal.signal(s, handler) for s in (*SAVE_SIGNALS, signal.SIGINT)}
    result = LaunchOutcome(rc=-1)
    tee = None
    try:
        procs.append(start())
        proc = procs[0]
        if proc.stdout is not None:
            out = sink if sink is not None else getattr(sys.stdout, "buffer", sys.stdout)
            tee = threading.Thread(target=_tee, args=(proc.stdout, out, scanner, errors), daemon=True)
            tee.start()
        while early:
            forward(early.pop(0))
        watch: tuple[float, int] | None = None  # (time of the error being watched, steps logged then)
        survived = float("-inf")  # errors seen up to this time were followed by a step
        scanned = float("-inf")
        while True:
            try:
                result.rc = proc.wait(timeout=poll_s)
                if ctl is not None:
                    ctl.tick()  # a save verl reported just before it exited
                break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() - scanned >= TREE_SCAN_S:  # /proc walk: not at every (test-short) poll
                ledger.note(launch_tree.descendants(exclude=others))
                scanned = time.monotonic()
            if ctl is not None and ctl.tick():
                result.killed_for = "verl saved but did not exit"
            elif stop_at and time.monotonic() - stop_at[0] > STOP_GRACE_S:
                result.killed_for = f"verl did not stop within {STOP_GRACE_S:.0f} s of the signal"
            elif errors and errors[-1] > survived:
                done = progress() if progress is not None else 0
                if watch is None or watch[0] != errors[-1]:
                    watch = (errors[-1], done)  # the latest error, and the steps logged when it was seen
                elif done != watch[1]:
                    survived, watch = errors[-1], None  # a step after it: verl survived that error
                elif time.monotonic() - errors[-1] > error_grace_s:
                    result.killed_for = (f"verl logged an error and made no progress for {error_grace_s:.0f} s "
                                         f"(a dead worker)")
            if result.killed_for:
                print(f"[ctpo] {result.killed_for}: ending its process tree", file=sys.stderr, flush=True)
                tree = launch_tree.descendants(exclude=others)
                ledger.note(tree)
                launch_tree.kill_tree(tree)
                proc.wait()
                result.rc = 1
                break
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        tree = launch_tree.descendants(exclude=others)
        ledger.note(tree)
        result.leftover_pids = sorted(launch_tree.kill_tree(tree))
        if tee is not None:
            tee.join(timeout=30)
        result.shm_removed = ledger.remove()
        launch_tree.set_subreaper(was_reaper)
        result.first_error = scanner.first
        if outcome is not None:
            outcome.append(result)
    return result.rc
