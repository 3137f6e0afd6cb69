"""Per-sandbox cgroup v2 (memory, pids) where the machine delegates one; `None` otherwise (fallback).

A sandbox's processes are then bounded *as a whole*: cpu.max its CPU bandwidth (`SandboxLimits.cpus`,
where the parent offers the cpu controller), memory.max covers every process, the tmpfs /tmp
and /dev/shm pages and SysV/POSIX shared memory they create (all charged to the cgroup), pids.max every
process and thread, and an out-of-memory kill is read back from memory.events (a kernel fact, so
status "memory" cannot be forged).

Where the parent comes from (first that works; `detect()` caches it):
  1. $CTPO_SANDBOX_CGROUP: a cgroup v2 directory delegated to us (systemd `Delegate=yes`, a SLURM
     step's writable subtree, `systemd-run --user -p Delegate=yes ...`) with memory and pids enabled
     for its children, or enable-able (no processes in it);
  2. our own cgroup, when it is writable, offers memory+pids and holds no process but ours: we move
     into a leaf `ctpo-main` (the no-internal-processes rule) and enable the controllers for siblings.
Nothing found: the sandbox uses its namespace fallback (see _child.py), and `describe()` says so.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

NEEDED = ("memory", "pids")
OPTIONAL = ("cpu",)  # cpu.max per sandbox where the parent offers it (SLURM steps often delegate only some)
CPU_PERIOD_US = 100_000
_counter = itertools.count()
_lock = threading.Lock()
_detected: tuple[bool, Path | None, str] | None = None


def _cgroup2_mount() -> Path | None:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split()[:1] == ["cgroup2"]:
                    return Path(left.split()[4])
    except OSError:
        return None
    return None


def _own_cgroup(mount: Path) -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return mount / line[3:].lstrip("/")
    except OSError:
        return None
    return None


def _words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def _usable_parent(d: Path, move_self: bool) -> tuple[Path | None, str]:
    """(d, '') when children of d can get memory+pids limits (enabling them if needed), else (None, why)."""
    if not set(NEEDED) <= _words(d / "cgroup.controllers"):
        return None, f"{d}: controllers {sorted(_words(d / 'cgroup.controllers'))} lack memory/pids"
    if not os.access(d, os.W_OK):
        return None, f"{d}: not writable"
    if set(NEEDED) <= _words(d / "cgroup.subtree_control"):
        _enable_optional(d)
        return d, ""
    procs = _words(d / "cgroup.procs")
    if procs and move_self and procs <= {str(os.getpid())}:
        leaf = d / "ctpo-main"
        try:
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as e:
            return None, f"{d}: cannot move into {leaf.name}: {e}"
    elif procs:
        return None, f"{d}: holds other processes; cannot enable controllers for children"
    try:
        (d / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in NEEDED))
    except OSError as e:
        return None, f"{d}: cannot enable {NEEDED} for children: {e}"
    _enable_optional(d)
    return d, ""


def _enable_optional(d: Path) -> None:
    """Enable OPTIONAL controllers for d's children where d offers them (a failure leaves them off)."""
    for c in OPTIONAL:
        if c in _words(d / "cgroup.controllers") and c not in _words(d / "cgroup.subtree_control"):
            try:
                (d / "cgroup.subtree_control").write_text(f"+{c}")
            except OSError:
                pass


def detect() -> tuple[Path | None, str]:
    """(parent directory for sandbox cgroups or None, reason when None). Cached for the process."""
    global _detected
    with _lock:
        if _detected is not None:
            return _detected[1], _detected[2]
        explicit = os.environ.get("CTPO_SANDBOX_CGROUP")
        if explicit:
            parent, why = _usable_parent(Path(explicit), move_self=False)
        else:
            mount = _cgroup2_mount()
            own = _own_cgroup(mount) if mount else None
            parent, why = (_usable_parent(own, move_self=True) if own else (None, "no cgroup v2 mount"))
        _detected = (True, parent, why)
        return parent, why


def reset_detection() -> None:
    """Forget the cached detection (tests)."""
    global _detected
    with _lock:
        _detected = None


class SandboxCgroup:
    """One sandbox's cgroup: created with its limits, the launcher attached, read and removed after."""

    def __init__(self, parent: Path, memory_bytes: int, nproc: int, cpus: float = 1.0) -> None:
        """cpus: the sandbox's CPU bandwidth (cpu.max = cpus x CPU_PERIOD_US per period), written where
        the parent enabled the cpu controller for its children."""
        self.path = parent / f"ctpo-sbx-{os.getpid()}-{next(_counter)}"
        self.path.mkdir()
        self.cpu_max = (f"{max(1000, round(cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}"
                        if "cpu" in _words(parent / "cgroup.subtree_control") else None)
        for name, value in (("memory.max", str(memory_bytes)), ("memory.swap.max", "0"),
                            ("memory.oom.group", "1"), ("pids.max", str(nproc)), ("cpu.max", self.cpu_max)):
            f = self.path / name
            if value is not None and (f.exists() or name in ("memory.max", "pids.max", "cpu.max")):
                f.write_text(value)

    def attach(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def oom_killed(self) -> bool:
        """The kernel's count of OOM kills in this cgroup (memory.events), not anything the code said."""
        for line in _read_lines(self.path / "memory.events"):
            key, _, value = line.partition(" ")
            if key == "oom_kill" and int(value or 0) > 0:
                return True
        return False

    def kill(self) -> None:
        f = self.path / "cgroup.kill"
        if f.exists():
            try:
                f.write_text("1")
            except OSError:
                pass

    def remove(self) -> None:
        self.kill()
        for _ in range(200):  # processes leave the cgroup asynchronously after they are reaped
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []
