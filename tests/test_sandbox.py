"""Behaviour of the sandbox API: statuses, output capture, limits, order, pool reuse, failing closed."""
import random
import warnings

import pytest

from ctpo.sandbox import ExecResult, SandboxLimits, SandboxPool, SandboxUnavailable, isolation_mode, run_code, run_many
from ctpo.sandbox import runner

STATUSES = {"ok", "error", "timeout", "memory", "infra"}


def test_print_returns_stdout_and_ok():
    r = run_code("xs = [i * i for i in range(10)]\nprint(sum(xs))")
    assert isinstance(r, ExecResult)
    assert (r.status, r.exit_code, r.stdout, r.stderr) == ("ok", 0, f"{sum(i * i for i in range(10))}\n", "")
    assert not r.timed_out and not r.truncated and r.wall_s > 0


def test_sys_exit_code_is_error_with_that_code():
    r = run_code("import sys\nprint('before')\nsys.exit(3)")
    assert (r.status, r.exit_code, r.stdout) == ("error", 3, "before\n")
    assert run_code("raise SystemExit('bye')").stderr == "bye\n"
    assert run_code("import sys; sys.exit(0)").status == "ok"


def test_exception_traceback_looks_like_python_c():
    r = run_code("def f():\n    raise ValueError('boom')\nf()")
    assert (r.status, r.exit_code) == ("error", 1)
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"
    assert '"<string>", line 3' in r.stderr and "_child.py" not in r.stderr
    assert "ValueError: boom" in r.detail


def test_stdin_is_empty_and_input_raises_eof():
    r = run_code("import sys\nprint(repr(sys.stdin.read()))\ninput()")
    assert r.stdout == "''\n"
    assert r.stderr.strip().endswith("EOFError: EOF when reading a line")


def test_wall_clock_timeout_returns_partial_output():
    r = run_code("import time\nprint('started')\ntime.sleep(600)", limits=SandboxLimits(timeout_s=1.0))
    assert (r.status, r.timed_out, r.exit_code) == ("timeout", True, None)
    assert r.stdout == "started\n"  # line-buffered: output before the kill survives
    assert 1.0 <= r.wall_s < 120.0  # killed at the timeout, not after the 600 s sleep (loose: a loaded machine)


def test_memory_error_is_an_error_decided_by_the_parent():
    """An uncaught MemoryError is an error with its traceback; "memory" is only a kernel fact (a cgroup
    OOM kill, or a fatal signal at a large peak RSS), never what the program prints."""
    r = run_code("x = bytearray(600 * 1024 * 1024)", limits=SandboxLimits(memory_mb=256))
    assert (r.status, r.exit_code) == ("error", 1)
    assert r.stderr.strip().endswith("MemoryError") and "MemoryError" in r.detail
    forged = run_code("import sys\nprint('MemoryError', file=sys.stderr)\nsys.exit(1)", limits=SandboxLimits(memory_mb=256))
    assert (forged.status, forged.exit_code) == ("error", 1)
    ok = run_code("x = bytearray(100 * 1024 * 1024)\nprint(len(x))", limits=SandboxLimits(memory_mb=512))
    assert (ok.status, ok.stdout) == ("ok", f"{100 * 1024 * 1024}\n")


def test_fatal_signal_at_a_large_peak_rss_is_memory():
    code = "import os, signal\nx = bytearray(300 << 20)\nos.kill(os.getpid(), signal.SIGSEGV)"
    r = run_code(code, limits=SandboxLimits(memory_mb=400))
    assert (r.status, r.exit_code) == ("memory", -11) and "peak RSS" in r.detail
    small = run_code("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", limits=SandboxLimits(memory_mb=400))
    assert (small.status, small.exit_code) == ("error", -11)


def test_output_is_capped_per_stream_and_flagged():
    r = run_code("import sys\nprint('a' * 5000)\nsys.stderr.write('b' * 3000)", limits=SandboxLimits(max_output_bytes=1000))
    assert (r.status, r.truncated) == ("ok", True)
    assert r.stdout == "a" * 1000 and r.stderr == "b" * 1000
    assert "1000 bytes" in r.detail


def test_environment_is_fixed_and_minimal(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake_test_token")
    r = run_code("import os, json\nprint(json.dumps(dict(os.environ)))")
    import json

    env = json.loads(r.stdout)
    assert "HF_TOKEN" not in env and "hf_fake_test_token" not in r.stdout
    assert env == runner._ENV


def test_each_call_gets_a_fresh_private_workdir():
    first = run_code("import os\nopen('note.txt', 'w').write('x')\nprint(os.getcwd(), os.listdir('.'))")
    assert first.status == "ok" and "['note.txt']" in first.stdout
    second = run_code("import os\nprint(os.listdir('.'))")
    assert second.stdout == "[]\n"


def test_file_size_limit_applies():
    r = run_code("open('big', 'wb').write(b'0' * (3 << 20))", limits=SandboxLimits(fsize_mb=1))
    assert r.status == "error"
    assert "File too large" in r.stderr or "SIGXFSZ" in r.detail


def test_run_many_keeps_input_order_under_concurrency():
    rng = random.Random(0)
    delays = [rng.choice([0.0, 0.05, 0.3]) for _ in range(12)]
    codes = [f"import time\ntime.sleep({d})\nprint({i} * 7)" for i, d in enumerate(delays)]
    results = run_many(codes, concurrency=4)
    assert [r.stdout for r in results] == [f"{i * 7}\n" for i in range(12)]
    assert all(r.status == "ok" for r in results)


def test_pool_is_reusable_and_survives_hostile_programs():
    with SandboxPool(concurrency=3, limits=SandboxLimits(timeout_s=2.0, memory_mb=256)) as pool:
        bad = pool.run_many(["while True: pass", "x = bytearray(1 << 30)", "import os; os._exit(9)", "print(1)"])
        assert [r.status for r in bad] == ["timeout", "error", "error", "ok"]
        assert bad[1].stderr.strip().endswith("MemoryError")
        assert bad[2].exit_code == 9
        again = pool.run_many([f"print({i} + 1)" for i in range(5)])
        assert [r.stdout for r in again] == [f"{i + 1}\n" for i in range(5)]
        short = pool.run_many(["import time; time.sleep(600)"], timeout_s=0.5)[0]
        assert short.status == "timeout" and short.wall_s < 120.0  # the per-batch timeout, not the pool's 2 s
    with pytest.raises(RuntimeError, match="closed"):
        pool.run_many(["print(1)"])


def test_bad_arguments_fail_with_clear_message():
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        run_code("print(1)", limits=SandboxLimits(timeout_s=0))
    with pytest.raises(ValueError, match="SandboxLimits: nproc must be > 0, got -1"):
        SandboxLimits(nproc=-1)
    with pytest.raises(TypeError, match="limits must be a SandboxLimits"):
        run_code("print(1)", {"timeout_s": 1.0})
    with pytest.raises(TypeError, match="limits must be a SandboxLimits"):
        SandboxPool(2, {"timeout_s": 1.0})
    with pytest.raises(TypeError, match="code must be str"):
        run_code(b"print(1)")
    with pytest.raises(ValueError, match="isolation must be"):
        run_code("print(1)", isolation="docker")
    with pytest.raises(ValueError, match="concurrency"):
        SandboxPool(concurrency=0)


def test_fails_closed_when_isolation_is_impossible(monkeypatch):
    monkeypatch.setattr(runner, "_probe", lambda mode: "unshare: Operation not permitted")
    with pytest.raises(SandboxUnavailable, match="Operation not permitted"):
        run_code("print(1)")
    with pytest.raises(SandboxUnavailable):
        SandboxPool(concurrency=2)
    with pytest.warns(RuntimeWarning, match="NOT ISOLATED"):
        assert isolation_mode(allow_unisolated=True) == "none"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = run_code("import os\nprint(sorted(os.environ)[:1])", allow_unisolated=True)
    assert (r.status, r.stdout) == ("ok", "['HOME']\n")


def test_unisolated_mode_must_be_explicitly_allowed():
    with pytest.raises(SandboxUnavailable, match="allow_unisolated"):
        run_code("print(1)", isolation="none")


@pytest.mark.parametrize("forkserver", [False, True])
def test_sandbox_that_cannot_start_is_infra(monkeypatch, forkserver):
    monkeypatch.setattr(runner, "_CHILD", "/nonexistent/ctpo_child.py")
    monkeypatch.setattr(runner, "USE_FORKSERVER", forkserver)
    monkeypatch.setattr(runner, "_FORKSERVER", None)  # a fresh fork server cannot start either
    r = runner._execute("print(1)", SandboxLimits(5.0, 256, 1000, 16, 64, 1, 16), runner._host_mode())
    assert r.status == "infra" and r.exit_code is None
    assert "without running the code" in r.detail or "fork server did not launch" in r.detail


def test_userns_mode_runs_without_capabilities():
    """The unprivileged-host path (user namespace + capability drop) also isolates; here checked as root."""
    code = (
        "import os\n"
        "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')]\n"
        "print(os.getuid(), caps[0])\n"
        "open('/etc/ctpo_sandbox_probe', 'w')\n"
    )
    r = run_code(code, isolation="userns")
    assert r.stdout == "0 0000000000000000\n"
    assert r.status == "error" and "Read-only file system" in r.stderr
    assert r.status in STATUSES


def test_unisolated_fallback_still_kills_background_children():
    """Even without namespaces (explicitly allowed), no descendant outlives the call."""
    import os
    from pathlib import Path

    code = (
        "import os\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.execv('/bin/sleep', ['sleep', '7711.25'])\n"
        "    os._exit(0)\n"
        "print(os.getcwd())\n"
    )
    r = run_code(code, isolation="none", allow_unisolated=True)
    assert r.status == "ok" and "ctpo-sbx-" in r.stdout
    assert not Path(r.stdout.strip()).exists()  # the private work dir is removed
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"7711.25" in Path(f"/proc/{pid}/cmdline").read_bytes():
                alive.append(pid)
        except OSError:
            pass
    assert alive == []


def test_large_program_is_fed_through_stdin_completely():
    payload = "ab" * 150_000  # 300 kB: several pipe buffers
    r = run_code(f"x = {payload!r}\nprint(len(x), x[-3:])")
    assert (r.status, r.stdout) == ("ok", f"{len(payload)} {payload[-3:]}\n")


def test_cpu_time_limit_is_a_timeout():
    code = "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, 2))\nwhile True:\n    pass"
    r = run_code(code, limits=SandboxLimits(timeout_s=8.0))
    assert (r.status, r.exit_code, r.timed_out) == ("timeout", -24, False)  # SIGXCPU = 24
    assert "CPU-time limit" in r.detail


def test_fatal_signal_is_error_naming_the_signal():
    r = run_code("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)")
    assert (r.status, r.exit_code, r.detail) == ("error", -15, "killed by signal SIGTERM")
