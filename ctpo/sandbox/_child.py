"""The program that runs inside the sandbox: `python -I -S -c <import _child> SPEC`, code on stdin.

SPEC is a marshal-encoded dict in hex (marshal: builtin, unlike json, whose `re` import costs ~20 ms).

Self-contained on purpose (run with `-I`, so it cannot import `ctpo`). Three processes per sandbox:

  Z (forkserver(), optional)            pre-started by the host; forks one W per request (no interpreter
                                         start per sandbox); W's parent. Dies with the host.
  W (this script, or forked by Z)        unshare(mnt, net, ipc, uts, pid [, user]); forks I; relays signals
    I (pid 1 of the new pid namespace)   builds the sandbox's root filesystem, pivots into it; forks U;
                                         reaps every process; reports how U ended
      U (user code)                      drops privileges, sets rlimits, runs the code like `python -c`

Protocol on the status pipe (fd spec["status_fd"], one line per message, written by W and I only; U
closes it before user code runs and cannot reach it: I's fds are not ptrace-accessible to U):
  "P <host pid of I>"                   so the host can kill the namespace init on timeout
  "F <message>"                         setup failed before user code ran (the host reports "infra")
  "E <signal>"                          W received a signal from outside the sandbox (host: "infra")
  "X <started> <how> <value> <rss_kb>"  U ended: started 0/1 (U reached user code; U writes "S" on a
                                        private pipe and closes it before the first user instruction),
                                        how exit|signal, value, U's peak RSS (kernel rusage)
When I exits, the kernel kills every process left in the pid namespace (background children die).

The filesystem U sees (root and userns modes) is a fresh tmpfs holding only:
  /usr /bin /lib* /sbin  the host's system directories, read-only (shared libraries, /bin/sh)
  the interpreter        its binary, libpython and standard library, read-only, at their host paths,
                         with the interpreter's own site-packages covered by an empty tmpfs
  /sandbox/site-packages the allowed packages only (spec["packages"], named in rootfs.SANDBOX_PACKAGES)
  /etc                   passwd, group, hosts written here; ld.so.cache and localtime bound read-only
  /dev                   null zero full random urandom, fd/stdin/stdout/stderr links, a private /dev/shm
  /proc                  the new pid namespace's own (an empty tmpfs where a container forbids it)
  /tmp                   a private tmpfs of disk_mb (the work dir is /tmp/work)
No project tree, data, runs, home directories, /sys, /run or host devices. Paths in spec["hide"]
(the project root, home directories) that fall inside a bound tree are covered by an empty tmpfs.

Per-sandbox limits without a cgroup (the host adds a cgroup v2 when one is delegated, see runner):
  - a user namespace in which nested user namespaces are refused (user.max_user_namespaces = 0 there);
  - the private IPC namespace's SysV limits (kernel.shm*, msg*) bound shared memory to spec["shm_mb"];
    /dev/shm is a tmpfs of the same size; RLIMIT_MSGQUEUE 0 (no POSIX message queues);
  - RLIMIT_NPROC counts per (user namespace, uid), so each sandbox has its own process limit; as root,
    the sandbox also runs as its own host uid (spec["host_uid"], one per concurrent slot), which older
    kernels that count per host uid need (and host uid 0 would be exempt from RLIMIT_NPROC).

Isolation modes (spec["mode"]):
  root    host euid 0: W/I set up as real root (no user namespace yet); U becomes the slot's own host
          uid (spec["host_uid"]), enters a user namespace of its own (ns-root = that uid, nested user
          namespaces refused) and drops every capability.
  userns  unprivileged host: W's user namespace maps ns-root to the host user; U drops every capability.
  none    no namespaces (only when the caller explicitly allowed it): rlimits, scrubbed env, temp dir.
W and I die with their parent (PR_SET_PDEATHSIG SIGKILL, then a check that the parent is still the one
that started them), so a SIGKILLed trainer leaves nothing behind.
"""
import marshal
import os
import resource
import select  # imported before W gives up root (as root, lib-dynload may sit in a directory only root can enter)
import signal
import sys

try:  # siblings: this directory is on sys.path while the launcher imports _child
    import memwatch
    import seccomp_policy
except ImportError:  # imported as ctpo.sandbox._child on the host (runner warms the bytecode cache)
    from ctpo.sandbox import memwatch, seccomp_policy

_STATUS_FD = -1  # set from spec["status_fd"]
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # same number on x86_64 and aarch64 (generic syscall table)
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER = 1, 4, 38, 24, 36
LINUX_CAPABILITY_VERSION_3 = 0x20080522
WORKDIR = "/tmp/work"
NEWROOT = "/tmp"  # the new root's tmpfs is mounted here (in our mount namespace only), then pivoted into
DEVICES = ("null", "zero", "full", "random", "urandom")
EXTERNAL_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGPIPE")
_I_PID = 0
TMP_INODES, SHM_INODES = 16384, 1024  # inode limits of the private /tmp and /dev/shm (kernel memory)


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


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent (thread) dies; exit now if the parent is already gone."""
    ctypes, libc = _libc()
    _check(libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl(PDEATHSIG)", ctypes)
    if os.getppid() != parent:
        os._exit(125)


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
            try:
                st = os.statvfs(point)
            except OSError:
                continue
            keep = st.f_flag & (MS_NODEV | MS_NOEXEC)  # locked flags must be kept in a user namespace
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep
            ret = libc.mount(None, point.encode(), None, ctypes.c_ulong(flags), None)
            _check(ret, f"remount read-only {point}", ctypes)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _limit_ipc_and_userns(spec: dict) -> None:
    """In the sandbox's own user and IPC namespaces: no nested user namespaces, SysV IPC bounded."""
    shm_bytes = spec["shm_mb"] << 20
    own_userns = [("user/max_user_namespaces", 0)] if spec["mode"] == "userns" else []  # root: set by U
    for name, value in (*own_userns, ("kernel/shmmax", shm_bytes),
                        ("kernel/shmall", shm_bytes // 4096), ("kernel/shmmni", 64),
                        ("kernel/msgmni", 16), ("kernel/msgmnb", 65536), ("kernel/msgmax", 8192)):
        try:
            _write(f"/proc/sys/{name}", str(value))
        except OSError as e:
            raise SetupError(f"cannot set {name} in the sandbox's namespace: {e}") from None


def _build_root(libc, ctypes, spec: dict) -> None:
    """I: assemble the new root on a tmpfs (see the module doc), pivot into it, drop the old root."""
    binds = spec["binds"]  # [(host source, target inside, "dir" | "file")]
    fds = [os.open(src, os.O_PATH) for src, _, _ in binds]  # before NEWROOT (maybe /tmp) is covered
    dev_fds = [os.open(f"/dev/{d}", os.O_PATH) for d in DEVICES]
    r = NEWROOT
    _mount(libc, ctypes, "tmpfs", r, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4m")
    for (src, dst, kind), fd in zip(binds, fds):
        target = r + dst
        if kind == "dir":
            os.makedirs(target, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            if not os.path.lexists(target):
                open(target, "a").close()
        _mount(libc, ctypes, f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
        os.close(fd)
    for link, dest in spec["symlinks"]:
        if not os.path.lexists(r + link):
            os.symlink(dest, r + link)
    for path in spec["hide"]:  # host paths inside a bound tree that must stay invisible
        if os.path.isdir(r + path):
            _mount(libc, ctypes, "tmpfs", r + path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4k")
    os.makedirs(r + "/etc", mode=0o755, exist_ok=True)
    _write(r + "/etc/passwd", "root:x:0:0:root:/tmp/work:/bin/sh\nnobody:x:65534:65534:nobody:/tmp/work:/bin/sh\n")
    _write(r + "/etc/group", "root:x:0:\nnogroup:x:65534:\n")
    _write(r + "/etc/hosts", "127.0.0.1 localhost\n::1 localhost\n")
    os.makedirs(r + "/dev", mode=0o755)
    _mount(libc, ctypes, "tmpfs", r + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for name, fd in zip(DEVICES, dev_fds):
        open(f"{r}/dev/{name}", "a").close()
        _mount(libc, ctypes, f"/proc/self/fd/{fd}", f"{r}/dev/{name}", None, MS_BIND)
        os.close(fd)
    for name, dest in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                       ("stderr", "/proc/self/fd/2")):
        os.symlink(dest, f"{r}/dev/{name}")
    for d in ("/dev/shm", "/proc", "/tmp", "/.old"):
        os.makedirs(r + d, mode=0o755, exist_ok=True)
    try:
        _mount(libc, ctypes, "proc", r + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError:  # e.g. a container with masked /proc paths refuses a new proc in a userns
        _mount(libc, ctypes, "tmpfs", r + "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
    nr = SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise SetupError(f"pivot_root: unknown syscall number on {os.uname().machine}")
    _check(libc.syscall(ctypes.c_long(nr), r.encode(), (r + "/.old").encode()), "pivot_root", ctypes)
    os.chdir("/")
    _check(libc.umount2(b"/.old", MNT_DETACH), "umount old root", ctypes)
    os.rmdir("/.old")
    _readonly_tree(libc, ctypes, "/")
    if spec["mode"] == "root":  # U writes its own user namespace's maps (owner and caps checks still apply)
        _mount(libc, ctypes, None, "/proc", None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount(libc, ctypes, "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
           f"mode=1777,size={spec['disk_mb']}m,nr_inodes={TMP_INODES}")
    _mount(libc, ctypes, "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
           f"mode=1777,size={spec['shm_mb']}m,nr_inodes={SHM_INODES}")


def _enter_namespaces(spec: dict) -> None:
    """W: new mount, net, ipc, uts and pid namespaces, plus (userns mode) a user namespace mapping ns-root
    to the host user. Root mode stays in the host user namespace here; U makes its own (see _user)."""
    ctypes, libc = _libc()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID
    uid, gid = os.geteuid(), os.getegid()
    if spec["mode"] == "userns":
        flags |= CLONE_NEWUSER
    _check(libc.unshare(ctypes.c_int(flags)), "unshare", ctypes)
    if spec["mode"] == "userns":
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            _write(f"/proc/self/{name}", text)
        _die_with_parent(spec["host_pid"])  # credentials changed: PR_SET_PDEATHSIG was reset, set it again
    _mount(libc, ctypes, None, "/", None, MS_REC | MS_PRIVATE)


def _own_user_namespace(spec: dict) -> None:
    """U in root mode: become the slot's own host uid, then enter a user namespace of our own (ns-root =
    that uid) in which nested user namespaces are refused. Host uid 0 would be exempt from RLIMIT_NPROC,
    and without a user namespace of ours the host's user.max_user_namespaces would apply."""
    ctypes, libc = _libc()
    uid = spec["host_uid"]
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(DUMPABLE)", ctypes)  # /proc/self/*_map are ours
    _check(libc.unshare(ctypes.c_int(CLONE_NEWUSER)), "unshare(user)", ctypes)
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {uid} 1"),
                       ("sys/user/max_user_namespaces", "0")):
        _write(f"/proc/self/{name}" if "/" not in name else f"/proc/{name}", text)


def _drop_privileges(spec: dict) -> None:
    """U: drop every capability (U stays ns-root, i.e. the unprivileged host uid of W, with no caps)."""
    ctypes, libc = _libc()
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)", ctypes)
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
        resource.RLIMIT_MSGQUEUE: (0, 0),
    }
    for res, (soft, hard) in lim.items():
        resource.setrlimit(res, (soft, hard))


def _run_user_code(code: str, report_fd: int) -> int:
    """U, after setup: run `code` as `__main__`, with `python -c` exit semantics. Returns the exit code."""
    import types

    os.write(report_fd, b"S")
    os.close(report_fd)  # nothing user code does can change what I reports
    main = types.ModuleType("__main__")
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv = ["-c"]
    import gc

    gc.enable()
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
        e.__traceback__ = e.__traceback__.tb_next  # hide this frame: the traceback looks like `python -c`
        sys.excepthook(type(e), e, e.__traceback__)
        return 1


def _user(spec: dict, code: str, report_fd: int) -> int:
    """U: detach from the status pipe, drop privileges, limit resources, run."""
    os.close(_STATUS_FD)
    for sig in EXTERNAL_SIGNALS:  # W's/I's relays are not the user's: default dispositions
        signal.signal(getattr(signal, sig), signal.SIG_DFL)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if spec["mode"] != "none":
        os.makedirs(WORKDIR, mode=0o700, exist_ok=True)
        if spec["mode"] == "root":
            os.chown(WORKDIR, spec["host_uid"], spec["host_uid"])
            _own_user_namespace(spec)
        _drop_privileges(spec)
        sys.executable = spec["executable"]
    else:
        _die_with_parent(spec["parent"])
    os.chdir(spec["workdir"] if spec["mode"] == "none" else WORKDIR)
    _add_site_dirs(spec["site_dirs"])
    _set_limits(spec)
    if spec["seccomp"]:  # last step before user code: setup above may use what the filter denies
        seccomp_policy.install(bytes.fromhex(spec["seccomp"]), *_libc())
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    return _run_user_code(code, report_fd)


def _kill_orphans() -> None:
    """Mode none: SIGKILL and reap every remaining descendant (adopted by us as subreaper)."""
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
    """I: build the root, fork U, reap everything, report how U ended. Returns U's exit code in U, None in I."""
    ctypes, libc = _libc()
    if spec["mode"] != "none":
        _limit_ipc_and_userns(spec)
        _build_root(libc, ctypes, spec)
        if spec["watch"]:
            memwatch.check_proc()
    else:  # no pid namespace: adopt U's orphans ourselves so they can be killed and reaped below
        _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(CHILD_SUBREAPER)", ctypes)
        spec["parent"] = os.getpid()
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
    over = ""
    if spec["watch"]:  # no cgroup: I enforces one memory and descriptor budget over the namespace
        wstatus, usage, over = memwatch.wait_watching(pid, spec["memory_mb"] << 20, spec["sandbox_fds"])
    else:
        while True:  # pid 1 reaps orphans too; U is the one we report on
            done, wstatus, usage = os.wait3(0)
            if done == pid:
                break
    if over:
        _status("M " + over)
    if spec["mode"] == "none":
        _kill_orphans()
    os.set_blocking(r, False)  # U closed its end before user code; its children hold none
    report = b""
    try:
        while chunk := os.read(r, 4096):
            report += chunk
    except BlockingIOError:
        pass
    if not report.startswith(b"S"):
        msg = report[1:] if report.startswith(b"F") else b"the user process ended before running the code"
        _status("F " + msg.decode("utf-8", "replace"))
    else:
        how, val = ("signal", os.WTERMSIG(wstatus)) if os.WIFSIGNALED(wstatus) else ("exit", os.WEXITSTATUS(wstatus))
        _status(f"X 1 {how} {val} {usage.ru_maxrss}")
    return None


def _add_site_dirs(dirs: list[str]) -> None:
    """Started with -S: put the site-packages dirs on sys.path (with their .pth path lines).

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


def _relay(signum, _frame) -> None:
    """W: a signal from outside the sandbox (U cannot see or signal W). Report it, end the sandbox."""
    try:
        _status(f"E {signum}")
    except OSError:
        pass
    if _I_PID:
        try:
            os.kill(_I_PID, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main() -> None:
    global _STATUS_FD, _I_PID
    import gc

    gc.disable()  # W and I allocate little and live briefly; U turns it back on before the user's code
    spec = marshal.loads(bytes.fromhex(sys.argv[1]))
    _STATUS_FD = spec["status_fd"]
    for sig in EXTERNAL_SIGNALS:
        signal.signal(getattr(signal, sig), _relay)
    try:
        _die_with_parent(spec["host_pid"])
        code = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
        if spec["mode"] != "none":
            _enter_namespaces(spec)
            alive_r, alive_w = os.pipe()  # I sees EOF here once W is gone
            pid = os.fork()
            if pid != 0:  # W: wait for the namespace init, then leave
                os.close(alive_r)
                _I_PID = pid
                _status(f"P {pid}")
                while True:
                    try:
                        os.waitpid(pid, 0)
                        break
                    except ChildProcessError:
                        break
                os._exit(0)
            os.close(alive_w)
            _die_with_parent(0)  # I is pid 1: its parent, outside the namespace, shows as pid 0
            if select.select([alive_r], [], [], 0)[0]:  # EOF: W died before PDEATHSIG was armed
                os._exit(125)
            os.close(alive_r)
            for sig in EXTERNAL_SIGNALS:  # I: no handlers (signals from outside to a pid-ns init are
                signal.signal(getattr(signal, sig), signal.SIG_DFL)  # dropped; U's to I too)
        exit_code = _supervise(spec, code)
    except (SetupError, OSError) as e:
        _status(f"F {type(e).__name__}: {e}")
        os._exit(125)
    if exit_code is None:  # I (or W in mode none): done reporting
        os._exit(0)
    _finish(exit_code)  # U


def forkserver(sock_fd: int, host_pid: int) -> None:
    """Z: a pre-started launcher (`runner._ForkServer`). It forks one W per request, so a sandbox does not
    pay for W's interpreter start (~14 ms CPU). Request (SOCK_SEQPACKET, SCM_RIGHTS): SPEC hex, with the
    fds stdin, stdout, stderr, status and a per-request reply socket; Z answers "<pid>" on the reply
    socket, then, when W ends, its raw wait status, and closes it. Z dies with its host (PDEATHSIG) and
    ends when the host closes the control socket; every W dies with Z."""
    import fcntl
    import socket

    import gc

    gc.disable()
    _die_with_parent(host_pid)
    _libc()  # import ctypes and load libc now, once, for every W
    ctl = socket.socket(fileno=sock_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    replies: dict[int, socket.socket] = {}
    poller = select.poll()
    poller.register(ctl.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            events = []
        for fd, _ in events:
            if fd == wake_r:
                os.read(wake_r, 4096)
                continue
            msg, fds, _, _ = socket.recv_fds(ctl, 1 << 20, 5)
            if not msg:
                os._exit(0)  # the host is gone
            high = [fcntl.fcntl(f, fcntl.F_DUPFD_CLOEXEC, 100) for f in fds]
            for f in fds:
                os.close(f)
            reply = socket.socket(fileno=high[4])
            pid = os.fork()
            if pid == 0:
                _forked_w(msg, high, ctl, wake_r, wake_w)
            for f in high[:4]:
                os.close(f)
            replies[pid] = reply
            try:
                reply.send(str(pid).encode())
            except OSError:
                pass
        while replies:  # reap every W that ended, tell its host thread
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reply = replies.pop(pid, None)
            if reply is not None:
                try:
                    reply.send(str(status).encode())
                except OSError:
                    pass
                reply.close()


def _forked_w(msg: bytes, fds: list[int], ctl, wake_r: int, wake_w: int) -> None:
    """In a fresh child of Z: become W (own session, the request's stdio and status fd 3), run main()."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        ctl.close()
        os.close(wake_r)
        os.close(wake_w)
        os.setsid()
        for target, src in zip((0, 1, 2, 3), fds[:4]):
            os.dup2(src, target)  # dup2 targets are inheritable, sources (>= 100) close-on-exec
        os.closerange(4, 1 << 16)
        sys.argv = ["-c", msg.decode()]
        main()
    finally:
        os._exit(125)


if __name__ == "__main__":
    main()
