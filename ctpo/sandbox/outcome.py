"""How a sandbox ended, as one status: `classify` maps the facts the code cannot forge (the status pipe,
exit statuses, rusage, the cgroup's OOM count, the namespace init's budget watchdog) to (exit_code, ok | error | timeout | memory | infra, detail);
`Capture` keeps the first bytes of an output stream and counts the rest."""
from __future__ import annotations

import signal

from ctpo.sandbox.limits import SandboxLimits

MEMORY_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT)


class Capture:
    """Bytes from one stream, keeping the first `cap` and counting the rest."""

    def __init__(self, cap: int) -> None:
        self.cap, self.buf, self.dropped = cap, bytearray(), 0

    def add(self, data: bytes) -> None:
        room = self.cap - len(self.buf)
        self.buf += data[:room]
        self.dropped += max(0, len(data) - room)

    def text(self) -> str:
        return self.buf.decode("utf-8", errors="replace")


def classify(status: str, returncode: int, timed_out: bool, out: Capture, err: Capture, lim: SandboxLimits,
              oom: bool = False):
    """(exit_code, status, detail) from facts the code cannot forge: the status pipe (written by W and I,
    which user code cannot reach), W's exit status, U's wait status and kernel rusage, the cgroup's OOM
    count. Nothing U prints or writes decides the status; every end maps to exactly one status."""
    lines = status.splitlines()
    fails = [ln[2:] for ln in lines if ln.startswith("F ")]
    external = [ln[2:] for ln in lines if ln.startswith("E ")]
    ends = [ln.split() for ln in lines if ln.startswith("X ")]
    budget = [ln.split()[1:] for ln in lines if ln.startswith("M ")]  # I's watchdog: "M memory|descriptors N"
    if external:
        sig = int(external[0]) if external[0].isdigit() else 0
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else external[0]
        return None, "infra", f"the sandbox received {name} from outside (not the code's doing); retry"
    if fails:
        return None, "infra", f"sandbox setup failed: {fails[0]}"
    if timed_out:
        return None, "timeout", f"wall-clock limit of {lim.timeout_s:g} s exceeded; process tree killed"
    if oom:
        return (-signal.SIGKILL, "memory",
                f"out of memory: the sandbox's cgroup limit ({lim.memory_mb} MB + tmpfs) was hit and it was killed")
    if budget and len(budget[0]) == 2 and budget[0][1].isdigit():
        what, amount = budget[0][0], int(budget[0][1])
        held = (f"{amount >> 20} MB of memory (limit {lim.memory_mb} MB)" if what == "memory"
                else f"{amount} open descriptors (limit {lim.sandbox_fds})")
        return -signal.SIGKILL, "memory", f"the sandbox's processes held {held} together; all were killed"
    if not ends or len(ends[0]) != 5 or ends[0][2] not in ("exit", "signal"):
        tail = err.text().strip().splitlines()[-1:] or [""]
        return None, "infra", f"sandbox exited ({returncode}) without running the code: {tail[0][:200]}"
    _, _, how, val, rss_kb = ends[0]
    val = int(val)
    last = (err.text().strip().splitlines() or [""])[-1]
    if how == "signal":
        name = signal.Signals(val).name if val in signal.Signals._value2member_map_ else str(val)
        if val == signal.SIGXCPU:
            return -val, "timeout", "CPU-time limit exceeded (SIGXCPU)"
        big = int(rss_kb) * 1024 >= (lim.memory_mb << 20) // 2
        if val in (*MEMORY_SIGNALS, signal.SIGKILL) and big:
            return -val, "memory", f"killed by {name} near the {lim.memory_mb} MB limit (peak RSS {int(rss_kb) >> 10} MB)"
        return -val, "error", f"killed by signal {name}"
    if val == 0:
        return 0, "ok", ""
    return val, "error", f"exit code {val}" + (f": {last[:200]}" if last else "")
