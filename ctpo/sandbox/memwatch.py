"""One memory and descriptor budget for a whole sandbox where no cgroup is delegated: the namespace init (I)
watches every process of its pid namespace while it waits for U.

Self-contained (no ctpo imports): `_child.py` imports it as a sibling module. I is pid 1 of the sandbox's
pid namespace and sees exactly the sandbox's processes in its own /proc, which user code cannot reach.

Every `PERIOD_S` (and at every child exit) I sums, over the sandbox's processes:
  - memory: resident pages (statm: anonymous + file-backed + shared/tmpfs-mapped); RLIMIT_AS is per
    process, so 4 processes under it each could hold 4x the limit together. When that cheap sum is
    over the budget, the exact proportional set size (smaps_rollup Pss: a page shared by n processes
    counts 1/n in each) decides, so forked children sharing the interpreter are not counted n times;
  - descriptors: the entries of each /proc/<pid>/fd (a pipe or socket holds kernel buffers).
Over either budget, I kills every process in the namespace at once (kill(-1) from the namespace init)
and reports "M <what> <amount>" on the status pipe; the host's status is then "memory".

Memory that no process maps is bounded elsewhere: the private /tmp and /dev/shm are tmpfs mounts with a
size and an inode limit (no user xattrs: the syscall filter refuses them), SysV shm by the IPC namespace,
memfd_create is refused by the syscall filter. Between two samples a process can still grow up to its own
RLIMIT_AS; the budget holds for anything that lasts longer than `PERIOD_S`.
"""
from __future__ import annotations

import os
import select
import signal

PERIOD_S = 0.025
PAGE = os.sysconf("SC_PAGE_SIZE")


def _pids() -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit() and p != "1"]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, ValueError):  # the process ended meanwhile
        return ""


def resident_bytes(pids: list[str]) -> int:
    """Upper bound: the sum of the processes' resident set sizes (shared pages counted in each)."""
    total = 0
    for p in pids:
        fields = _read(f"/proc/{p}/statm").split()
        if len(fields) > 1:
            total += int(fields[1]) * PAGE
    return total


def proportional_bytes(pids: list[str]) -> int:
    """Exact: the sum of the processes' proportional set sizes (smaps_rollup Pss, kB)."""
    total = 0
    for p in pids:
        for line in _read(f"/proc/{p}/smaps_rollup").splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return total


def open_descriptors(pids: list[str]) -> int:
    total = 0
    for p in pids:
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return total


def over_budget(memory_bytes: int, max_fds: int) -> str:
    """'' while the sandbox is within both budgets, else 'memory <bytes>' or 'descriptors <count>'."""
    pids = _pids()
    if resident_bytes(pids) > memory_bytes:
        used = proportional_bytes(pids)
        if used > memory_bytes:
            return f"memory {used}"
    fds = open_descriptors(pids)
    return f"descriptors {fds}" if fds > max_fds else ""


def check_proc() -> None:
    """The watchdog needs the namespace's own /proc (with this process as pid 1)."""
    if not os.path.exists("/proc/1/statm") or os.getpid() != 1:
        raise OSError("the memory watchdog needs the sandbox's own /proc (proc could not be mounted)")


def wait_watching(pid: int, memory_bytes: int, max_fds: int):
    """I: reap every child until `pid` ends, enforcing the budgets meanwhile.
    Returns (wait status, rusage, '' or what went over the budget)."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    over = ""
    try:
        while True:
            while True:
                try:
                    done, wstatus, usage = os.wait3(os.WNOHANG)
                except ChildProcessError:
                    raise OSError("the user process vanished") from None
                if done == 0:
                    break
                if done == pid:
                    return wstatus, usage, over
            if not over:
                over = over_budget(memory_bytes, max_fds)
                if over:
                    os.kill(-1, signal.SIGKILL)  # from the namespace init: every process but itself
            select.select([wake_r], [], [], PERIOD_S)
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
    finally:
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
