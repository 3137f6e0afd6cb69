"""The program that runs inside the sandbox: `python -I -S _child.py SPEC`, code on stdin.

SPEC is a marshal-encoded dict in hex (marshal: builtin, unlike json, whose `re` import costs ~20 ms).

Self-contained on purpose (run with `-I`, so it cannot import `ctpo`). Three processes:

  W (this script, started by the host)  unshare(mnt, net, ipc, uts, pid [, user]); mounts; forks I
    I (pid 1 of the new pid namespace)   mounts /proc; forks U; reaps every process; reports U's end
      U (user code)                      drops privileges, sets rlimits, runs the code like `python -c`

Started as `python -I -S`: site-packages come from spec["site_dirs"] (see _add_site_dirs).

Protocol on the status pipe (fd spec["status_fd"], one line per message, written by W and I only; U closes it):
  "P <host pid of I>"                         so the host can kill the namespace init on timeout
  "F <message>"                               setup failed (the host reports status "infra")
  "X <started> <mem> <how> <value> <rss_kb>"  U ended: started 0/1 (U reached user code),
                                              mem 0/1 (uncaught MemoryError), how exit|signal
When I exits, the kernel kills every process left in the pid namespace (background children die).

Isolation modes (spec["mode"]):
  root    host euid 0: no user namespace; U switches to uid/gid spec["uid"] (65534, nobody).
  userns  unprivileged host: a user namespace maps ns-root to the host user; U drops every capability.
  none    no namespaces (only when the caller explicitly allowed it): rlimits, scrubbed env, temp dir.
In root/userns, /proc is the new pid namespace's own (or, where a container forbids that, an empty
tmpfs: the host's processes are never visible). Every mount is made read-only (recursive
mount_setattr) and nosuid; /tmp and /dev/shm get fresh tmpfs; the host's home directories are hidden
behind a tmpfs, re-exposing only the interpreter's own prefix/sys.path entries (read-only), so U can
import but not read ~/.netrc etc. Mode none adds PR_SET_CHILD_SUBREAPER so U's orphans are still
killed and reaped.
"""
import marshal
import os
import resource
import sys

_STATUS_FD = -1  # set from spec["status_fd"]
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # same number on x86_64 and aarch64 (generic syscall table)
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER = 38, 24, 36
LINUX_CAPABILITY_VERSION_3 = 0x20080522
WORKDIR = "/tmp/work"


class SetupError(Exception):
    """A namespace/mount/privilege step failed: the sandbox cannot run (status "infra")."""


def _status(line: str) -> None:
    os.write(_STATUS_FD, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))


def _libc():
    import ctypes  # only the isolated modes need it

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str, ctypes) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)} (errno {err})")


def _mount(libc, ctypes, src, target, fstype, flags: int, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    ret = libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _check(ret, f"mount {fstype or src} on {target}", ctypes)


def _readonly_tree(libc, ctypes, path: str) -> None:
    """Make `path` and every mount below it read-only + nosuid, in this mount namespace only."""

    class MountAttr(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]

    attr = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    ret = libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), path.encode(),
        ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if ret == 0:
        return
    if ctypes.get_errno() != 38:  # ENOSYS: kernel < 5.12, fall back to remounting each mount
        _check(ret, f"mount_setattr(read-only) on {path}", ctypes)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in points:
        if point == path or point.startswith(path.rstrip("/") + "/"):
            st = os.statvfs(point)
            keep = st.f_flag & (MS_NODEV | MS_NOEXEC)  # locked flags must be kept in a user namespace
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep
            ret = libc.mount(None, point.encode(), None, ctypes.c_ulong(flags), None)
            _check(ret, f"remount read-only {point}", ctypes)


def _exposed_paths() -> list[str]:
    """The interpreter's own files (prefixes, sys.path), resolved, outermost first."""
    cands = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    cands |= {p for p in sys.path if p}
    cands.add(os.path.dirname(sys.executable))
    real = sorted({os.path.realpath(p) for p in cands if os.path.exists(p)})
    out: list[str] = []
    for p in real:
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def _hide(libc, ctypes, hidden: list[str]) -> None:
    """Cover each hidden dir with an empty tmpfs, re-binding (read-only) the interpreter paths in it."""
    exposed = _exposed_paths()
    for h in sorted({os.path.realpath(p) for p in hidden}):
        if h == "/" or not os.path.isdir(h):
            continue
        inside = [p for p in exposed if p.startswith(h.rstrip("/") + "/")]
        fds = [(p, os.open(p, os.O_PATH)) for p in inside]
        _mount(libc, ctypes, "tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for p, fd in fds:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(p, mode=0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(p), mode=0o755, exist_ok=True)
                open(p, "a").close()
            _mount(libc, ctypes, f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
            os.close(fd)


def _enter_namespaces(spec: dict) -> None:
    """W: new namespaces, private read-only mount tree, fresh writable /tmp and /dev/shm."""
    ctypes, libc = _libc()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID
    uid, gid = os.geteuid(), os.getegid()
    if spec["mode"] == "userns":
        flags |= CLONE_NEWUSER
    _check(libc.unshare(ctypes.c_int(flags)), "unshare", ctypes)
    if spec["mode"] == "userns":
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    _mount(libc, ctypes, None, "/", None, MS_REC | MS_PRIVATE)
    _hide(libc, ctypes, spec["hide"])
    _readonly_tree(libc, ctypes, "/")
    _mount(libc, ctypes, "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={spec['disk_mb']}m")
    if os.path.isdir("/dev/shm"):
        _mount(libc, ctypes, "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m")


def _drop_privileges(spec: dict) -> None:
    """U: give up root. root mode: setuid to an unprivileged uid. userns mode: drop every capability."""
    ctypes, libc = _libc()
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)", ctypes)
    if spec["mode"] == "root":
        os.setgroups([])
        os.setgid(spec["uid"])
        os.setuid(spec["uid"])
        return
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:  # EINVAL: no such cap
            _check(-1, f"prctl(CAPBSET_DROP, {cap})", ctypes)
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words, all zero
    _check(libc.capset(header, data), "capset(0)", ctypes)


def _set_limits(spec: dict) -> None:
    cpu = int(spec["cpu_s"])
    lim = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_AS: (spec["memory_mb"] << 20,) * 2,
        resource.RLIMIT_NPROC: (spec["nproc"],) * 2,
        resource.RLIMIT_NOFILE: (spec["nofile"],) * 2,
        resource.RLIMIT_FSIZE: (spec["fsize_mb"] << 20,) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for res, (soft, hard) in lim.items():
        resource.setrlimit(res, (soft, hard))


def _run_user_code(code: str, report_fd: int) -> int:
    """U, after setup: run `code` as `__main__`, with `python -c` exit semantics. Returns the exit code."""
    import types

    os.write(report_fd, b"S")
    main = types.ModuleType("__main__")
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv = ["-c"]
    try:
        exec(compile(code, "<string>", "exec"), main.__dict__)
        return 0
    except SystemExit as e:
        if e.code is None:
            return 0
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)
        return 1
    except BaseException as e:
        if isinstance(e, MemoryError):
            os.write(report_fd, b"M")
        e.__traceback__ = e.__traceback__.tb_next  # hide this frame: the traceback looks like `python -c`
        sys.excepthook(type(e), e, e.__traceback__)
        return 1


def _user(spec: dict, code: str, report_fd: int) -> int:
    """U: detach from the status pipe, drop privileges, limit resources, run."""
    os.close(_STATUS_FD)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if spec["mode"] != "none":
        os.makedirs(WORKDIR, mode=0o700, exist_ok=True)
        if spec["mode"] == "root":
            os.chown(WORKDIR, spec["uid"], spec["uid"])
        _drop_privileges(spec)
    os.chdir(spec["workdir"] if spec["mode"] == "none" else WORKDIR)
    _set_limits(spec)
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    return _run_user_code(code, report_fd)


def _kill_orphans() -> None:
    """Mode none: SIGKILL and reap every remaining descendant (adopted by us as subreaper)."""
    import signal

    while True:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            kids = [int(p) for p in f.read().split()]
        if not kids:
            return
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in kids:
            try:
                os.wait()
            except ChildProcessError:
                break


def _supervise(spec: dict, code: str) -> int | None:
    """I: fork U, reap everything, report how U ended. Returns U's exit code in U, None in I."""
    ctypes, libc = _libc()
    if spec["mode"] != "none":
        try:
            _mount(libc, ctypes, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except SetupError:  # e.g. a container with masked /proc paths refuses a new proc in a userns
            _mount(libc, ctypes, "tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
    else:  # no pid namespace: adopt U's orphans ourselves so they can be killed and reaped below
        _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(CHILD_SUBREAPER)", ctypes)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            return _user(spec, code, w)
        except SetupError as e:
            os.write(w, b"F" + str(e).encode()[:500])
            os._exit(126)
        except OSError as e:  # setuid/setrlimit/chdir failed before the user code started
            os.write(w, b"F" + f"{type(e).__name__}: {e}".encode()[:500])
            os._exit(126)
    if spec["mode"] == "none":
        _status(f"P {pid}")
    os.close(w)
    while True:  # pid 1 reaps orphans too; U is the one we report on
        done, wstatus, usage = os.wait3(0)
        if done == pid:
            break
    if spec["mode"] == "none":
        _kill_orphans()
    os.set_blocking(r, False)  # U's own descendants may still hold the write end: never wait for EOF
    report = b""
    try:
        while chunk := os.read(r, 4096):
            report += chunk
    except BlockingIOError:
        pass
    if b"F" in report and b"S" not in report:
        _status("F " + report[report.index(b"F") + 1 :].decode("utf-8", "replace"))
    else:
        how, val = ("signal", os.WTERMSIG(wstatus)) if os.WIFSIGNALED(wstatus) else ("exit", os.WEXITSTATUS(wstatus))
        _status(f"X {int(b'S' in report)} {int(b'M' in report)} {how} {val} {usage.ru_maxrss}")
    return None


def _add_site_dirs(dirs: list[str]) -> None:
    """Started with -S: put the host interpreter's site-packages (and .pth path lines) on sys.path.

    .pth `import` lines are skipped: they install editable-package finders and setuptools shims that
    user code does not need, and processing them costs ~30 ms per execution."""
    for d in dirs:
        if not os.path.isdir(d) or d in sys.path:
            continue
        sys.path.append(d)
        for name in sorted(n for n in os.listdir(d) if n.endswith(".pth")):
            with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
                for line in f:
                    line = line.rstrip()
                    if line and not line.startswith(("#", "import ", "import\t")):
                        path = os.path.join(d, line)
                        if os.path.isdir(path) and path not in sys.path:
                            sys.path.append(path)


def _finish(code: int) -> None:
    """U's exit, as `python -c` ends: join non-daemon threads, run atexit, flush; skip module teardown."""
    threading = sys.modules.get("threading")
    if threading is not None:
        for t in threading.enumerate():
            if t is not threading.main_thread() and not t.daemon:
                t.join()
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code & 0xFF)


def main() -> None:
    global _STATUS_FD
    spec = marshal.loads(bytes.fromhex(sys.argv[1]))
    _STATUS_FD = spec["status_fd"]
    _add_site_dirs(spec["site_dirs"])
    code = sys.stdin.buffer.read().decode("utf-8")
    try:
        if spec["mode"] != "none":
            _enter_namespaces(spec)
            pid = os.fork()
            if pid != 0:  # W: wait for the namespace init, then leave
                _status(f"P {pid}")
                os.waitpid(pid, 0)
                os._exit(0)
        exit_code = _supervise(spec, code)
    except (SetupError, OSError) as e:
        _status(f"F {type(e).__name__}: {e}")
        os._exit(125)
    if exit_code is None:  # I (or W in mode none): done reporting
        os._exit(0)
    _finish(exit_code)  # U


if __name__ == "__main__":
    main()
