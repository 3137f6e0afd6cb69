"""Run one untrusted Python program in a fresh, isolated sandbox (`run_code`).

Host side of `_child.py` (read its docstring for what happens inside). Each call:
  - starts `python -I -S -c <import _child> SPEC` in a new session, with a fixed minimal environment (no secrets);
  - the child enters new user/mount/net/ipc/uts/pid namespaces, builds a root filesystem holding only the
    interpreter, its standard library, the packages in `SANDBOX_PACKAGES`, a private /tmp and a minimal
    /dev (see `rootfs.fs_plan`), drops privileges, sets rlimits and runs the code;
  - per-sandbox limits: a cgroup v2 of its own where one is delegated (`ctpo.sandbox.cgroup`), else the
    namespace fallback (bounded SysV/POSIX shm, no nested user namespaces, a process limit and, as root,
    a host uid per concurrent slot); `describe()` reports which is active (recorded in provenance);
  - the host enforces the wall-clock timeout by killing the namespace init (every process inside dies
    with it and is reaped inside), caps captured stdout/stderr at `max_output_bytes` each, and maps
    the end to one status from facts the code cannot forge: ok | error | timeout | memory | infra.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import select
import signal
import subprocess
import sys
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ctpo.sandbox import cgroup, memwatch, seccomp_policy
from ctpo.sandbox.limits import SandboxLimits
from ctpo.sandbox.outcome import Capture, classify
from ctpo.sandbox.rootfs import SANDBOX_SITE, fs_plan, site_dirs
from ctpo.sandbox.spawner import Spawner

_CHILD = str(Path(__file__).with_name("_child.py"))
# `python -c` importing _child (its .pyc is cached: compiling the source costs ~20 ms per start);
# the directory leaves sys.path again before any user code runs.
_BOOT = "import sys; sys.path.insert(0, {dir!r}); import _child; del sys.path[0]; _child.main()"
# As root, each concurrent sandbox runs as its own host uid, SLOT_UID_BASE + slot (systemd's "unused"
# range 1879048192-2147483646, never a login or container uid), so RLIMIT_NPROC is per sandbox even on
# kernels that count processes per host uid.
SLOT_UID_BASE = 1879048192
SHM_MB = 64  # /dev/shm tmpfs size and SysV shm total of one sandbox
_KILL_GRACE_S = 5.0
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
    lim = SandboxLimits(30.0, 512, 4096, 16, 64, 1, 1)
    res = _execute("print(7 * 6)", lim, mode)
    if res.status == "ok" and res.stdout.strip() == "42":
        _PROBED_OK.add(mode)
        return ""
    return res.detail or f"probe returned status={res.status} stdout={res.stdout[:100]!r}"


def describe(isolation: str = "auto") -> dict:
    """What confines sandboxes in this process, for the run's provenance: isolation mode, the limit
    mechanism (cgroup v2 path, or the namespace fallback and why no cgroup), and the visible packages.
    Does not start a sandbox; `isolation_probe` says whether the isolated mode was verified here."""
    parent, why = cgroup.detect()
    mode = _host_mode() if isolation == "auto" else isolation
    limits = {"mechanism": "cgroup2", "cgroup_parent": str(parent)} if parent else {
        "mechanism": "namespaces",
        "detail": "no delegated cgroup v2 (" + why + "): SysV/POSIX shm bounded by the IPC namespace's "
                  f"limits ({SHM_MB} MB), nested user namespaces refused, RLIMIT_NPROC per sandbox"
                  + (", a host uid per concurrent slot" if mode == "root" else ""),
    }
    if not parent:
        limits["detail"] += (f"; one budget of memory_mb over all of a sandbox's processes (Pss, sampled every "
                             f"{memwatch.PERIOD_S * 1000:g} ms by the namespace init) and of sandbox_fds open "
                             "descriptors; tmpfs mounts with inode limits")
    binds, _, _, _ = fs_plan()
    return {
        "isolation": mode,
        "isolation_probe": "ok" if mode in _PROBED_OK else "not run",
        "limits": limits,
        "syscall_filter": seccomp_policy.host_filter()[1],
        "packages": sorted({os.path.basename(d) for _, d, _ in binds if d.startswith(SANDBOX_SITE + "/")
                            and not d.endswith((".dist-info", ".libs"))}),
    }


def isolation_mode(allow_unisolated: bool = False, isolation: str = "auto") -> str:
    """The mode run_code will use: 'root' | 'userns' | 'none'. Raises SandboxUnavailable (fails closed)."""
    if isolation not in ("auto", "root", "userns", "none"):
        raise ValueError(f"run_code: isolation must be auto|root|userns|none, got {isolation!r}")
    if isolation == "none" and not allow_unisolated:
        raise SandboxUnavailable("isolation='none' requires allow_unisolated=True")
    mode = _host_mode() if isolation == "auto" else isolation
    if mode == "none":
        return mode
    if not seccomp_policy.host_filter()[0]:
        why = seccomp_policy.host_filter()[1]["detail"]
        if not allow_unisolated:
            raise SandboxUnavailable(f"cannot isolate untrusted code: {why}. Or pass allow_unisolated=True.")
        msg = f"SANDBOX WITHOUT SYSCALL FILTER: {why}"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        log.warning(msg)
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


def run_code(code: str, limits: SandboxLimits = SandboxLimits(), *, allow_unisolated: bool = False,
             isolation: str = "auto") -> ExecResult:
    """Execute `code` (a Python program, like `python -c`) in a fresh sandbox; never raises for bad code.

    limits: `SandboxLimits` (wall clock, memory, output cap, rlimits, tmpfs size).
    isolation: 'auto' (root mode as root, else user namespaces), or force 'root'|'userns'|'none'.
    Raises SandboxUnavailable when isolation is impossible and allow_unisolated is False.
    """
    if not isinstance(code, str):
        raise TypeError(f"run_code: code must be str, got {type(code).__name__}")
    if not isinstance(limits, SandboxLimits):
        raise TypeError(f"run_code: limits must be a SandboxLimits, got {type(limits).__name__}")
    return _execute(code, limits, isolation_mode(allow_unisolated, isolation))


class _Slots:
    """Small integers for concurrent sandboxes (one host uid each in root mode), lowest free first."""

    def __init__(self) -> None:
        self.lock, self.used = threading.Lock(), set()

    def take(self) -> int:
        with self.lock:
            slot = next(i for i in itertools.count() if i not in self.used)
            self.used.add(slot)
            return slot

    def give(self, slot: int) -> None:
        with self.lock:
            self.used.discard(slot)


_SLOTS = _Slots()


def _spec(lim: SandboxLimits, mode: str, workdir: str, status_w: int, slot: int, watch: bool,
          status_fd: int | None = None, host_pid: int | None = None) -> str:
    """W's instructions. watch: I enforces the memory/descriptor budget (isolated, no cgroup); status_fd:
    the status pipe's number in W; host_pid: W's parent (this process, or the fork server)."""
    import marshal

    binds, links, hide, exe = fs_plan()
    return marshal.dumps({
        "mode": mode, "status_fd": status_w if status_fd is None else status_fd,
        "host_pid": os.getpid() if host_pid is None else host_pid, "host_uid": SLOT_UID_BASE + slot,
        "site_dirs": site_dirs() if mode == "none" else [SANDBOX_SITE],
        "binds": list(binds), "symlinks": list(links), "hide": list(hide), "executable": exe,
        "workdir": workdir, "shm_mb": SHM_MB, "seccomp": seccomp_policy.host_filter()[0],
        "watch": watch, "sandbox_fds": lim.sandbox_fds,
        "cpu_s": lim.cpu_s, "memory_mb": lim.memory_mb, "nproc": lim.nproc,
        "nofile": lim.nofile, "fsize_mb": lim.fsize_mb, "disk_mb": lim.disk_mb,
    }).hex()  # same interpreter on both sides, so the marshal format matches


def _execute(code: str, lim: SandboxLimits, mode: str) -> ExecResult:
    t0 = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="ctpo-sbx-") if mode == "none" else ""
    slot = _SLOTS.take()
    group = None
    try:
        parent, _ = cgroup.detect() if mode != "none" else (None, "")
        if parent is not None:
            try:
                group = cgroup.SandboxCgroup(parent, (lim.memory_mb + lim.disk_mb + SHM_MB) << 20, lim.nproc,
                                             lim.cpus)
            except OSError as e:
                return ExecResult("", "", None, False, False, time.monotonic() - t0, "infra",
                                  f"cannot create the sandbox's cgroup under {parent}: {e}")
        return _execute_in(code, lim, mode, workdir, t0, slot, group)
    finally:
        if group is not None:
            group.remove()
        _SLOTS.give(slot)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)



class _ForkServer:
    """`_child.forkserver` in a pre-started process: launches W by fork instead of a new interpreter."""

    _BOOT_Z = ("import sys; sys.path.insert(0, {dir!r}); import _child; del sys.path[0]; "
               "_child.forkserver(int(sys.argv[1]), int(sys.argv[2]))")

    def __init__(self, spawner: Spawner) -> None:
        import socket

        self.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = spawner.call(lambda: subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", self._BOOT_Z.format(dir=os.path.dirname(_CHILD)),
                 str(theirs.fileno()), str(os.getpid())],
                stdin=subprocess.DEVNULL, env=_ENV, cwd="/", start_new_session=True,
                pass_fds=(theirs.fileno(),), close_fds=True))
        finally:
            theirs.close()
        self.lock = threading.Lock()
        self.owner = os.getpid()

    def alive(self) -> bool:
        """Running, and ours (a forked copy of this process starts its own fork server)."""
        return self.owner == os.getpid() and self.proc.poll() is None

    def launch(self, spec: str, stdin: int, stdout: int, stderr: int, status: int) -> _Launched:
        import socket

        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self.lock:
                socket.send_fds(self.ctl, [spec.encode()], [stdin, stdout, stderr, status, theirs.fileno()])
        except OSError as e:  # the server already died (e.g. EPIPE): the same failure as no reply, one message
            mine.close()
            raise OSError(f"the sandbox fork server did not launch ({e})") from e
        finally:
            theirs.close()
        mine.settimeout(30.0)
        try:
            pid = int(mine.recv(64) or b"0")
        except (OSError, ValueError):
            pid = 0
        if not pid:
            mine.close()
            raise OSError("the sandbox fork server did not launch")
        return _Launched(pid, mine)


class _Launched:
    """W started by the fork server: the part of subprocess.Popen that _drive uses."""

    def __init__(self, pid: int, reply) -> None:
        self.pid, self.reply, self.returncode = pid, reply, None
        self.stdin = self.stdout = self.stderr = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.reply.settimeout(timeout)
            try:
                data = self.reply.recv(64)
            except TimeoutError:
                raise subprocess.TimeoutExpired("sandbox", timeout) from None
            self.reply.close()
            # no status: the fork server died; W got SIGKILL from PR_SET_PDEATHSIG
            self.returncode = os.waitstatus_to_exitcode(int(data)) if data else -signal.SIGKILL
        return self.returncode


_FORKSERVER: _ForkServer | None = None
_FORKSERVER_LOCK = threading.Lock()
_SPAWNER: Spawner | None = None
USE_FORKSERVER = True  # isolated modes launch W through the fork server (False: a new interpreter each)


def _forkserver() -> _ForkServer:
    global _FORKSERVER, _SPAWNER
    with _FORKSERVER_LOCK:
        if _FORKSERVER is None or not _FORKSERVER.alive():
            if _SPAWNER is None or _FORKSERVER is not None and _FORKSERVER.owner != os.getpid():
                _SPAWNER = Spawner("ctpo-sandbox-spawner")  # threads do not survive fork(): a forked process needs its own
            _FORKSERVER = _ForkServer(_SPAWNER)
        return _FORKSERVER


def _launch_via_forkserver(spec_args, status_w: int) -> _Launched:
    """Pipes for W's stdio, one request to the fork server (restarted once if it died)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        for attempt in range(2):
            server = _forkserver()
            try:
                proc = server.launch(_spec(*spec_args, status_fd=3, host_pid=server.proc.pid),
                                     in_r, out_w, err_w, status_w)
                break
            except OSError:
                if attempt:
                    raise
                with _FORKSERVER_LOCK:
                    server.proc.kill()
                    server.proc.wait()
    except BaseException:
        for fd in (in_w, out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)
    proc.stdin, proc.stdout, proc.stderr = open(in_w, "wb", 0), open(out_r, "rb", 0), open(err_r, "rb", 0)
    return proc


def _execute_in(code: str, lim: SandboxLimits, mode: str, workdir: str, t0: float, slot: int,
                group: cgroup.SandboxCgroup | None) -> ExecResult:
    status_r, status_w = os.pipe()
    watch = mode != "none" and group is None
    try:
        if mode != "none" and USE_FORKSERVER:
            proc = _launch_via_forkserver((lim, mode, workdir, status_w, slot, watch), status_w)
        else:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT.format(dir=os.path.dirname(_CHILD)),
                 _spec(lim, mode, workdir, status_w, slot, watch)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=_ENV if mode != "none" else {**_ENV, "HOME": workdir, "TMPDIR": workdir}, cwd="/",
                start_new_session=True, pass_fds=(status_w,), close_fds=True,
            )
    except OSError as e:
        os.close(status_r)
        return ExecResult("", "", None, False, False, time.monotonic() - t0, "infra", f"cannot start sandbox: {e}")
    finally:
        os.close(status_w)
    if group is not None:  # W blocks reading its code from stdin until _drive feeds it: attach first
        try:
            group.attach(proc.pid)
        except OSError as e:
            _killpg(proc.pid)
            proc.wait()
            for f in (proc.stdin, proc.stdout, proc.stderr):
                f.close()
            os.close(status_r)
            return ExecResult("", "", None, False, False, time.monotonic() - t0, "infra",
                              f"cannot attach the sandbox to its cgroup: {e}")
    return _drive(proc, status_r, code.encode("utf-8", "surrogatepass"), lim, t0, group)


def _drive(proc: subprocess.Popen | _Launched, status_r: int, code: bytes, lim: SandboxLimits, t0: float,
           group: cgroup.SandboxCgroup | None = None) -> ExecResult:
    """Feed stdin, capture output, enforce the wall clock, reap; then classify the end."""
    out, err, status = Capture(lim.max_output_bytes), Capture(lim.max_output_bytes), bytearray()
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
    oom = group is not None and group.oom_killed()
    res = classify(status.decode("utf-8", "replace"), proc.returncode, timed_out, out, err, lim, oom)
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
