"""Hostile programs: each is contained, gets one clear status, the next call works, the host is unchanged.

The machine is shared with other running jobs, so "host unchanged" is checked on what these programs
could have touched: no process of ours survives (children of this test process, or anything carrying
the test's unique marker), nothing the sandbox attempted to write exists, nothing new in /tmp or the
repo carries the marker or belongs to the sandbox uid, and this file's own bytes are unchanged.
"""
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyseccomp
import pytest

from ctpo.sandbox import SandboxLimits, SandboxPool, run_code
from hang import HANG_S

REPO = Path(__file__).resolve().parents[1]
MARK = f"ctpohostile{uuid.uuid4().hex[:12]}"
SLEEP_ARG = f"{int(uuid.uuid4().int % 9000) + 1000}.{os.getpid()}"  # unique argv for orphan hunting
THIS_FILE = Path(__file__).resolve()


def _children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                found.append(int(entry))
    return found


def _tmp_snapshot() -> dict[str, int]:
    out = {}
    for name in os.listdir("/tmp"):
        try:
            out[name] = os.lstat(f"/tmp/{name}").st_uid
        except FileNotFoundError:
            pass
    return out


def _git_status() -> set[str]:
    r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                       capture_output=True, text=True, check=True)
    return set(r.stdout.splitlines())


@pytest.fixture(scope="module")
def host_state():
    """Snapshot before the suite; after it, assert nothing the sandbox could touch changed."""
    before_tmp, before_git = _tmp_snapshot(), _git_status()
    digest = hashlib.sha256(THIS_FILE.read_bytes()).hexdigest()
    yield
    new_tmp = {n: uid for n, uid in _tmp_snapshot().items() if n not in before_tmp}
    assert not [n for n in new_tmp if MARK in n], new_tmp
    assert not [n for n, uid in new_tmp.items() if uid == 65534], new_tmp  # sandbox uid wrote to host /tmp
    new_git = _git_status() - before_git
    assert not [line for line in new_git if MARK in line], new_git
    assert hashlib.sha256(THIS_FILE.read_bytes()).hexdigest() == digest
    assert not _processes_with(SLEEP_ARG)


@pytest.fixture
def contained(host_state):
    """After each hostile program: no process left behind, and a normal program still runs.

    Children that existed before the test (other suites' long-lived helpers in the same pytest process, e.g.
    the reward worker or W&B's service) are not the sandbox's and are ignored."""
    before = set(_children_of(os.getpid()))
    yield
    from ctpo.sandbox import runner

    server = {runner._FORKSERVER.proc.pid} if runner._FORKSERVER else set()  # the long-lived launcher
    assert sorted(set(_children_of(os.getpid())) - before - server) == []
    assert _processes_with(SLEEP_ARG) == []
    r = run_code("print(6 * 7)")
    assert (r.status, r.stdout) == ("ok", "42\n")


def test_infinite_loop_times_out(contained):
    r = run_code("while True:\n    pass", limits=SandboxLimits(timeout_s=1.0))
    assert (r.status, r.timed_out, r.exit_code) == ("timeout", True, None)


def test_sleep_past_timeout_is_killed(contained):
    r = run_code("import time\ntime.sleep(3600)", limits=SandboxLimits(timeout_s=1.0))
    assert r.status == "timeout" and r.wall_s < 300.0  # killed at the timeout (loose bound: a loaded machine)


_SUBREAPER_SCRIPT = """
import ctypes, os, sys, time
from pathlib import Path
assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
from ctpo.sandbox import SandboxLimits, run_code
statuses = {run_code("while True:\\n    pass", limits=SandboxLimits(timeout_s=t)).status for t in (0.001, 0.01, 0.03, 0.06)}
time.sleep(0.2)
me, zombies = str(os.getpid()), []
for entry in filter(str.isdigit, os.listdir("/proc")):
    try:
        fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        continue
    if fields[0] == "Z" and fields[1] == me:
        zombies.append(entry)
print(sorted(statuses), len(zombies))
"""


def test_timeout_during_sandbox_setup_orphans_nothing(contained):
    """A timeout that fires before the namespace init exists still ends with every process reaped
    (killing the launcher first would orphan the init, which its new parent may never reap).

    The calls run in a child process that makes itself the subreaper of everything below it, so an
    orphan lands there and is counted exactly, whatever other jobs on the machine leave to host pid 1."""
    out = subprocess.run([sys.executable, "-c", _SUBREAPER_SCRIPT], capture_output=True, text=True,
                         timeout=HANG_S, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "['timeout'] 0"


def test_fork_bomb_is_bounded_and_killed(contained):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = run_code(code, limits=SandboxLimits(timeout_s=2.0, nproc=64))
    assert r.status == "timeout"


def test_memory_bomb_is_stopped(contained):
    r = run_code("x = []\nwhile True:\n    x.append(b'x' * 10_000_000)", limits=SandboxLimits(memory_mb=400))
    assert (r.status, r.exit_code) == ("error", 1) and r.stderr.strip().endswith("MemoryError")


def test_100mb_print_is_capped(contained):
    r = run_code("print('x' * 100_000_000)")
    assert (r.status, r.truncated) == ("ok", True)
    assert r.stdout == "x" * (1 << 20)


# The unprivileged-host path (user namespace, capabilities dropped) runs the same escape attempts.
# (Fork bombs are not run there: as root, uid 0 in a user namespace maps to host root, which
# RLIMIT_NPROC does not bound; on a real unprivileged host the per-namespace count applies.)
ISOLATIONS = pytest.mark.parametrize("isolation", ["auto", "userns"])


@ISOLATIONS
def test_background_child_dies_with_the_program(contained, isolation):
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', '{SLEEP_ARG}'])\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n"
        "print('parent done')\n"
    )
    r = run_code(code, limits=SandboxLimits(timeout_s=5.0), isolation=isolation)
    assert (r.status, r.stdout) == ("ok", "parent done\n")
    assert _processes_with(SLEEP_ARG) == []


def test_background_child_holding_stdout_does_not_block(contained):
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(3600)\nprint('bye')\n"
    r = run_code(code, limits=SandboxLimits(timeout_s=120.0))
    assert (r.status, r.stdout) == ("ok", "bye\n")  # 'ok', not 'timeout': it never waited for the child


@ISOLATIONS
def test_no_network_even_to_localhost(contained, isolation):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    code = (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "s.sendall(b'leak')\n"
    )
    try:
        r = run_code(code, limits=SandboxLimits(timeout_s=5.0), isolation=isolation)
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()
    assert r.status == "error"
    # the syscall filter refuses AF_INET sockets (EAFNOSUPPORT); the empty network namespace is behind it
    assert "Address family not supported" in r.stderr


def test_host_environment_secrets_are_invisible(contained, monkeypatch):
    secret = f"wandb-secret-{MARK}"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    code = (
        "import os\n"
        "print(dict(os.environ))\n"
        "try:\n    print(open('/proc/self/environ', 'rb').read())\nexcept OSError as e:\n    print(e.errno)\n"
        f"print(sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
        f"print(os.path.exists('/proc/{os.getpid()}/environ'))\n"
    )
    r = run_code(code)
    assert r.status == "ok"
    assert secret not in r.stdout and "WANDB_API_KEY" not in r.stdout
    lines = r.stdout.splitlines()
    assert lines[2] == "['1', '2']"  # only the namespace init and the program itself are visible
    assert lines[3] == "False" or os.getpid() in (1, 2)


@ISOLATIONS
def test_host_home_and_run_sockets_are_hidden(contained, monkeypatch, isolation):
    home = Path("/var/tmp") / f"{MARK}-home-{isolation}"
    home.mkdir(mode=0o755)
    try:
        (home / "secret.txt").write_text("hf_token_value")
        (home / "secret.txt").chmod(0o644)
        monkeypatch.setenv("HOME", str(home))
        r = run_code(f"import os\nprint(os.path.exists({str(home)!r}) or os.path.exists('/run') or None)\n"
                     f"open({str(home / 'secret.txt')!r}).read()", isolation=isolation)
    finally:
        shutil.rmtree(home)
    assert r.stdout == "None\n" and "FileNotFoundError" in r.stderr and "hf_token_value" not in r.stdout + r.stderr


@ISOLATIONS
def test_cannot_write_repo_or_host_tmp(contained, isolation):
    targets = [REPO / f"{MARK}.py", REPO / "tests" / f"{MARK}.txt", Path("/tmp") / MARK,
               Path("/var/tmp") / MARK, Path("/dev/shm") / MARK]
    code = (
        "import os, subprocess\n"
        f"targets = {[str(t) for t in targets]!r}\n"
        "for t in targets:\n"
        "    try:\n"
        "        open(t, 'w').write('pwned')\n"
        "        print('wrote', t)\n"
        "    except OSError as e:\n"
        "        print('blocked', t, e.errno)\n"
        "for f in ["
        f"{str(THIS_FILE)!r}, {str(REPO / 'pyproject.toml')!r}]:\n"
        "    try:\n"
        "        open(f, 'a').write('# pwned')\n"
        "        print('appended', f)\n"
        "    except OSError as e:\n"
        "        print('blocked', f, e.errno)\n"
        "r = subprocess.run(['mount', '-o', 'remount,rw', '/'], capture_output=True)\n"
        "print('remount', r.returncode)\n"
    )
    r = run_code(code, isolation=isolation)
    assert r.status == "ok", r.stderr
    assert "appended" not in r.stdout
    blocked = [ln.rsplit(" ", 1) for ln in r.stdout.splitlines() if ln.startswith("blocked")]
    assert [b[0] for b in blocked[-2:]] == [f"blocked {THIS_FILE}", f"blocked {REPO / 'pyproject.toml'}"]
    # EACCES (sandbox uid), EROFS (read-only mounts) or ENOENT (a checkout under /tmp is hidden by the private /tmp)
    assert {b[1] for b in blocked} <= {"2", "13", "30"}
    assert "remount 0" not in r.stdout
    for t in targets:  # /tmp and /dev/shm writes land in the private tmpfs, never on the host
        assert not t.exists(), t


def test_killing_the_parent_is_contained(contained):
    r = run_code("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('still here')")
    assert r.status in ("ok", "error") and r.status != "infra"
    code = (
        "import os, signal, time\nif os.fork() == 0:\n    time.sleep(3600)\n"
        "os.kill(-1, signal.SIGKILL)\nprint('alive')"
    )
    r2 = run_code(code, limits=SandboxLimits(timeout_s=120.0))  # kills every process it may signal: its own child only
    assert (r2.status, r2.stdout) == ("ok", "alive\n")  # 'ok', not 'timeout': the child did not outlive it


def test_binary_and_invalid_utf8_output(contained):
    r = run_code("import sys\nsys.stdout.buffer.write(bytes(range(256)))\nsys.stderr.buffer.write(b'\\xff\\xfe ok')")
    assert r.status == "ok"
    assert r.stdout == bytes(range(256)).decode("utf-8", errors="replace")
    assert r.stderr == b"\xff\xfe ok".decode("utf-8", errors="replace")


def test_pool_survives_a_hostile_batch(contained):
    hostile = [
        "while True:\n    pass",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "x = bytearray(1 << 30)",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "print('fine')",
    ]
    with SandboxPool(concurrency=3, limits=SandboxLimits(timeout_s=1.5, memory_mb=400, nproc=64)) as pool:
        first = pool.run_many(hostile)
        assert [r.status for r in first] == ["timeout", "timeout", "error", "error", "ok"], first
        second = pool.run_many([f"print({i} ** 2)" for i in range(6)])
    assert [r.stdout for r in second] == [f"{i * i}\n" for i in range(6)]


SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not SYSTEM_PYTHON,
                    reason="needs root (to become an unprivileged user), setpriv and a system python3")
def test_unprivileged_host_isolates_with_user_namespace(host_state, tmp_path):
    """As a real unprivileged uid (as on a cluster node): user namespace mode, home hidden, fs read-only."""
    home = Path("/var/tmp") / f"{MARK}-unpriv"
    home.mkdir()
    (home / ".netrc").write_text("machine api token secret-netrc")
    os.chown(home, 65534, 65534)
    os.chown(home / ".netrc", 65534, 65534)
    (home / ".netrc").chmod(0o600)
    # the unprivileged user imports ctpo.sandbox from a world-readable copy: the checkout itself may sit in
    # a directory that uid 65534 cannot enter (e.g. under /root)
    pkg = Path("/var/tmp") / f"{MARK}-pkg"
    shutil.copytree(REPO / "ctpo" / "sandbox", pkg / "ctpo" / "sandbox", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "ctpo" / "__init__.py", pkg / "ctpo" / "__init__.py")
    shutil.copy(pyseccomp.__file__, pkg / "pyseccomp.py")  # the syscall filter's bindings (one file)
    for d in [pkg, *pkg.rglob("*")]:
        d.chmod(0o755 if d.is_dir() else 0o644)
    driver = (
        "import sys\n"
        f"sys.path.insert(0, {str(pkg)!r})\n"
        "from ctpo.sandbox import isolation_mode, run_code\n"
        "code = '''\n"
        "import os\n"
        f"for t in [{str(home / 'x')!r}, {str(REPO / MARK)!r}]:\n"
        "    try:\n"
        "        open(t, 'w')\n"
        "        print('WROTE', t)\n"
        "    except OSError as e:\n"
        "        print('blocked', e.errno)\n"
        f"print(os.path.exists({str(home / '.netrc')!r}))\n"
        "'''\n"
        "r = run_code(code)\n"
        "print(isolation_mode(), r.status)\n"
        "print(r.stdout)\n"
    )
    try:
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-c", driver],
            capture_output=True, text=True, timeout=60, cwd="/", env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
        )
        assert not (home / "x").exists()
    finally:
        shutil.rmtree(home)
        shutil.rmtree(pkg)
    if "SandboxUnavailable" in out.stderr:
        pytest.skip(f"unprivileged user namespaces disabled here: {out.stderr.strip().splitlines()[-1]}")
    words = out.stdout.split()
    # neither the home directory nor the repo exists in the sandbox's filesystem: ENOENT
    assert words == ["userns", "ok", "blocked", "2", "blocked", "2", "False"], (out.stdout, out.stderr)
    assert not (REPO / MARK).exists()
