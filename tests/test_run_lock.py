"""One writer per run (issue 19, item 7): `python -m ctpo.train` holds `<workdir>/writer.lock`; a second trainer
exits in one line (78) naming the holder; stale locks (dead pid on this host, a SLURM job squeue no longer
lists, an earlier attempt of the same requeued job) are taken over; a config change keeps the lock in place."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ctpo import runlock
from ctpo.config import load_experiment, resolve_run
from ctpo.exitcodes import EXIT_PERMANENT
from ctpo.workdir import claim
from hang import HANG_S

REPO = Path(__file__).resolve().parent.parent

HOLD = """
import sys
from ctpo.runlock import writer_lock
with writer_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_holder(workdir: Path, **holder) -> Path:
    path = runlock.lock_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"since": "2026-01-01T00:00:00", **holder}))
    return path


def _fake_squeue(tmp_path: Path, states: dict[str, str]) -> dict:
    """A recording `squeue` on PATH answering `-h -j ID -o %T` from `states` (missing id: SLURM's error)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cases = "".join(f'  {jid}) echo {st} ;;\n' for jid, st in states.items())
    (bin_dir / "squeue").write_text(
        '#!/bin/sh\necho "$*" >> "$(dirname "$0")/squeue.args"\n'
        f'case "$3" in\n{cases}  *) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;;\nesac\n')
    (bin_dir / "squeue").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_second_trainer_exits_in_one_line_naming_the_holder(tmp_path):
    exp = load_experiment(REPO / "configs/experiments/toy.yaml")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(resolve_run(exp, next(iter(exp["runs"])), 0)))
    wd = tmp_path / "runs" / "toy" / "r" / "seed0"
    env = dict(os.environ, SLURM_JOB_ID="777001")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(wd)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run(
            [sys.executable, "-m", "ctpo.train", "--config", str(cfg), "--results", str(tmp_path / "res"),
             "--workdir", str(wd)], capture_output=True, text=True, timeout=HANG_S,
            env=dict(os.environ, SLURM_JOB_ID="777002"))
    finally:
        holder.communicate("\n", timeout=HANG_S)
    assert second.returncode == EXIT_PERMANENT, second.stderr
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, second.stderr
    assert f"SLURM job 777001 on host {socket.gethostname()} (pid {holder.pid}" in lines[0]
    assert str(runlock.lock_path(wd)) in lines[0]
    assert not (tmp_path / "res").exists() and sorted(p.name for p in wd.iterdir()) == []  # released, untouched


def test_stale_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path):
    wd = tmp_path / "wd"
    dead = _dead_pid()
    _write_holder(wd, host=socket.gethostname(), pid=dead, pid_start="1", slurm_job_id=None)
    said = []
    with runlock.writer_lock(wd, log=said.append) as mine:
        assert json.loads(runlock.lock_path(wd).read_text())["pid"] == os.getpid() == mine["pid"]
    assert not runlock.lock_path(wd).exists()
    aside = list(wd.glob("writer.lock.stale-*"))
    assert len(aside) == 1 and json.loads(aside[0].read_text())["pid"] == dead
    assert len(said) == 1 and f"pid {dead} is no longer running" in said[0]


def test_a_live_pid_of_another_process_start_is_a_reused_pid(tmp_path):
    wd = tmp_path / "wd"
    me = runlock.me()
    _write_holder(wd, host=me["host"], pid=os.getpid(), pid_start="0", slurm_job_id=None)  # same pid, other start
    said = []
    runlock.release(wd, runlock.acquire(wd, log=said.append))
    assert "is now another process" in said[0]


def test_other_host_holders_are_judged_by_squeue(tmp_path, monkeypatch):
    for k, v in _fake_squeue(tmp_path, {"5001": "RUNNING", "5002": "COMPLETED"}).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    wd = tmp_path / "wd"
    _write_holder(wd, host="gpu-node-17", pid=4242, slurm_job_id="5001")
    with pytest.raises(runlock.RunLocked, match=r"SLURM job 5001 on host gpu-node-17 \(pid 4242"):
        runlock.acquire(wd)
    for job, why in (("5002", "is COMPLETED"), ("5003", "is no longer listed by squeue")):
        _write_holder(wd, host="gpu-node-17", pid=4242, slurm_job_id=job)
        said = []
        runlock.release(wd, runlock.acquire(wd, log=said.append))
        assert f"SLURM job {job} {why}" in said[0]
    calls = (tmp_path / "bin" / "squeue.args").read_text().splitlines()
    assert calls == ["-h -j 5001 -o %T", "-h -j 5002 -o %T", "-h -j 5003 -o %T"]
    # no SLURM job id and another host: never presumed dead
    _write_holder(wd, host="laptop", pid=1, slurm_job_id=None)
    with pytest.raises(runlock.RunLocked, match="no SLURM job on host laptop"):
        runlock.acquire(wd)


def test_requeued_job_takes_over_its_own_earlier_attempt(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "9001")
    monkeypatch.setenv("PATH", "/nonexistent")  # squeue is never asked
    wd = tmp_path / "wd"
    _write_holder(wd, host="gpu-node-3", pid=99, slurm_job_id="9001")
    said = []
    runlock.release(wd, runlock.acquire(wd, log=said.append))
    assert "earlier attempt of this SLURM job 9001 (requeued)" in said[0]


def test_a_config_change_moves_state_aside_but_keeps_the_lock(tmp_path):
    exp = load_experiment(REPO / "configs/experiments/toy.yaml")
    cfg = resolve_run(exp, next(iter(exp["runs"])), 0)
    wd = tmp_path / "wd"
    with runlock.writer_lock(wd):
        claim(wd, cfg)
        (wd / "checkpoints").mkdir()
        changed = json.loads(json.dumps(cfg))
        changed["train"]["lr"] = cfg["train"]["lr"] * 2
        moved = claim(wd, changed)
        assert moved and (Path(moved) / "checkpoints").is_dir() and not (Path(moved) / "writer.lock").exists()
        assert json.loads(runlock.lock_path(wd).read_text())["pid"] == os.getpid()
    assert not runlock.lock_path(wd).exists()
