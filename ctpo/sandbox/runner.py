"""Run one untrusted Python program in a fresh, isolated sandbox (`run_code`).

Host side of `_child.py` (read its docstring for what happens inside). Each call:
  - starts `python -I -S -c <import _child> SPEC` in a new session, with a fixed minimal environment (no secrets);
  - the child enters new mount/net/ipc/uts/pid namespaces (+ a user namespace when we are not root),
    makes the whole mount tree read-only, mounts a private tmpfs work dir, drops privileges, sets
    rlimits (CPU, address space, processes, open files, file size) and runs the code;
  - the host enforces the wall-clock timeout by killing the namespace init (every process inside dies
    with it and is reaped inside), caps captured stdout/stderr at `max_output_bytes` each, and maps
    the end to one status: ok | error | timeout | memory | infra.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import select
import signal
import subprocess
import sys
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

_CHILD = str(Path(__file__).with_name("_child.py"))
# `python -c` importing _child (its .pyc is cached: compiling the source costs ~20 ms per start);
# the directory leaves sys.path again before any user code runs.
_BOOT = "import sys; sys.path.insert(0, {dir!r}); import _child; del sys.path[0]; _child.main()"
_SANDBOX_UID = 65534  # nobody: the uid user code runs as when the host is root
_KILL_GRACE_S = 5.0
_MEMORY_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT)
# A fixed environment: nothing from the host (API keys, tokens, cloud credentials) reaches the code.
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp/work",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
}
log = logging.getLogger(__name__)


class SandboxUnavailable(RuntimeError):
    """Isolation (namespaces) cannot be set up here and `allow_unisolated` was not given."""


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one execution. `status` is exactly one of ok | error | timeout | memory | infra.

    ok: exit 0. error: nonzero exit or a fatal signal. timeout: wall clock or CPU-time limit hit.
    memory: MemoryError / address-space limit. infra: the sandbox itself failed (never the code's fault).
    `exit_code` is the exit status (negative signal number if killed), None for timeout/infra.
    """

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    truncated: bool
    wall_s: float
    status: str
    detail: str = ""


@dataclass(frozen=True)
class _Limits:
    timeout_s: float
    memory_mb: int
    max_output_bytes: int
    nproc: int
    nofile: int
    fsize_mb: int
    disk_mb: int


def _validate(code: object, lim: _Limits) -> None:
    if not isinstance(code, str):
        raise TypeError(f"run_code: code must be str, got {type(code).__name__}")
    for name in ("timeout_s", "memory_mb", "max_output_bytes", "nproc", "nofile", "fsize_mb", "disk_mb"):
        if not getattr(lim, name) > 0:
            raise ValueError(f"run_code: {name} must be > 0, got {getattr(lim, name)!r}")


def _warm_bytecode_cache() -> None:
    """Import _child once on the host so its .pyc exists before the first sandbox starts."""
    import importlib

    importlib.import_module("ctpo.sandbox._child")


def _host_mode() -> str:
    return "root" if os.geteuid() == 0 else "userns"


_PROBED_OK: set[str] = set()


def _probe(mode: str) -> str:
    """Run a trivial program isolated; '' if it works, else the reason. Success is cached per process
    (a failure is retried next time, so one overloaded moment does not disable the sandbox for good)."""
    if mode in _PROBED_OK:
        return ""
    _warm_bytecode_cache()
    lim = _Limits(30.0, 512, 4096, 16, 64, 1, 1)
    res = _execute("print(7 * 6)", lim, mode)
    if res.status == "ok" and res.stdout.strip() == "42":
        _PROBED_OK.add(mode)
        return ""
    return res.detail or f"probe returned status={res.status} stdout={res.stdout[:100]!r}"


def isolation_mode(allow_unisolated: bool = False, isolation: str = "auto") -> str:
    """The mode run_code will use: 'root' | 'userns' | 'none'. Raises SandboxUnavailable (fails closed)."""
    if isolation not in ("auto", "root", "userns", "none"):
        raise ValueError(f"run_code: isolation must be auto|root|userns|none, got {isolation!r}")
    if isolation == "none" and not allow_unisolated:
        raise SandboxUnavailable("isolation='none' requires allow_unisolated=True")
    mode = _host_mode() if isolation == "auto" else isolation
    if mode == "none":
        return mode
    reason = _probe(mode)
    if not reason:
        return mode
    if not allow_unisolated:
        raise SandboxUnavailable(
            f"cannot isolate untrusted code ({mode} namespaces): {reason}. "
            "Enable user namespaces (sysctl user.max_user_namespaces) or pass allow_unisolated=True."
        )
    msg = f"SANDBOX NOT ISOLATED: {reason}; running untrusted code with rlimits only (no network/fs isolation)"
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    log.warning(msg)
    return "none"


def run_code(
    code: str,
    timeout_s: float = 10.0,
    *,
    memory_mb: int = 2048,
    max_output_bytes: int = 1 << 20,
    allow_unisolated: bool = False,
    nproc: int = 256,
    nofile: int = 256,
    fsize_mb: int = 64,
    disk_mb: int = 256,
    isolation: str = "auto",
) -> ExecResult:
    """Execute `code` (a Python program, like `python -c`) in a fresh sandbox; never raises for bad code.

    timeout_s: wall clock; CPU time is limited to ceil(timeout_s) + 1 s. memory_mb: address space.
    max_output_bytes: cap per stream (excess is read and dropped; `truncated` is set).
    nproc/nofile/fsize_mb: rlimits. RLIMIT_NPROC counts per uid: in root mode every sandbox runs as
    uid 65534, so concurrent sandboxes share the `nproc` budget (a fork bomb can briefly starve its
    neighbours' forks, never the host's); in userns mode the count is per user namespace.
    disk_mb: size of the private tmpfs work dir (in memory).
    isolation: 'auto' (root mode as root, else user namespaces), or force 'root'|'userns'|'none'.
    Raises SandboxUnavailable when isolation is impossible and allow_unisolated is False.
    """
    lim = _Limits(float(timeout_s), memory_mb, max_output_bytes, nproc, nofile, fsize_mb, disk_mb)
    _validate(code, lim)
    return _execute(code, lim, isolation_mode(allow_unisolated, isolation))


@functools.lru_cache(maxsize=None)
def _site_dirs() -> list[str]:
    import site

    return [d for d in site.getsitepackages() if os.path.isdir(d)]


def _spec(lim: _Limits, mode: str, workdir: str, status_fd: int) -> str:
    import marshal

    # Home directories (tokens, ~/.netrc, ~/.cache/huggingface) and /run (sockets: dbus, ssh-agent, docker)
    hide = sorted({"/root", "/run", os.path.expanduser("~")})
    return marshal.dumps({
        "mode": mode, "status_fd": status_fd, "site_dirs": _site_dirs(), "uid": _SANDBOX_UID, "hide": hide,
        "workdir": workdir,
        "cpu_s": math.ceil(lim.timeout_s) + 1, "memory_mb": lim.memory_mb, "nproc": lim.nproc,
        "nofile": lim.nofile, "fsize_mb": lim.fsize_mb, "disk_mb": lim.disk_mb,
    }).hex()  # same interpreter on both sides, so the marshal format matches


class _Capture:
    """Bytes from one stream, keeping the first `cap` and counting the rest."""

    def __init__(self, cap: int) -> None:
        self.cap, self.buf, self.dropped = cap, bytearray(), 0

    def add(self, data: bytes) -> None:
        room = self.cap - len(self.buf)
        self.buf += data[:room]
        self.dropped += max(0, len(data) - room)

    def text(self) -> str:
        return self.buf.decode("utf-8", errors="replace")


def _execute(code: str, lim: _Limits, mode: str) -> ExecResult:
    t0 = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="ctpo-sbx-") if mode == "none" else ""
    try:
        return _execute_in(code, lim, mode, workdir, t0)
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _execute_in(code: str, lim: _Limits, mode: str, workdir: str, t0: float) -> ExecResult:
    status_r, status_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _BOOT.format(dir=os.path.dirname(_CHILD)),
             _spec(lim, mode, workdir, status_w)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_ENV if mode != "none" else {**_ENV, "HOME": workdir, "TMPDIR": workdir}, cwd="/", start_new_session=True, pass_fds=(status_w,),
            preexec_fn=None, close_fds=True,
        )
    except OSError as e:
        os.close(status_r)
        return ExecResult("", "", None, False, False, time.monotonic() - t0, "infra", f"cannot start sandbox: {e}")
    finally:
        os.close(status_w)
    return _drive(proc, status_r, code.encode("utf-8", "surrogatepass"), lim, t0)


def _drive(proc: subprocess.Popen, status_r: int, code: bytes, lim: _Limits, t0: float) -> ExecResult:
    """Feed stdin, capture output, enforce the wall clock, reap; then classify the end."""
    out, err, status = _Capture(lim.max_output_bytes), _Capture(lim.max_output_bytes), bytearray()
    readers = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, status_r: None}
    stdin_fd, pending = proc.stdin.fileno(), memoryview(code)
    for fd in (*readers, stdin_fd):
        os.set_blocking(fd, False)
    deadline, timed_out, kill_at, killed = t0 + lim.timeout_s, False, None, False
    poller = select.poll()  # not select(): fds above 1024 are common inside a trainer process
    for fd in readers:
        poller.register(fd, select.POLLIN)
    poller.register(stdin_fd, select.POLLOUT)
    try:
        while readers:
            now = time.monotonic()
            if not timed_out and now >= deadline:
                timed_out, kill_at = True, now + _KILL_GRACE_S
            if timed_out and not killed:
                killed = _kill_init(status)
            if kill_at is not None and now >= kill_at:
                break  # no report of the init's pid, or a pipe still open: the group kill below ends it
            wait = (kill_at if timed_out else deadline) - now
            wait = min(wait, 0.01) if timed_out and not killed else wait
            for fd, ev in poller.poll(max(1, math.ceil(wait * 1000))):
                if fd == stdin_fd:
                    try:
                        pending = pending[os.write(stdin_fd, pending[: 1 << 16]) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending = pending[len(pending) :]
                    if not pending or ev & (select.POLLERR | select.POLLHUP):
                        poller.unregister(stdin_fd)
                        proc.stdin.close()
                        pending = None
                    continue
                data = os.read(fd, 1 << 16)
                if not data:
                    poller.unregister(fd)
                    del readers[fd]
                elif readers[fd] is None:
                    status += data
                else:
                    readers[fd].add(data)
    finally:
        if pending is not None:
            proc.stdin.close()
        os.close(status_r)
        if timed_out and not killed:
            _killpg(proc.pid)  # W never reported the init's pid: it is stuck in setup
        try:
            proc.wait(timeout=_KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    wall = time.monotonic() - t0
    res = _classify(status.decode("utf-8", "replace"), proc.returncode, timed_out, out, err, lim)
    exit_code, st, detail = res
    truncated = bool(out.dropped or err.dropped)
    if truncated:
        detail = (detail + "; " if detail else "") + f"output capped at {lim.max_output_bytes} bytes per stream"
    return ExecResult(out.text(), err.text(), exit_code, timed_out, truncated, wall, st, detail)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_init(status: bytearray) -> bool:
    """Timeout: SIGKILL the process W reported ("P <pid>": the namespace init, or U in mode none).

    Every process in the pid namespace dies with its init and is reaped inside it; W, still alive,
    reaps the init and exits. Killing W's whole group instead could orphan the init to a host pid 1
    that may never reap it (a zombie), so until W has reported the pid we keep waiting (False)."""
    pids = [int(line[2:]) for line in status.decode().splitlines() if line.startswith("P ")]
    if not pids:
        return False
    try:
        os.kill(pids[0], signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def _classify(status: str, returncode: int, timed_out: bool, out: _Capture, err: _Capture, lim: _Limits):
    """(exit_code, status, detail) from the child's report; every end maps to exactly one status."""
    lines = status.splitlines()
    fails = [ln[2:] for ln in lines if ln.startswith("F ")]
    ends = [ln.split() for ln in lines if ln.startswith("X ")]
    if fails:
        return None, "infra", f"sandbox setup failed: {fails[0]}"
    if timed_out:
        return None, "timeout", f"wall-clock limit of {lim.timeout_s:g} s exceeded; process tree killed"
    if not ends or ends[0][1] != "1":
        tail = err.text().strip().splitlines()[-1:] or [""]
        return None, "infra", f"sandbox exited ({returncode}) without running the code: {tail[0][:200]}"
    _, _, mem, how, val, rss_kb = ends[0]
    val, mem = int(val), mem == "1"
    last = (err.text().strip().splitlines() or [""])[-1]
    if how == "signal":
        name = signal.Signals(val).name if val in signal.Signals._value2member_map_ else str(val)
        if val == signal.SIGXCPU:
            return -val, "timeout", "CPU-time limit exceeded (SIGXCPU)"
        big = int(rss_kb) * 1024 >= (lim.memory_mb << 20) // 2
        if mem or (val in _MEMORY_SIGNALS and big):
            return -val, "memory", f"killed by {name} near the {lim.memory_mb} MB address-space limit"
        return -val, "error", f"killed by signal {name}"
    if mem or (val != 0 and last.split(":")[0].endswith("MemoryError")):
        return val, "memory", f"MemoryError (address-space limit {lim.memory_mb} MB)"
    if val == 0:
        return 0, "ok", ""
    return val, "error", f"exit code {val}" + (f": {last[:200]}" if last else "")
