"""One writer per run: a lock file in the run's work directory (`<workdir>/writer.lock`, ctpo.layout).

A trainer takes the lock before it touches the work directory and drops it when it ends; a second trainer for
the same run (a controller restarted by hand, a duplicate submission) exits in one line naming the holder: its
SLURM job id, host and pid. The lock is a file made by a hard link from a complete temp file, which is atomic
and exclusive on local and NFS file systems alike (no flock, which some cluster file systems refuse), and it
holds JSON {host, pid, pid_start, slurm_job_id, since}.

A lock left behind by a holder that died (SIGKILL, node failure, preemption) is stale and taken over, moved
aside to `writer.lock.stale-<time>` and named in one line:
  - the same SLURM job id as ours: the previous attempt of this requeued job;
  - our host, and its pid is gone (or reused by another process: the start time differs);
  - another host, and `squeue -h -j <job id>` says the job is no longer queued or running.
A holder on another host without a SLURM job id, or one squeue cannot answer for, is never presumed dead.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from ctpo.layout import WORKDIR_FILES

LOCK_NAME = WORKDIR_FILES["writer_lock"]
ALIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}
SQUEUE_TIMEOUT_S = 60


class RunLocked(RuntimeError):
    """Another live trainer holds the run's lock; the message names it in one line."""


def lock_path(workdir: str | Path) -> Path:
    return Path(workdir) / LOCK_NAME


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def me() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _pid_start(pid),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def describe(holder: dict) -> str:
    job = f"SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else "no SLURM job"
    return f"{job} on host {holder.get('host')} (pid {holder.get('pid')}, since {holder.get('since')})"


def squeue_state(job_id: str) -> str | None:
    """The job's state from `squeue -h -j ID -o %T` ('' when SLURM no longer lists it); None when squeue
    cannot answer (not installed, timed out, another error)."""
    try:
        proc = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                              timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return "" if "invalid job id" in proc.stderr.lower() else None
    return proc.stdout.strip().splitlines()[0].strip() if proc.stdout.strip() else ""


def stale_reason(holder: dict, mine: dict) -> str | None:
    """Why the holder is known to be dead, or None when it is (or may be) alive."""
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == mine.get("slurm_job_id"):
        return f"an earlier attempt of this SLURM job {mine['slurm_job_id']} (requeued)"
    if holder.get("host") == mine["host"]:
        pid = holder.get("pid")
        start = _pid_start(int(pid)) if isinstance(pid, int) else None
        if start is None:
            return f"pid {pid} is no longer running on {mine['host']}"
        if holder.get("pid_start") is not None and start != holder["pid_start"]:
            return f"pid {pid} on {mine['host']} is now another process"
        return None
    if holder.get("slurm_job_id"):
        state = squeue_state(holder["slurm_job_id"])
        if state == "" or (state is not None and state.split()[0] not in ALIVE_STATES):
            return f"SLURM job {holder['slurm_job_id']} is {state or 'no longer listed by squeue'}"
    return None


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"host": "?", "pid": "?", "since": "?", "unreadable": True}


def live_holder(workdir: str | Path) -> dict | None:
    """The holder of the run's lock when it is (or may be) alive, else None: what a restarted controller asks
    before submitting the run's training again."""
    holder = _read(lock_path(workdir))
    if holder is None or holder.get("unreadable"):
        return None
    return holder if stale_reason(holder, me()) is None else None


def acquire(workdir: str | Path, log=print) -> dict:
    """Take the run's lock (creating `workdir`); returns our holder record. Raises RunLocked."""
    path = lock_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = me()
    tmp = path.with_name(f".{LOCK_NAME}.{mine['host']}.{mine['pid']}")
    tmp.write_text(json.dumps(mine) + "\n")
    try:
        for _ in range(5):
            try:
                os.link(tmp, path)  # atomic and exclusive: fails if the lock exists
                return mine
            except FileExistsError:
                pass
            holder = _read(path)
            if holder is None:  # released between our link and our read
                continue
            reason = None if holder.get("unreadable") else stale_reason(holder, mine)
            if reason is None:
                raise RunLocked(
                    f"{path}: this run is being trained by {describe(holder)}; a second trainer exits. If that "
                    f"job is gone (check with squeue), delete {path} and rerun")
            aside = path.with_name(f"{LOCK_NAME}.stale-{time.strftime('%Y%m%dT%H%M%S')}-{holder.get('pid')}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue  # another claimant moved it first; try again
            log(f"[ctpo] took over the stale lock of {describe(holder)}: {reason} (kept as {aside.name})")
        raise RunLocked(f"{path}: could not take the lock (it changed hands 5 times while we tried)")
    finally:
        tmp.unlink(missing_ok=True)


def release(workdir: str | Path, mine: dict) -> None:
    """Drop the lock if it is still ours (a takeover after we were presumed dead leaves it alone)."""
    path = lock_path(workdir)
    holder = _read(path)
    if holder and holder.get("host") == mine["host"] and holder.get("pid") == mine["pid"]:
        path.unlink(missing_ok=True)


@contextmanager
def writer_lock(workdir: str | Path, log=print):
    mine = acquire(workdir, log)
    try:
        yield mine
    finally:
        release(workdir, mine)
