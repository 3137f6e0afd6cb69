"""Preemption and time limits on the verl path: SIGTERM / SIGUSR1 or a near SLURM end time make verl save at
the end of the step in progress and stop; the next launch resumes from that checkpoint in the same W&B run.

The launcher (`ctpo.train.verl_backend.main`) runs for real in this process; verl's main_ppo is replaced by
tests/fixtures/verl_standin.py, which follows verl 0.9.1's v1 save protocol and loads our hook through
verl's own `build_checkpoint_callback`. The stand-in holds the step under test until the hook is armed
(an event), so no test races a timer against a training loop.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hang import HANG_S

from ctpo.config import load_experiment, load_run_config, resolve_run
from ctpo.train import verl_backend as vb
from test_verl_backend import verl_argv
from ctpo.train import verl_preempt as vp

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "fixtures" / "verl_standin.py"
TOTAL = 5


def small_cfg():
    """The paper's GRPO 4B run with a 5-step schedule, no periodic saves or dumps, W&B offline."""
    d = resolve_run(load_experiment(ROOT / "configs/experiments/paper.yaml"), "qwen3_4b_grpo", 0)
    d["train"].update(total_steps=TOTAL, save_freq=100, test_freq=100, dump_steps=[])
    d["wandb"]["mode"] = "offline"
    return load_run_config(d)


@pytest.fixture
def launch(tmp_path, monkeypatch):
    monkeypatch.setattr(vp, "POLL_S", 0.1)
    for key in ("SLURM_JOB_ID", "SLURM_JOB_END_TIME", "CTPO_JOB_END_TIME"):
        monkeypatch.delenv(key, raising=False)
    cfg, wd, res, out = small_cfg(), tmp_path / "w", tmp_path / "r", tmp_path / "standin"
    out.mkdir()

    def run(hold: int = 0, on_step=None) -> int:
        monkeypatch.setenv("STANDIN_DIR", str(out))
        monkeypatch.setenv("STANDIN_HOLD_STEP", str(hold))
        command = [sys.executable, str(STANDIN), *verl_argv(cfg, wd)[3:]]
        if on_step is not None:
            threading.Thread(target=on_step, daemon=True).start()
        return vb.main(cfg, res, wd, command=command)

    run.cfg, run.wd, run.res, run.out = cfg, wd, res, out
    return run


def wait_for(path: Path, timeout: float = HANG_S) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def launches(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "launches.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.variant)])
def test_signal_saves_the_current_step_then_requeue_resumes_in_the_same_wandb_run(launch, signum, capsys):
    def signal_at_step3():
        wait_for(launch.out / "step3.started")
        os.kill(os.getpid(), signum)  # as the scheduler signals the job: the launcher gets it

    before = signal.getsignal(signum)
    rc = launch(hold=3, on_step=signal_at_step3)
    assert rc == 128 + signum
    assert signal.getsignal(signum) is before  # the launcher's handler is gone after the run
    ckpt = launch.wd / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "3"  # no periodic save before step 100
    assert (ckpt / "global_step_3/actor/weights.txt").is_file()
    assert json.loads((launch.wd / "verl/save_request.done").read_text())["step"] == 3
    assert not (launch.res / "done.json").exists() and not (launch.out / "step4.started").exists()
    assert f"{signal.Signals(signum).name} received" in capsys.readouterr().err
    rc = launch()  # the requeued job
    assert rc == 0
    first, second = launches(launch.out)
    assert (first["start_step"], second["start_step"]) == (1, 4)  # resumed after the saved step
    assert first["wandb_run_id"] == second["wandb_run_id"] == (launch.wd / "wandb_run_id").read_text().strip()
    assert second["wandb_resume"] == "allow"
    done = json.loads((launch.res / "done.json").read_text())
    assert done["final_step"] == TOTAL and done["saved_steps"] == [3, TOTAL] and done["attempts"] == 2
    assert done["wandb_run_id"] == first["wandb_run_id"]
    rows = [json.loads(x) for x in (launch.res / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # step 3 was logged before verl stopped


def test_near_end_time_saves_before_the_job_is_killed(launch, monkeypatch, capsys):
    # an earlier attempt measured 400 s steps; the job ends in 1000 s: 400 * 2 + 600 (save, not yet
    # measured) + 300 (margin) = 1700 s > 1000 s, so the step in progress must save
    logs = launch.wd / "verl_logs"
    logs.mkdir(parents=True)
    (logs / "attempt1.jsonl").write_text(json.dumps({"step": 1, "data": {"timing_s/step": 400.0}}) + "\n")
    monkeypatch.setenv("CTPO_JOB_END_TIME", str(time.time() + 1000))
    rc = launch(hold=1)
    assert rc == 75
    assert (launch.wd / "checkpoints/latest_checkpointed_iteration.txt").read_text() == "1"
    err = capsys.readouterr().err
    assert "deadline: the job ends in" in err and "resumes from step 1" in err


def test_must_save_arithmetic():
    # step 1000 s, save 200 s, margin 300 s: skipping this save, the next could end at start + 2200 + 300
    assert vp.must_save(0.0, 2500.0, 1000.0, 200.0, 300.0)
    assert not vp.must_save(0.0, 2500.1, 1000.0, 200.0, 300.0)
    assert vp.must_save(100.0, 2550.0, 1000.0, 200.0, 300.0)


def test_job_end_time_sources():
    assert vp.job_end_time({"CTPO_JOB_END_TIME": "1800000000"}) == (1800000000.0, "CTPO_JOB_END_TIME")
    assert vp.job_end_time({"SLURM_JOB_END_TIME": "1800000123", "SLURM_JOB_ID": "7"})[0] == 1800000123.0
    assert vp.job_end_time({}) == (None, "not a SLURM job")
    calls = []

    def squeue(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="2026-12-05T07:30:00\n", stderr="")

    end, source = vp.job_end_time({"SLURM_JOB_ID": "4242"}, run=squeue)
    assert calls == [["squeue", "-h", "-j", "4242", "-o", "%e"]] and source == "squeue %e"
    assert end == time.mktime((2026, 12, 5, 7, 30, 0, 0, 0, -1))  # local time, as squeue prints it

    def unlimited(argv, **kw):
        return subprocess.CompletedProcess(argv, 0, stdout="N/A\n", stderr="")

    assert vp.job_end_time({"SLURM_JOB_ID": "1"}, run=unlimited)[0] is None


def test_timings_take_the_longest_step_with_validation_and_save(tmp_path):
    a, b = tmp_path / "attempt1.jsonl", tmp_path / "attempt2.jsonl"
    a.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "data": {"timing_s/step": 100.0}},
        {"step": 2, "data": {"timing_s/step": 120.0, "timing_s/save_checkpoint": 30.0}},
        {"step": 2, "data": {"timing_s/testing": 50.0}},  # validation logged on its own line
    ]) + "\n")
    b.write_text(json.dumps({"step": 3, "data": {"timing_s/step": 150.0}}) + "\n{\"step\": 4, \"da")  # cut line
    t = vp.read_timings([a, b])
    assert t.step_s == 170.0 and t.save_s == 30.0


def test_composed_verl_config_loads_the_hook_through_verls_builder():
    from test_verl_backend import _compose
    from verl.trainer.ppo.checkpoint_callback import build_checkpoint_callback

    from ctpo.train.verl_save_hook import SaveOnRequest

    composed = _compose(verl_argv(small_cfg(), "/tmp/w")[3:])
    assert composed.trainer.checkpoint_callback_class == vp.HOOK_CLASS
    assert isinstance(build_checkpoint_callback(composed), SaveOnRequest)


def test_a_signal_that_lands_while_verl_starts_is_forwarded_once_it_runs(tmp_path):
    """The scheduler's signal can arrive after verl's process exists but before the launcher knows its pid:
    it is held and forwarded as soon as the pid is known, not dropped (verl would then run to its time limit)."""
    marker = tmp_path / "got"
    child = (f"import signal, sys, time\n"
             f"def h(signum, frame):\n    open({str(marker)!r}, 'w').write(str(signum)); sys.exit(0)\n"
             f"signal.signal(signal.SIGUSR1, h)\nprint('ready', flush=True)\ntime.sleep(30)\nsys.exit(3)\n")

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, start_new_session=True)
        assert proc.stdout.readline() == b"ready\n"  # its handler is in place
        os.kill(os.getpid(), signal.SIGUSR1)  # the signal lands now, inside start(): no pid known yet
        return proc

    assert vp.run_with_saves(start, None) == 0
    assert marker.read_text() == str(int(signal.SIGUSR1))
