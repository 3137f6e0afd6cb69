"""Issue 12: a policy that looks for shortcuts finds nothing to read, cannot escape the per-sandbox limits,
cannot outlive the trainer and cannot choose its own outcome.

Every case runs twice: as the current user (root here: the sandbox's "root" mode, a user namespace whose
uid 65534 maps to a host uid of its own per concurrent slot) and as an unprivileged user (uid 65534 via
setpriv: the "userns" mode, as on a cluster node). The unprivileged variant needs root (to switch user),
setpriv, a system python3 and unprivileged user namespaces; it is skipped with the reason otherwise.
The cgroup v2 variant needs a delegated cgroup v2 with memory+pids (skipped here when the machine has
none; the namespace fallback is what these tests then check).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyseccomp
import pytest
from hang import HANG_S

from ctpo.sandbox import SandboxLimits, SandboxPool, rootfs, run_many, runner
from ctpo.sandbox import cgroup as cg

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]
MARK = f"ctpoint{uuid.uuid4().hex[:10]}"
NUM = f"{uuid.uuid4().int % 9000 + 1000}{os.getpid()}"  # `sleep NUM.x` is a valid, unique argv for hunting


def _marker(who: str, case: int) -> str:
    return f"{NUM}.{case}{int(who == 'current')}"
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")
UNPRIV_OK = os.geteuid() == 0 and bool(shutil.which("setpriv")) and bool(SYSTEM_PYTHON)
WHO = pytest.mark.parametrize("who", [
    "current",
    pytest.param("unprivileged", marks=pytest.mark.skipif(
        not UNPRIV_OK, reason="needs root (to become uid 65534), setpriv and a system python3")),
])
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000

DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from ctpo.sandbox import SandboxLimits, run_many
req = json.loads(sys.stdin.read())
rs = run_many(req["codes"], concurrency=req["concurrency"], limits=SandboxLimits(**req["kw"]))
print(json.dumps([r.__dict__ for r in rs]))
"""


@pytest.fixture(scope="module")
def pkg():
    """A world-readable copy of ctpo.sandbox for the unprivileged user (the checkout may sit under /root)."""
    dst = Path("/var/tmp") / f"{MARK}-pkg"
    shutil.copytree(REPO / "ctpo" / "sandbox", dst / "ctpo" / "sandbox", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "ctpo" / "__init__.py", dst / "ctpo" / "__init__.py")
    shutil.copy(pyseccomp.__file__, dst / "pyseccomp.py")  # the syscall filter's bindings (one file)
    for d in [dst, *dst.rglob("*")]:
        d.chmod(0o755 if d.is_dir() else 0o644)
    yield dst
    shutil.rmtree(dst)


def _unpriv_argv(pkg: Path, *args: str) -> list[str]:
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, *args]


def run(who: str, codes: list[str], pkg: Path, concurrency: int = 1, **kw) -> list[dict]:
    kw.setdefault("timeout_s", 120.0)  # a hang guard, not a speed limit: a loaded machine is slow
    if who == "current":
        return [r.__dict__ for r in run_many(codes, concurrency=concurrency, limits=SandboxLimits(**kw))]
    out = subprocess.run(_unpriv_argv(pkg, "-c", DRIVER, str(pkg)), capture_output=True, text=True,
                         cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}, timeout=HANG_S,
                         input=json.dumps({"codes": codes, "concurrency": concurrency, "kw": kw}))
    if "SandboxUnavailable" in out.stderr:
        pytest.skip(f"unprivileged user namespaces unavailable: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _pids_with(marker: str) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except OSError:
            pass
    return found


def _sleepers(marker: str) -> list[int]:
    """Processes running exactly `sleep <marker>` (not the test programs that mention the marker)."""
    want = b"sleep\0" + marker.encode() + b"\0"
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{entry}/cmdline").read_bytes() == want:
                found.append(int(entry))
        except OSError:
            pass
    return found


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _wait_for(pred, timeout_s: float = HANG_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


# ------------------------------------------------------------------------------------------ nothing to find

@WHO
def test_nothing_to_find(who, pkg):
    venv = os.path.realpath(sys.prefix)
    probes = [str(REPO), str(REPO / "pyproject.toml"), str(REPO / "data"), str(REPO / "runs"), venv, "/work",
              "/home", "/root/.ssh", "/run", "/sys", "/var", "/opt", "/mnt", str(Path.home())]
    code = f"""
import os, sys, json
probes = {probes!r}
seen = {{p: os.path.exists(p) for p in probes}}
files = []
for top in sorted(os.listdir('/')):
    if top in ('proc', 'usr', 'bin', 'sbin', 'lib', 'lib32', 'lib64', 'libx32'):  # system files
        continue
    for root, dirs, names in os.walk('/' + top):
        files += [os.path.join(root, n) for n in names]
print(json.dumps({{"seen": seen, "path": sys.path, "dev": sorted(os.listdir('/dev')), "top": sorted(os.listdir('/')),
                  "parquet": [f for f in files if f.endswith(('.parquet', '.jsonl', '.json', '.pt', '.safetensors'))],
                  "etc": sorted(os.listdir('/etc'))}}))
"""
    r = run(who, [code], pkg)[0]
    assert r["status"] == "ok", r
    got = json.loads(r["stdout"])
    # an interpreter installed in a home directory (pyenv under /root here) keeps its own path: the
    # directories above it exist, holding nothing else
    interp = [dst for _, dst, _ in rootfs.fs_plan()[0] if not dst.startswith(("/usr", "/etc", rootfs.SANDBOX_SITE))]
    assert [p for p, exists in got["seen"].items() if exists and not any(rootfs.inside(i, p) for i in interp)] == []
    assert [p for p in got["path"] if p.startswith((str(REPO), venv, "/work", "/home"))] == []
    assert who != "current" or got["path"][-1] == rootfs.SANDBOX_SITE
    assert got["dev"] == ["fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "urandom", "zero"]
    assert set(got["top"]) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp", "usr",
                               "sandbox", "root"}, got["top"]  # root: only the interpreter's prefix, if it lives there
    assert got["etc"] == ["group", "hosts", "ld.so.cache", "localtime", "passwd"] or set(got["etc"]) <= {
        "group", "hosts", "ld.so.cache", "localtime", "passwd"}
    allowed = (*interp, rootfs.SANDBOX_SITE)  # the standard library's and packages' own test data
    assert [f for f in got["parquet"] if f.endswith((".parquet", ".pt", ".safetensors"))
            or not any(rootfs.inside(f, a) for a in allowed)] == []
    if who == "current":
        for p, exists in got["seen"].items():
            if exists:
                r2 = run(who, [f"import os\nprint(sorted(os.listdir({p!r})))"], pkg)[0]
                below = sorted({i[len(p):].lstrip("/").split("/")[0] for i in interp if rootfs.inside(i, p)})
                assert r2["stdout"] == f"{below}\n", (p, r2)


def test_only_the_allowed_packages_are_importable():
    code = ("import importlib.util as u\n"
            "print([m for m in ('numpy', 'sympy', 'torch', 'ctpo', 'pandas', 'verl', 'math_verify', 'wandb') "
            "if u.find_spec(m)])")
    r = run("current", [code], None)[0]
    allowed = [m for m in ("numpy", "sympy") if m in rootfs.SANDBOX_PACKAGES and rootfs.package_paths(m, rootfs.host_site_dirs())]
    assert (r["status"], r["stdout"]) == ("ok", f"{allowed}\n")


@WHO
def test_dev_null_and_random_work_and_host_devices_do_not_exist(who, pkg):
    code = ("import os\nopen('/dev/null', 'w').write('x')\nprint(len(open('/dev/urandom', 'rb').read(8)), "
            "open('/dev/zero', 'rb').read(2), [d for d in ('/dev/nvidia0', '/dev/nvidiactl', '/dev/sda', '/dev/mem', "
            "'/dev/kmsg', '/dev/tty') if os.path.exists(d)])")
    r = run(who, [code], pkg)[0]
    assert (r["status"], r["stdout"]) == ("ok", "8 b'\\x00\\x00' []\n"), r


# ------------------------------------------------------------------------------------------ limits per sandbox

SHM_ATTACK = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
seg, held = 16 << 20, 0
for _ in range(200):  # asks for 3.2 GB of SysV shared memory, touching every page
    sid = libc.shmget(0, ctypes.c_size_t(seg), 0o1600)
    if sid < 0:
        break
    addr = libc.shmat(sid, None, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        break
    ctypes.memset(addr, 1, seg)
    held += seg
big = libc.shmget(0, ctypes.c_size_t(3 << 30), 0o1600)
posix = 0
try:
    with open('/dev/shm/fill', 'wb') as f:
        for _ in range(200):
            f.write(b'x' * (16 << 20))
            posix += 16
except OSError as e:
    print('posix stopped', errno.errorcode[e.errno])
print(held >> 20, big, posix)
"""


@WHO
def test_shared_memory_is_bounded_per_sandbox(who, pkg):
    r = run(who, [SHM_ATTACK], pkg, memory_mb=1024)[0]
    assert r["status"] == "ok", r
    lines = r["stdout"].split("\n")
    held, big, posix = map(int, lines[1].split())
    assert lines[0] in ("posix stopped ENOSPC", "posix stopped EFBIG")
    assert held <= runner.SHM_MB and big == -1 and posix <= runner.SHM_MB


NESTED = f"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
rc = libc.unshare({CLONE_NEWUSER | CLONE_NEWNS})
print(rc, errno.errorcode.get(ctypes.get_errno()))
rc = libc.unshare({CLONE_NEWUSER})
print(rc, errno.errorcode.get(ctypes.get_errno()))
rc = libc.mount(b'tmpfs', b'/tmp/work', b'tmpfs', 0, b'size=3g')
print(rc, errno.errorcode.get(ctypes.get_errno()))
"""


@WHO
def test_nested_user_namespaces_and_big_tmpfs_are_refused(who, pkg):
    r = run(who, [NESTED], pkg)[0]
    assert r["status"] == "ok", r
    lines = r["stdout"].splitlines()
    assert lines[0] in ("-1 ENOSPC", "-1 EPERM") and lines[1] in ("-1 ENOSPC", "-1 EPERM"), lines
    assert lines[2] == "-1 EPERM"


# the bomb exhausts its own process limit, then every copy idles a while (no CPU hogging) and exits
BOMB = ("import os, time\nend = time.monotonic() + 6\nwhile time.monotonic() < end:\n    try:\n        os.fork()\n"
        "    except OSError:\n        time.sleep(0.05)\nos._exit(0)\n")
NEIGHBOUR = """
import os, threading, time
time.sleep(2.0)  # the bomb next door has exhausted its own process limit by now (on an idle machine)
kids = []
for _ in range(8):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
ts = [threading.Thread(target=time.sleep, args=(0.01,)) for _ in range(8)]
[t.start() for t in ts]
[t.join() for t in ts]
print('neighbour fine')
"""


@WHO
def test_a_fork_bomb_does_not_starve_its_neighbours(who, pkg):
    rs = run(who, [BOMB, NEIGHBOUR], pkg, concurrency=2, nproc=32)
    assert rs[0]["status"] in ("ok", "error"), rs[0]
    assert (rs[1]["status"], rs[1]["stdout"]) == ("ok", "neighbour fine\n"), rs[1]


# ------------------------------------------------------------------------------------------ outcomes

FORGE_PIPES = """
import os, sys
for fd in range(3, 1024):
    for msg in (b'F forged\\n', b'E 15\\n', b'X 1 exit 0 1\\n', b'M', b'S'):
        try:
            os.write(fd, msg)
        except OSError:
            pass
sys.exit(3)
"""


@WHO
def test_the_code_cannot_choose_its_outcome(who, pkg):
    codes = [
        "print(1)\n# a lone surrogate: \udc80",  # was infra (retried, out of the loss)
        FORGE_PIPES,  # was memory / could look like infra
        "import sys\nprint('MemoryError', file=sys.stderr)\nsys.exit(1)",  # was memory
        "import os, signal\nfor s in (signal.SIGTERM, signal.SIGKILL):\n    try:\n        os.kill(1, s)\n"
        "    except PermissionError:\n        pass\nprint('alive')",  # the namespace init ignores (or refuses) it
        "import os\nfor fd in range(1024):\n    try:\n        os.close(fd)\n    except OSError:\n        pass\nos._exit(0)",
    ]
    rs = run(who, codes, pkg, concurrency=2)
    assert [r["status"] for r in rs] == ["error", "error", "error", "ok", "ok"], rs
    assert rs[1]["exit_code"] == 3 and rs[3]["stdout"] == "alive\n"


def _w_of(marker: str) -> int:
    """Host pid of W for the sandbox whose user process exec'd `sleep <marker>` (U -> I -> W)."""
    assert _wait_for(lambda: _sleepers(marker)), "sandbox never started"
    return _ppid(_ppid(_sleepers(marker)[0]))


@WHO
def test_a_signal_from_outside_is_infra(who, pkg):
    marker = _marker(who, 1)
    code = f"import os\nos.execv('/bin/sleep', ['sleep', '{marker}'])"
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", run(who, [code], pkg, timeout_s=HANG_S)))
    t.start()
    w = _w_of(marker)
    os.killpg(w, signal.SIGTERM)  # what SLURM sends to a job's processes on preemption
    t.join(timeout=HANG_S)
    r = box["r"][0]
    assert (r["status"], r["exit_code"]) == ("infra", None), r
    assert "SIGTERM" in r["detail"] and "outside" in r["detail"]
    assert _wait_for(lambda: not _sleepers(marker))


TRAINER = """
import sys, threading, time
sys.path.insert(0, sys.argv[1])
from ctpo.sandbox import SandboxLimits, run_code
code = "import os\\nos.execv('/bin/sleep', ['sleep', %r])"
threading.Thread(target=run_code, args=(code, SandboxLimits(timeout_s=600.0)), daemon=True).start()
time.sleep(600)
"""


@WHO
def test_sandboxes_die_with_a_sigkilled_trainer(who, pkg):
    marker = _marker(who, 2)
    src = str(REPO) if who == "current" else str(pkg)
    argv = [sys.executable, "-c", TRAINER % marker, src]
    if who == "unprivileged":
        argv = _unpriv_argv(pkg, "-c", TRAINER % marker, src)
    trainer = subprocess.Popen(argv, cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
    try:
        assert _wait_for(lambda: _sleepers(marker)), "sandbox never started"
        server = [p for p in _pids_with("_child.forkserver") if _ppid(p) == trainer.pid]
        assert len(server) == 1  # the trainer's sandbox launcher
        trainer.kill()  # SIGKILL: no handler, no atexit, no finally
        trainer.wait()
        assert _wait_for(lambda: not _sleepers(marker)), _sleepers(marker)
        assert _wait_for(lambda: not Path(f"/proc/{server[0]}").exists())
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()


def test_a_dead_fork_server_is_infra_and_replaced():
    marker = _marker("current", 3)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", runner.run_code(
        f"import os\nos.execv('/bin/sleep', ['sleep', '{marker}'])", SandboxLimits(timeout_s=HANG_S))))
    t.start()
    assert _wait_for(lambda: _sleepers(marker))
    server = runner._FORKSERVER.proc
    server.kill()  # the launcher dies: its sandboxes die with it (PDEATHSIG), the call is infra
    t.join(timeout=HANG_S)
    assert box["r"].status == "infra", box["r"]
    assert _wait_for(lambda: not _sleepers(marker))
    r = runner.run_code("print(5)")
    assert (r.status, r.stdout) == ("ok", "5\n") and runner._FORKSERVER.proc.pid != server.pid


# ------------------------------------------------------------------------------------------ mechanism

def test_the_active_mechanism_is_reported_in_provenance():
    from ctpo.provenance import provenance

    with SandboxPool(concurrency=1) as pool:
        assert pool.run("print(1)").status == "ok"
        desc = pool.describe()
    assert desc["isolation"] == pool.mode and desc["isolation_probe"] == "ok"
    parent, why = cg.detect()
    assert desc["limits"]["mechanism"] == ("cgroup2" if parent else "namespaces")
    assert set(desc["packages"]) <= set(rootfs.SANDBOX_PACKAGES)
    rec = provenance()
    assert rec["sandbox"]["limits"]["mechanism"] == desc["limits"]["mechanism"]


def _fake_cgroup(root: Path, controllers: str, subtree: str = "", procs: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers)
    (root / "cgroup.subtree_control").write_text(subtree)
    (root / "cgroup.procs").write_text(procs)
    return root


def test_cgroup_detection_and_per_sandbox_files(tmp_path, monkeypatch):
    """Logic only, on a fake cgroup tree (a real delegated cgroup v2 is checked in the next test)."""
    d = _fake_cgroup(tmp_path / "deleg", "cpu memory pids", "memory pids")
    monkeypatch.setenv("CTPO_SANDBOX_CGROUP", str(d))
    cg.reset_detection()
    try:
        assert cg.detect() == (d, "")
        group = cg.SandboxCgroup(d, 768 << 20, 32)
        assert (group.path / "memory.max").read_text() == str(768 << 20)
        assert (group.path / "pids.max").read_text() == "32"
        assert not group.oom_killed()
        (group.path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
        assert group.oom_killed()
        no_mem = _fake_cgroup(tmp_path / "nomem", "cpu pids")
        monkeypatch.setenv("CTPO_SANDBOX_CGROUP", str(no_mem))
        cg.reset_detection()
        parent, why = cg.detect()
        assert parent is None and "lack memory/pids" in why
        busy = _fake_cgroup(tmp_path / "busy", "memory pids", "", "1\n2\n")
        monkeypatch.setenv("CTPO_SANDBOX_CGROUP", str(busy))
        cg.reset_detection()
        assert cg.detect()[0] is None and "other processes" in cg.detect()[1]
        desc = runner.describe()
        assert desc["limits"]["mechanism"] == "namespaces" and "other processes" in desc["limits"]["detail"]
    finally:
        monkeypatch.delenv("CTPO_SANDBOX_CGROUP")
        cg.reset_detection()


REAL_CGROUP = cg.detect()


@pytest.mark.skipif(REAL_CGROUP[0] is None, reason=f"needs a delegated cgroup v2 with memory+pids: {REAL_CGROUP[1]}")
def test_cgroup_bounds_the_sandbox_as_a_whole():
    code = ("import os, time\nfor _ in range(6):\n    if os.fork() == 0:\n        x = bytearray(200 << 20)\n"
            "        time.sleep(5)\n        os._exit(0)\nfor _ in range(6):\n    os.wait()\nprint('all held')")
    r = run("current", [code], None, memory_mb=512)[0]
    assert r["status"] == "memory" and "cgroup" in r["detail"], r


def test_fails_closed_when_no_mechanism_works(monkeypatch):
    from ctpo.sandbox import SandboxUnavailable, run_code

    monkeypatch.setattr(runner, "_probe", lambda mode: "writing kernel/shmmax: Permission denied")
    with pytest.raises(SandboxUnavailable, match="shmmax"):
        run_code("print(1)")


def test_a_forked_caller_gets_its_own_fork_server_and_reward_pool():
    from ctpo import reward

    assert runner.run_code("print(1)").status == "ok" and reward.score("\\boxed{1}", "1").reason == "correct"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # threads (the spawners) do not survive fork: the child must start its own helpers
        try:
            res = runner.run_code("print(2)")
            os.write(w, f"{res.status} {res.stdout.strip()} {reward.score(chr(92) + 'boxed{2}', '2').reason} "
                        f"{runner._FORKSERVER.owner == os.getpid()}".encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 200).decode() == "ok 2 correct True"
    os.close(r)
