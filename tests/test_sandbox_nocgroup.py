"""Issue 21: the sandbox where no cgroup is delegated (this machine, most SLURM nodes). Each attack a model
under RL could make: a syscall filter refuses it, or one budget over the whole sandbox ends it as `memory`,
or it cannot starve a neighbour's program past its timeout.

The numbers asserted come from the kernel (errno values, /proc/self/status, the program's own counts), not
from the sandbox's report of itself.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from ctpo.sandbox import SandboxLimits, describe, run_code
from hang import HANG_S

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, **lim) -> dict:
    """Run `code` (which prints one JSON line last) in the sandbox; the parsed line."""
    r = run_code(code, SandboxLimits(timeout_s=lim.pop("timeout_s", 30.0), **lim))
    assert r.status == "ok", (r.status, r.detail, r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


# A syscall through libc: (return value, errno); -1 with errno when refused.
_SYSCALL = """
import ctypes, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
def sc(nr, *args):
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return [ret, ctypes.get_errno()]
"""


def test_the_filter_is_installed_in_model_code():
    out = _run("import json\nst = open('/proc/self/status').read()\n"
               "print(json.dumps({'seccomp': st.split('Seccomp:')[1].split()[0],"
               " 'nnp': st.split('NoNewPrivs:')[1].split()[0]}))")
    assert out == {"seccomp": "2", "nnp": "1"}  # 2: SECCOMP_MODE_FILTER


def test_memfd_io_uring_keyrings_bpf_perf_userfaultfd_ptrace_are_refused():
    code = _SYSCALL + """
buf = ctypes.create_string_buffer(256)
out = {}
try:
    os.memfd_create('x'); out['memfd_create'] = 0
except OSError as e:
    out['memfd_create'] = e.errno
out['io_uring_setup'] = sc(425, 8, ctypes.addressof(buf))[1]
out['add_key'] = sc(248, ctypes.addressof(ctypes.create_string_buffer(b'user')), ctypes.addressof(ctypes.create_string_buffer(b'k')), ctypes.addressof(buf), 1, -2)[1]
out['keyctl'] = sc(250, 0, -3, 0)[1]
out['request_key'] = sc(249, ctypes.addressof(ctypes.create_string_buffer(b'user')), ctypes.addressof(ctypes.create_string_buffer(b'k')), 0, -2)[1]
out['bpf'] = sc(321, 0, ctypes.addressof(buf), 64)[1]
out['perf_event_open'] = sc(298, ctypes.addressof(buf), 0, -1, -1, 0)[1]
out['userfaultfd'] = sc(323, 0)[1]
out['ptrace'] = sc(101, 0, 0, 0, 0)[1]
out['process_vm_readv'] = sc(310, os.getpid(), 0, 0, 0, 0, 0)[1]
print(json.dumps(out))
"""
    out = _run(code)
    assert out == dict.fromkeys(out, errno.EPERM) and len(out) == 10, out


def test_sockets_other_than_unix_are_refused():
    code = _SYSCALL + """
out = {}
for name, fam, typ in [('inet', 2, 1), ('inet6', 10, 1), ('netlink', 16, 3), ('packet', 17, 3),
                       ('vsock', 40, 1), ('bluetooth', 31, 1), ('unix', 1, 1)]:
    r = sc(41, fam, typ, 0)
    out[name] = r[1] if r[0] < 0 else 0
a, b = socket.socketpair()
a.sendall(b'x')
out['unix_pair'] = b.recv(1).decode()
out['inet_pair'] = sc(53, 2, 1, 0, ctypes.addressof(ctypes.create_string_buffer(8)))[1]
print(json.dumps(out))
"""
    out = _run(code)
    refused = {k: v for k, v in out.items() if k not in ("unix", "unix_pair")}
    assert refused == dict.fromkeys(refused, errno.EAFNOSUPPORT), out
    assert (out["unix"], out["unix_pair"]) == (0, "x")


def test_sessions_groups_mounts_and_namespaces_are_refused():
    code = _SYSCALL + """
out = {}
for name, fn in [('setsid', os.setsid), ('setpgid', lambda: os.setpgid(0, 0))]:
    try:
        fn(); out[name] = 0
    except OSError as e:
        out[name] = e.errno
out['unshare_user'] = sc(272, 0x10000000)[1]
out['unshare_net'] = sc(272, 0x40000000)[1]
out['clone_newuser'] = sc(56, 0x10000000 | 17, 0, 0, 0, 0)[1]
out['clone3'] = sc(435, 0, 0)[1]
out['mount'] = sc(165, 0, ctypes.addressof(ctypes.create_string_buffer(b'/tmp')), ctypes.addressof(ctypes.create_string_buffer(b'tmpfs')), 0, 0)[1]
out['umount2'] = sc(166, ctypes.addressof(ctypes.create_string_buffer(b'/tmp')), 2)[1]
out['setns'] = sc(308, 0, 0)[1]
out['pivot_root'] = sc(155, 0, 0)[1]
out['fsopen'] = sc(430, ctypes.addressof(ctypes.create_string_buffer(b'tmpfs')), 0)[1]
print(json.dumps(out))
"""
    out = _run(code)
    enosys = out.pop("clone3")
    assert out == dict.fromkeys(out, errno.EPERM), out
    assert enosys == errno.ENOSYS  # glibc then falls back to clone(), whose flags the filter reads


def test_xattrs_pipe_growth_and_tmpfs_inodes_are_bounded():
    code = """
import fcntl, json, os
out = {}
open('/tmp/work/f', 'w').close()
try:
    os.setxattr('/tmp/work/f', 'user.k', b'v' * 4000); out['setxattr'] = 0
except OSError as e:
    out['setxattr'] = e.errno
r, w = os.pipe()
try:
    fcntl.fcntl(w, 1031, 1 << 20); out['setpipe_sz'] = 0
except OSError as e:
    out['setpipe_sz'] = e.errno
made = 0
try:
    for i in range(60000):
        os.close(os.open(f'/tmp/work/{i}', os.O_CREAT | os.O_WRONLY, 0o600))
        made += 1
except OSError as e:
    out['inodes_errno'] = e.errno
out['files'] = made
print(json.dumps(out))
"""
    out = _run(code, timeout_s=60.0)
    assert (out["setxattr"], out["setpipe_sz"]) == (errno.ENOTSUP, errno.EPERM), out
    assert out["inodes_errno"] == errno.ENOSPC and 10000 < out["files"] < 16384, out


def test_python_c_threads_subprocess_and_the_allowed_packages_still_work():
    code = """
import json, subprocess, threading, multiprocessing as mp
import numpy, scipy.linalg, sympy, mpmath, networkx
res = {}
t = threading.Thread(target=lambda: res.setdefault('thread', sum(range(10))))
t.start(); t.join()
res['numpy'] = float(numpy.linalg.det(numpy.array([[2.0, 1.0], [1.0, 3.0]])))
res['scipy'] = float(scipy.linalg.inv([[4.0]])[0][0])
res['sympy'] = str(sympy.factor(sympy.Symbol('x') ** 2 - 1))
res['sh'] = subprocess.run(['/bin/sh', '-c', 'echo $((6*7))'], capture_output=True, text=True).stdout.strip()
with mp.get_context('fork').Pool(2) as pool:
    res['pool'] = sum(pool.map(abs, [-1, -2, -3]))
print(json.dumps(res))
"""
    out = _run(code, timeout_s=60.0)
    assert out == {"thread": 45, "numpy": pytest.approx(5.0), "scipy": 0.25, "sympy": "(x - 1)*(x + 1)",
                   "sh": "42", "pool": 6}


def test_memory_summed_over_processes_is_one_budget():
    """Four processes of 150 MB each, every one under RLIMIT_AS (256 MB), 600 MB together: killed as one."""
    code = """
import os, time
kids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = b'\\x01' * (150 << 20)
        time.sleep(60)
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
print('survived')
"""
    r = run_code(code, SandboxLimits(timeout_s=60.0, memory_mb=256))
    assert r.status == "memory" and "survived" not in r.stdout, r
    held = int(r.detail.split(" held ")[1].split(" MB")[0])
    assert 256 < held <= 4 * 160, r.detail


def test_forked_children_sharing_pages_are_not_counted_twice():
    """40 MB touched before forking 6 children: resident sets sum to 280 MB, proportional ones to ~40 MB."""
    code = """
import os, time
block = b'\\x01' * (40 << 20)
kids = []
for _ in range(6):
    pid = os.fork()
    if pid == 0:
        time.sleep(0.5)
        os._exit(len(block) >> 20)
    kids.append(pid)
print(sum(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in kids))
"""
    r = run_code(code, SandboxLimits(timeout_s=60.0, memory_mb=200))
    assert (r.status, r.stdout) == ("ok", "240\n"), r


def test_descriptors_summed_over_processes_are_one_budget():
    """Each process stays under RLIMIT_NOFILE (256); 8 of them hold 1,600 pipe ends together."""
    code = """
import os, time
for _ in range(7):
    if os.fork() == 0:
        break
ends = [fd for _ in range(100) for fd in os.pipe()]
time.sleep(60)
"""
    r = run_code(code, SandboxLimits(timeout_s=60.0))
    assert r.status == "memory" and "open descriptors" in r.detail, r
    assert 1024 < int(r.detail.split(" held ")[1].split()[0]) <= 8 * 210


BURN_MARK = f"ctpoburn{uuid.uuid4().hex[:10]}"
_BURNER = f"""
import os
for _ in range(64):
    if os.fork() == 0:
        try:
            os.setsid()  # a scheduler autogroup of its own, where allowed
        except OSError:
            pass
        os.execv('/bin/sh', ['sh', '-c', 'while :; do :; done', '{BURN_MARK}'])
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""
_HONEST = "n = 0\nfor i in range({n}):\n    n += i\nprint('done')"


def _burners() -> list[int]:
    """The burner's 64 spinning children (found by the unique mark in their argv)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if BURN_MARK.encode() in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0"):
                found.append(int(entry))
        except OSError:
            pass
    return found


def _honest_wall(n: int, timeout_s: float) -> tuple[str, float]:
    t0 = time.monotonic()
    r = run_code(_HONEST.format(n=n), SandboxLimits(timeout_s=timeout_s))
    return r.status, time.monotonic() - t0


def test_a_burner_with_64_sessions_cannot_push_a_neighbour_past_its_timeout():
    """Beside code whose 64 children each try setsid() (64 scheduler autogroups if it worked), an honest
    neighbour finishes within a bound generous for a loaded machine: its timeout is 5x the time it
    takes alone, measured just before on the same machine (on the unfiltered sandbox it timed out).
    The burner is waited for (all 64 children spinning) and ended by the test (SIGKILL to its children)."""
    n = 1_500_000
    alone = min(_honest_wall(n, 120.0)[1] for _ in range(2))
    burner: dict = {}
    t = threading.Thread(target=lambda: burner.setdefault("r", run_code(_BURNER, SandboxLimits(timeout_s=HANG_S))))
    t.start()
    deadline = time.monotonic() + HANG_S
    while len(_burners()) < 64 and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_burners()) == 64, "the burner's children never all started"
    status, beside = _honest_wall(n, max(5 * alone, 2.0))
    for pid in _burners():
        os.kill(pid, signal.SIGKILL)
    t.join()
    assert burner["r"].status == "ok", burner["r"]  # its children ended, it returned
    assert status == "ok", (alone, beside)
    assert beside < max(5 * alone, 2.0)


def test_provenance_records_the_filter():
    from ctpo.sandbox import seccomp_policy

    rec = describe()["syscall_filter"]
    assert rec["mechanism"].startswith("seccomp: libseccomp 2.") and "via pyseccomp 0.1.2" in rec["mechanism"]
    for name in ("memfd_create", "io_uring_setup", "setsid", "keyctl", "bpf", "unshare", "mount", "ptrace"):
        assert name in rec["denied"]
    assert set(rec["denied"]) | set(rec["unknown_to_libseccomp"]) == {
        *seccomp_policy.DENIED_EPERM, *seccomp_policy.DENIED_ENOTSUP, *seccomp_policy.DENIED_ENOSYS}


_NO_LIBSECCOMP = """
import sys, warnings
sys.modules['pyseccomp'] = None  # as on a host without pyseccomp / libseccomp.so.2
from ctpo.sandbox import SandboxUnavailable, describe, run_code
try:
    run_code('print(1)')
    print('RAN')
except SandboxUnavailable as e:
    print('closed:', e)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    r = run_code('print(open("/proc/self/status").read().split("Seccomp:")[1].split()[0])', allow_unisolated=True)
print('lowered:', r.status, r.stdout.strip(), any('WITHOUT SYSCALL FILTER' in str(x.message) for x in w))
print('provenance:', describe()['syscall_filter']['mechanism'])
"""


def test_missing_libseccomp_fails_closed_unless_isolation_is_lowered():
    out = subprocess.run([sys.executable, "-c", _NO_LIBSECCOMP], capture_output=True, text=True, timeout=HANG_S,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert lines[0].startswith("closed: cannot isolate untrusted code: no syscall filter") and "libseccomp2" in lines[0]
    assert lines[1] == "lowered: ok 0 True"  # explicitly lowered: it runs, unfiltered, with a warning
    assert lines[2] == "provenance: none"


def test_a_delegated_cgroup_also_gets_cpu_max(tmp_path):
    """Where the parent offers the cpu controller to its children, a sandbox's cgroup gets cpu.max =
    cpus x period (logic on a fake tree: no cgroup v2 is delegated on this machine)."""
    from ctpo.sandbox import cgroup as cg

    with_cpu, without = tmp_path / "a", tmp_path / "b"
    for d, sub in ((with_cpu, "cpu memory pids"), (without, "memory pids")):
        d.mkdir()
        (d / "cgroup.controllers").write_text("cpu memory pids")
        (d / "cgroup.subtree_control").write_text(sub)
    group = cg.SandboxCgroup(with_cpu, 64 << 20, 8, cpus=1.5)
    assert (group.path / "cpu.max").read_text() == f"{int(1.5 * cg.CPU_PERIOD_US)} {cg.CPU_PERIOD_US}"
    assert not (cg.SandboxCgroup(without, 64 << 20, 8, cpus=1.5).path / "cpu.max").exists()
