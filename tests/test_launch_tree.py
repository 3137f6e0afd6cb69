"""A verl launch ends as one process tree and leaves no shared memory behind (issue 22, item 6).

The launcher (`ctpo.train.verl_backend.run_verl` / `main`) runs for real in this process; verl's driver is
tests/fixtures/tree_standin.py, a process tree shaped like verl's: a worker that left the driver's process
group and session (as Ray's and vLLM's processes do) and holds a /dev/shm/psm_* segment (as vLLM's message
queues do). Each case waits on events (a marker file, a process exit), never on a timer racing the tree.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from hang import HANG_S

from ctpo.train import launch_tree
from ctpo.train import verl_backend as vb
from ctpo.train import verl_preempt as vp

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "fixtures" / "tree_standin.py"
ERROR = "RuntimeError: Attempted to load weight (torch.Size([64, 64])) into parameter (torch.Size([0]))"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + HANG_S
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.setattr(vp, "POLL_S", 0.1)
    monkeypatch.setattr(launch_tree, "KILL_GRACE_S", 1.0)  # the resource tracker ignores SIGTERM: SIGKILL sooner
    holders: list[dict] = []

    def pids() -> dict:
        if not holders:
            holders.append(json.loads((tmp_path / "pids.json").read_text()))
        return holders[0]

    yield tmp_path, pids
    if holders:  # never leave a process or segment behind, whatever the assertions said
        for pid in (holders[0]["driver"], holders[0]["worker"]):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        (launch_tree.SHM_DIR / holders[0]["shm"]).unlink(missing_ok=True)


def _argv(mode: str, out: Path) -> list[str]:
    return [sys.executable, str(STANDIN), mode, str(out)]


def test_a_worker_error_with_a_hung_driver_ends_the_whole_tree_and_names_the_error(tree, capsys):
    out, pids = tree
    launch = vb.run_verl(_argv("error", out), env=dict(os.environ), progress=lambda: 0, error_grace_s=0.5)
    p = pids()
    assert launch.rc == 1 and launch.first_error == ERROR
    assert launch.killed_for.startswith("verl logged an error and made no progress")
    assert not _alive(p["driver"]) and not _alive(p["worker"])  # the worker had left the process group
    assert not (launch_tree.SHM_DIR / p["shm"]).exists() and launch.shm_removed == [p["shm"]]
    assert launch.error_line() == f"{launch.killed_for}; first error: {ERROR}"
    assert ERROR in capsys.readouterr().out  # verl's output still reaches the log, line by line


def test_an_error_verl_survives_never_ends_the_launch_however_long_its_next_step(tree):
    out, pids = tree
    polls = []

    def progress() -> int:  # one step is logged after the error, then none for a long while
        polls.append(1)
        return 1 if len(polls) > 1 else 0

    def driver_exits_later():
        while len(polls) < 2:  # the launcher has seen the step that followed the error
            time.sleep(0.05)
        time.sleep(8 * 0.5)  # then a "step" 8x the grace long: the launcher must not end the tree
        (out / "go").touch()

    threading.Thread(target=driver_exits_later, daemon=True).start()
    launch = vb.run_verl(_argv("benign", out), env=dict(os.environ), progress=progress, error_grace_s=0.5)
    assert launch.rc == 0 and launch.killed_for is None and launch.first_error == "ValueError: recovered from"
    assert len(polls) == 2 and not _alive(pids()["worker"])  # after that step the error was no longer watched


def test_the_launcher_reports_the_first_error_in_one_line(tree, capsys, monkeypatch):
    from test_verl_preempt import small_cfg

    for key in ("SLURM_JOB_ID", "SLURM_JOB_END_TIME", "CTPO_JOB_END_TIME"):
        monkeypatch.delenv(key, raising=False)
    out, pids = tree
    rc = vb.main(small_cfg(), out / "r", out / "w", command=_argv("error", out), error_grace_s=0.5)
    assert rc == 1 and not (out / "r" / "done.json").exists()
    failed = [line for line in capsys.readouterr().err.splitlines() if "verl failed" in line]
    assert failed == [f"[ctpo] verl failed at saved step 0 (rerun to resume): verl logged an error and made no "
                      f"progress for 0 s (a dead worker); first error: {ERROR}"]
    assert not _alive(pids()["worker"]) and not (launch_tree.SHM_DIR / pids()["shm"]).exists()


def test_after_a_successful_launch_no_orphan_and_no_segment_is_left(tree):
    out, pids = tree
    launch = vb.run_verl(_argv("exit0", out), env=dict(os.environ))
    p = pids()
    assert launch.rc == 0 and launch.killed_for is None and launch.first_error is None
    assert p["worker"] in launch.leftover_pids  # re-parented to us (with its own children), then ended
    assert not any(_alive(pid) for pid in launch.leftover_pids)
    assert launch.shm_removed == [p["shm"]] and not (launch_tree.SHM_DIR / p["shm"]).exists()


def test_after_preemption_the_tree_outside_verls_group_is_ended_and_its_segment_removed(tree):
    out, pids = tree

    def sigterm_when_ready():
        _wait_for(out / "ready")
        os.kill(os.getpid(), signal.SIGTERM)  # as the scheduler signals the job: the launcher gets it

    threading.Thread(target=sigterm_when_ready, daemon=True).start()
    launch = vb.run_verl(_argv("signal", out), env=dict(os.environ))  # no save controller: forwarded
    p = pids()
    assert launch.rc == 143 and not _alive(p["driver"])  # the driver got the forwarded SIGTERM
    assert p["worker"] in launch.leftover_pids  # another session: the signal missed it, the launcher did not
    assert not any(_alive(pid) for pid in launch.leftover_pids)
    assert not (launch_tree.SHM_DIR / p["shm"]).exists()


def test_a_segment_of_another_job_is_never_touched(tree):
    from multiprocessing import shared_memory

    other = shared_memory.SharedMemory(create=True, size=4096)  # this process's, not the launch's
    try:
        out, pids = tree
        launch = vb.run_verl(_argv("exit0", out), env=dict(os.environ))
        assert launch.rc == 0 and launch.shm_removed == [pids()["shm"]]
        assert (launch_tree.SHM_DIR / other.name.lstrip("/")).exists()
    finally:
        other.close()
        other.unlink()


def test_error_scanner_keeps_the_first_exception_of_a_traceback():
    s = launch_tree.ErrorScanner()
    lines = ["INFO step 1", "ValueError: not in a traceback", "\x1b[36m(TaskRunner pid=7)\x1b[0m Traceback (most "
             "recent call last):", "(TaskRunner pid=7)   File \"x.py\", line 3", "(TaskRunner pid=7) WARNING noise",
             "(TaskRunner pid=7) ray.exceptions.ActorDiedError: The actor died", "Traceback (most recent call last):",
             "KeyError: 'second'"]
    assert [s.feed(line) for line in lines] == [False, False, False, False, False, True, False, True]
    assert s.first == "ray.exceptions.ActorDiedError: The actor died"


def test_error_scanner_reads_a_traceback_vllms_worker_logged_through_ray():
    """The lines verl's driver printed when vLLM's worker failed a weight sync (the trial's defect, recorded
    from a real run: Ray's prefix for the server actor, vLLM's for its worker, vLLM's logger header)."""
    head = "\x1b[36m(vLLMHttpServer pid=24988)\x1b[0m (Worker pid=25884) ERROR 12-07 14:58:05 [multiproc_executor.py:1000] "
    lines = ["Traceback (most recent call last):", '  File "vllm/model_executor/model_loader/weight_utils.py", line 1',
             "    assert param.size() == loaded_weight.size(), (",
             "AssertionError: Attempted to load weight (torch.Size([64, 64])) into parameter (torch.Size([0]))", ""]
    s = launch_tree.ErrorScanner()
    assert [s.feed(head + line) for line in lines] == [False, False, False, True, False]
    assert s.first == "AssertionError: Attempted to load weight (torch.Size([64, 64])) into parameter (torch.Size([0]))"
