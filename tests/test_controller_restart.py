"""A restarted controller does not submit a training that is still running (issue 19, item 7). The SLURM executor
plugin (2.8.0) tracks jobs by its per-invocation run id (`sacct --name <run uuid>`), so a new controller cannot
see the old one's jobs; each training instead holds `<workdir>/writer.lock` naming its SLURM job, and the
workflow asks `squeue` about it at parse time: a live holder's run, and the tables and figures that need it, are
left out of this invocation with one line each; a finished or vanished job's lock does not hold anything back."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from hang import HANG_S
from test_dag import VENV_BIN, copy_workflow, count, kv, parse_jobs

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

RUN = "qwen3_4b_ctpo"


@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    wf = copy_workflow(tmp_path_factory.mktemp("wf"))
    lock = wf / "runs/paper" / RUN / "seed0/writer.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": "gpu-node-7", "pid": 4242, "pid_start": "99", "slurm_job_id": "5001",
                                "since": "2026-12-01T10:00:00"}))
    return wf


def dry_run(wf, tmp_path, squeue_state: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    body = f'echo "$*" >> "{tmp_path}/squeue.args"\n' + (
        f"echo {squeue_state}\n" if squeue_state else 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1\n')
    (bin_dir / "squeue").write_text("#!/bin/sh\n" + body)
    (bin_dir / "squeue").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{VENV_BIN}:{os.environ['PATH']}", WANDB_MODE="offline")
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.run([str(VENV_BIN / "snakemake"), "-n", "--configfile", "configs/experiments/paper.yaml"],
                          cwd=wf, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return parse_jobs(proc.stdout), proc.stderr, (tmp_path / "squeue.args").read_text().split()


def test_a_training_running_in_slurm_is_not_submitted_again(wf, tmp_path):
    jobs, err, asked = dry_run(wf, tmp_path, "RUNNING")
    trains = {kv(j["wildcards"])["run"] for j in jobs if j["rule"] == "train"}
    assert len(trains) == 6 and RUN not in trains
    n = count(jobs)
    assert "tables" not in n and "figures" not in n  # they need the running training
    assert not any(kv(j["wildcards"]).get("run") == RUN for j in jobs
                   if j["rule"] in ("train", "merge", "eval", "diagnostics"))
    assert n["eval"] > 0  # the other runs' evaluations still go ahead
    assert asked[:5] == ["-h", "-j", "5001", "-o", "%T"]
    line = [ln for ln in err.splitlines() if ln.startswith("ctpo: ")]
    assert line and line[0] == (f"ctpo: {RUN} seed 0 is still training as SLURM job 5001 on host gpu-node-7 (pid "
                                f"4242, since 2026-12-01T10:00:00) (runs/paper/{RUN}/seed0/writer.lock); not submitted "
                                f"again, nor what needs it: rerun snakemake after that job ends")


def test_a_lock_left_by_a_finished_job_holds_nothing_back(wf, tmp_path):
    jobs, err, _ = dry_run(wf, tmp_path, "")  # squeue no longer knows job 5001
    n = count(jobs)
    assert n["train"] == 7 and n["tables"] == 1 and n["figures"] == 1
    assert "still training" not in err
