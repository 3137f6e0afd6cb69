"""The verl launch as one process tree: find it, kill all of it, and remove the shared memory it left.

verl's driver starts Ray (GCS, raylet, workers), Ray starts verl's actors, and vLLM starts its own engine and
worker processes; some of them outlive the driver or sit in other sessions, so neither the driver's exit nor
a signal to its process group ends them all. The launcher makes itself a child subreaper
(`prctl(PR_SET_CHILD_SUBREAPER)`): every orphaned descendant is re-parented to it instead of to init, so the
launch stays one tree under the launcher that `descendants` finds through /proc, and `kill_tree` ends.

Shared memory: Python's `multiprocessing.shared_memory` names segments `/dev/shm/psm_*` (vLLM's message
queues between its engine and workers) and verl's weight-sync fallback `/dev/shm/verl_weights_*` (one
bucket, 64 MB to 4 GB). A process that is killed never unlinks what it created, and on a cluster node the
segments pile up across launches. `ShmLedger` notes every such segment a process of the tree maps or holds
open (polled while verl runs, and once more before the tree is killed) and unlinks those still there at the
end: only the launch's own segments, never another job's on the same node.

Linux only (/proc, prctl), as the cluster and CI are. No torch, no verl import.
"""
from __future__ import annotations

import ctypes
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
SHM_DIR = Path("/dev/shm")
SHM_PREFIXES = ("psm_", "verl_weights_")  # multiprocessing.shared_memory's default names; verl's weight bucket
KILL_GRACE_S = 10.0  # SIGTERM, then SIGKILL for what is left after this long


def set_subreaper(on: bool = True) -> bool:
    """Make this process the reaper of its orphaned descendants (True when the kernel accepted it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def is_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        flag = ctypes.c_int(0)
        return libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value != 0
    except (OSError, AttributeError):
        return False


def _parents() -> dict[int, int]:
    """{pid: parent pid} of every process visible in /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # the command name (field 2) may hold spaces and parentheses: the fields after its last ')'
        out[int(d)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return out


def descendants(root: int | None = None, exclude: set[int] = frozenset()) -> set[int]:
    """Every live descendant of `root` (default: this process), minus `exclude` and their descendants."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [p for p in children.get(root, []) if p not in exclude]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(p for p in children.get(pid, []) if p not in exclude)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"  # a zombie has exited (its parent has not reaped it yet)


def _reap(pids: set[int]) -> None:
    """Collect the exit status of those of `pids` that are our children (re-parented orphans included)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def kill_tree(pids: set[int], grace_s: float | None = None) -> set[int]:
    """SIGTERM each of `pids`, SIGKILL what is still alive after `grace_s` (default KILL_GRACE_S; Python's
    multiprocessing resource tracker, for one, ignores SIGTERM); returns the pids that were alive."""
    grace_s = KILL_GRACE_S if grace_s is None else grace_s
    alive = {p for p in pids if _alive(p)}
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while True:
            _reap(alive)
            left = {p for p in alive if _alive(p)}
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not left:
            break
    _reap(alive)
    return alive


_SHM_NAME = re.compile(r"/dev/shm/((?:%s)[^\s/]+)" % "|".join(re.escape(p) for p in SHM_PREFIXES))


def shm_in_use(pids: set[int]) -> set[str]:
    """Names (under /dev/shm) of the launch's kind of segments that `pids` map or hold open."""
    names = set()
    for pid in pids:
        try:
            names.update(m.group(1) for m in _SHM_NAME.finditer(Path(f"/proc/{pid}/maps").read_text()))
        except OSError:
            pass
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                m = _SHM_NAME.match(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
            if m:
                names.add(m.group(1))
    return {n.removesuffix(" (deleted)") for n in names}


@dataclass
class ShmLedger:
    """The shared-memory segments a launch's processes were seen using; `remove()` unlinks those left."""

    seen: set[str] = field(default_factory=set)

    def note(self, pids: set[int]) -> None:
        self.seen |= shm_in_use(pids)

    def remove(self) -> list[str]:
        gone = []
        for name in sorted(self.seen):
            try:
                (SHM_DIR / name).unlink()
                gone.append(name)
            except FileNotFoundError:
                pass
        return gone


# ----------------------------------------------------------------------------- the first error


# what precedes a traceback line in verl's output: Ray's "(Actor pid=N) " per process hop (colored), and the
# header of a logger that logs the traceback, as vLLM's workers do: "ERROR 12-07 14:58:05 [file.py:1000] "
_PREFIX = re.compile(r"^(?:\s*(?:\x1b\[[0-9;]*m)*\([^)]*pid=\d+[^)]*\)(?:\x1b\[[0-9;]*m)*)*\s?"
                     r"(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d \[[^\]]*\] )?")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Dead|Died))(?::\s*(.*))?$")


@dataclass
class ErrorScanner:
    """Reads verl's output line by line and keeps the first exception a traceback ended with (Ray prefixes
    each actor's lines with '(Name pid=N)'; the prefix is dropped)."""

    first: str | None = None
    _in_traceback: bool = False

    def feed(self, line: str) -> bool:
        """True when `line` is the exception that ended a traceback."""
        text = _PREFIX.sub("", line.rstrip("\r\n"))
        if "Traceback (most recent call last):" in text:
            self._in_traceback = True
            return False
        if not self._in_traceback or not text or text[0].isspace() or not _EXC_LINE.match(text):
            return False
        self._in_traceback = False
        if self.first is None:
            self.first = text if len(text) <= 400 else text[:397] + "..."
        return True
