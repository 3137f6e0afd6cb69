"""`snakemake --profile slurm` against fake SLURM commands: the sbatch arguments of a training job.

The profile is installed with workflow/scripts/install_slurm_profile.py into a temporary
XDG_CONFIG_HOME. Fake `sbatch`, `squeue`, `sacct`, `sacctmgr`, `sshare`, `sinfo` and `scontrol`
on PATH record their arguments (the SLURM executor plugin 2.8 calls sacctmgr to validate the
account, scontrol for the array limit, sbatch to submit and sacct/squeue for status). Snakemake is
stopped once sbatch has been called.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from hang import HANG_S
from test_dag import REPO, VENV_BIN, copy_workflow

FAKE = {
    # sbatch --parsable prints the job id; record the whole command line, one call per line
    "sbatch": 'cat > /dev/null; printf "%s\\n" "$*" >> "$FAKE_SLURM_LOG/sbatch.args"; echo 4242',
    "sacctmgr": 'printf "%s\\n" "$*" >> "$FAKE_SLURM_LOG/sacctmgr.args"; echo "  $FAKE_ACCOUNT"',
    "sacct": 'printf "%s\\n" "$*" >> "$FAKE_SLURM_LOG/sacct.args"; echo "4242|RUNNING"',
    "squeue": 'printf "%s\\n" "$*" >> "$FAKE_SLURM_LOG/squeue.args"; echo "4242|RUNNING"',
    "sshare": 'echo "$FAKE_ACCOUNT"',
    "sinfo": 'printf "%s\\n" "$*" >> "$FAKE_SLURM_LOG/sinfo.args"',
    "scontrol": 'printf "%s\\n" "$*" >> "$FAKE_SLURM_LOG/scontrol.args"; echo "MaxArraySize = 1001"',
    "scancel": 'printf "%s\\n" "$*" >> "$FAKE_SLURM_LOG/scancel.args"',
}


def install_fakes(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True)
    for name, body in FAKE.items():
        p = bin_dir / name
        p.write_text(f"#!/bin/sh\n{body}\n")
        p.chmod(0o755)


def test_install_slurm_profile_fills_repo_account_partition(tmp_path):
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    script = REPO / "workflow/scripts/install_slurm_profile.py"
    subprocess.run(
        [sys.executable, script, "--account", "proj42", "--partition", "gpu-h100", "--repo", str(REPO)],
        env=env, check=True, capture_output=True,
    )
    prof = yaml.safe_load((tmp_path / "xdg/snakemake/slurm/config.yaml").read_text())
    assert prof["executor"] == "slurm" and prof["slurm-requeue"] is True
    assert prof["configfile"] == f"{REPO}/configs/experiments/paper.yaml"
    assert prof["default-resources"]["slurm_account"] == "proj42"
    assert prof["default-resources"]["slurm_partition"] == "gpu-h100"
    bad = subprocess.run(
        [sys.executable, script, "--account", "a;rm -rf /", "--partition", "p", "--repo", str(REPO)],
        env=env, capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "--account" in bad.stderr


def test_training_job_is_submitted_with_gpus_time_memory_partition_account(tmp_path):
    wf = copy_workflow(tmp_path / "repo")
    xdg, log_dir = tmp_path / "xdg", tmp_path / "slurm_log"
    log_dir.mkdir()
    install_fakes(tmp_path / "bin")
    subprocess.run(
        [sys.executable, wf / "workflow/scripts/install_slurm_profile.py", "--account", "proj42",
         "--partition", "gpu-h100", "--repo", str(wf)],
        env=dict(os.environ, XDG_CONFIG_HOME=str(xdg)), check=True, capture_output=True,
    )
    # The training job's inputs exist (as after `run_config` and `prepare_deepscaler`), so the only job
    # to submit is the training itself.
    run = "qwen3_14b_ctpo_fixed"
    for rel in (f"results/paper/configs/{run}/seed0.json", "results/paper/data/deepscaler.json"):
        (wf / rel).parent.mkdir(parents=True, exist_ok=True)
        (wf / rel).write_text("{}\n")
    env = dict(
        os.environ,
        PATH=f"{tmp_path / 'bin'}:{VENV_BIN}:{os.environ['PATH']}",
        XDG_CONFIG_HOME=str(xdg),
        FAKE_SLURM_LOG=str(log_dir),
        FAKE_ACCOUNT="proj42",
        WANDB_MODE="offline",
    )
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.Popen(
        [str(VENV_BIN / "snakemake"), "--profile", "slurm", f"run_{run}"],
        cwd=wf, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    args_file = log_dir / "sbatch.args"
    deadline = time.time() + HANG_S
    try:
        while time.time() < deadline and not args_file.exists() and proc.poll() is None:
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # SIGTERM would wait for the (fake) running job
        out = proc.communicate(timeout=HANG_S)[0]
    assert args_file.exists(), f"sbatch never called:\n{out[-4000:]}"
    calls = args_file.read_text().splitlines()
    assert len(calls) == 1, calls
    argv = shlex.split(calls[0])
    exp = yaml.safe_load((REPO / "configs/experiments/paper.yaml").read_text())
    res = exp["resources"]["train"]

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert f"--gpus={res['gpu_model']}:{res['gpu']}" in argv
    assert res["gpu"] == 8
    assert value("-t") == str(res["runtime"])
    assert value("--mem") == str(res["mem_mb"])
    assert value("-p") == "gpu-h100"
    assert value("-A") == "proj42"
    assert f"--cpus-per-gpu={res['cpus_per_gpu']}" in argv
    assert "--requeue" in argv
    assert value("--comment").startswith("rule_train_wildcards_")
    assert run in value("--comment")
    assert value("-D") == str(wf)
    assert (log_dir / "sacctmgr.args").exists()  # the plugin validated the account
