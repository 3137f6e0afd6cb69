"""The syscall filter of model code: what U may not call, built with libseccomp (through `pyseccomp`, ctypes
over the system's libseccomp.so.2; apt package libseccomp2), never hand-written BPF.

Self-contained (no ctpo imports): the host compiles the filter (`host_filter`, libseccomp's own BPF via
`seccomp_export_bpf`); `_child.py` imports this module as a sibling and its user process `install`s it.
The filter allows by default and denies, with an errno (the program sees an ordinary OSError):

  memory held outside RLIMIT_AS and RSS   memfd_create, memfd_secret, userfaultfd
  asynchronous I/O past the filter        io_uring_setup / _enter / _register
  sockets other than AF_UNIX              socket, socketpair (netlink, packet, vsock: vsock leaves the
                                          network namespace towards the hypervisor)
  new scheduler autogroups                setsid, setpgid (each session is an autogroup: 64 sessions would
                                          get 64 shares of the CPU against an honest neighbour's one)
  kernel keyrings                         add_key, request_key, keyctl
  kernel attack surface / introspection   bpf, perf_event_open, ptrace, process_vm_readv/_writev, kcmp,
                                          pidfd_getfd, kexec_*, *_module, acct, syslog, quotactl, swapon/off,
                                          reboot, iopl, ioperm, open_by_handle_at, fanotify_init
  mounts and namespaces                   mount, umount2, pivot_root, chroot, unshare, setns, the new mount
                                          API (open_tree, move_mount, fs*), clone with a CLONE_NEW* flag;
                                          clone3 answers ENOSYS (its flags sit behind a pointer a filter
                                          cannot read; glibc then falls back to clone, which is checked)
  user xattrs (kernel memory on tmpfs)    setxattr, lsetxattr, fsetxattr
  growing pipe buffers                    fcntl(F_SETPIPE_SZ)

A syscall from another ABI (i386 `int 0x80`, x32) kills the process (libseccomp's bad-arch action).
"""
from __future__ import annotations

import errno
import functools
import os

AF_UNIX = 1
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
F_SETPIPE_SZ = 1031
NAMESPACE_CLONE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)

DENIED_EPERM = (
    "memfd_create", "memfd_secret", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "setsid", "setpgid",
    "add_key", "request_key", "keyctl",
    "bpf", "perf_event_open", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "acct", "syslog",
    "quotactl", "quotactl_fd", "swapon", "swapoff", "reboot", "iopl", "ioperm", "open_by_handle_at",
    "name_to_handle_at", "fanotify_init", "lookup_dcookie",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
)
DENIED_ENOTSUP = ("setxattr", "lsetxattr", "fsetxattr")
DENIED_ENOSYS = ("clone3",)


def build(pyseccomp):
    """A `pyseccomp.SyscallFilter` with the rules above (not loaded), and the names this libseccomp
    could not resolve (a syscall newer than the library; recorded in provenance)."""
    s = pyseccomp
    flt = s.SyscallFilter(s.ALLOW)
    unknown = []

    def deny(action, name, *args):
        if s.resolve_syscall(s.Arch.NATIVE, name) < 0:
            unknown.append(name)
            return
        flt.add_rule(action, name, *args)

    for name in DENIED_EPERM:
        deny(s.ERRNO(errno.EPERM), name)
    for name in DENIED_ENOTSUP:
        deny(s.ERRNO(errno.ENOTSUP), name)
    for name in DENIED_ENOSYS:
        deny(s.ERRNO(errno.ENOSYS), name)
    for name in ("socket", "socketpair"):
        deny(s.ERRNO(errno.EAFNOSUPPORT), name, s.Arg(0, s.NE, AF_UNIX))
    deny(s.ERRNO(errno.EPERM), "fcntl", s.Arg(1, s.EQ, F_SETPIPE_SZ))
    for flag in NAMESPACE_CLONE_FLAGS:  # clone(flags, ...): any namespace bit set
        deny(s.ERRNO(errno.EPERM), "clone", s.Arg(0, s.MASKED_EQ, flag, flag))
    return flt, unknown


def compiled(pyseccomp) -> bytes:
    """The filter as libseccomp compiles it (`seccomp_export_bpf`: struct sock_filter[], 8 bytes each).
    Compiled once per host process (`host_filter`); each sandbox installs these bytes (`install`)."""
    flt, _ = build(pyseccomp)
    r, w = os.pipe()  # the program is < 64 KiB: it fits the pipe's buffer
    try:
        flt.export_bpf(_Fd(w))
        os.close(w)
        w = -1
        chunks = []
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def install(program: bytes, ctypes, libc) -> None:
    """Load a compiled filter into this process (and its future children): no_new_privs, then
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &sock_fprog), as seccomp_load does. Raises OSError."""

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(program, len(program))
    prog = SockFprog(len(program) // 8, ctypes.addressof(buf))
    for args, what in (((PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)"),
                       ((PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "prctl(SET_SECCOMP)")):
        if libc.prctl(*args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")


@functools.lru_cache(maxsize=None)
def host_filter() -> tuple[str, dict]:
    """(the filter compiled by libseccomp, hex, or '' when none can be used; its provenance record).
    Compiled once per host process (nothing is loaded here); every sandbox's user process installs it,
    so the launchers never import pyseccomp (a bigger fork server costs every fork)."""
    try:
        import pyseccomp

        _, unknown = build(pyseccomp)
        program = compiled(pyseccomp)
        v = pyseccomp._libseccomp.seccomp_version  # struct {major, minor, micro} *
        v.restype = _version_pointer()
        ver = v().contents
    except Exception as e:  # ImportError (no pyseccomp), RuntimeError/OSError (no libseccomp.so.2)
        return "", {"mechanism": "none",
                    "detail": f"no syscall filter: pyseccomp over libseccomp unavailable ({type(e).__name__}: {e}); "
                              "install the apt package libseccomp2 and pyseccomp (pyproject)"}
    bindings = getattr(pyseccomp, "__version__", "?")
    return program.hex(), {
        "mechanism": f"seccomp: libseccomp {ver.major}.{ver.minor}.{ver.micro} via pyseccomp {bindings}",
        "denied": sorted({*DENIED_EPERM, *DENIED_ENOTSUP, *DENIED_ENOSYS}
                         - set(unknown)),
        "denied_arguments": ["socket/socketpair family != AF_UNIX", "clone with CLONE_NEW*", "fcntl F_SETPIPE_SZ"],
        "unknown_to_libseccomp": unknown,
    }


def _version_pointer():
    import ctypes

    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]

    return ctypes.POINTER(Version)
