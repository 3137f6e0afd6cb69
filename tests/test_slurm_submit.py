"""`snakemake --profile slurm` against fake SLURM commands: the exact sbatch lines the real
snakemake-executor-plugin-slurm (2.8) builds for a training, an evaluation and a merge; and the profile
installer (`make slurm-profile`), which never destroys an existing profile and bakes in no checkout path.

The profile is installed with workflow/scripts/install_slurm_profile.py into a temporary
XDG_CONFIG_HOME. Fake `sbatch`, `squeue`, `sacct`, `sacctmgr`, `sshare`, `sinfo` and `scontrol`
on PATH record their arguments (the plugin calls sacctmgr to validate the account, scontrol for the
array limit, sbatch to submit and sacct/squeue for status). Snakemake is stopped once every expected
sbatch call has been made.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fake_slurm import make_conda
from hang import HANG_S
from test_dag import REPO, VENV_BIN, copy_workflow

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

FAKE = {
    # sbatch --parsable prints the job id (a distinct one per call); each call's argv, NUL-separated, to its
    # own file (written to a temp name first, so a reader never sees half a call)
    "sbatch": 'cat > /dev/null; f="$FAKE_SLURM_LOG/sbatch.$$"; printf "%s\\0" "$@" > "$f.tmp"; mv "$f.tmp" "$f.call"; '
              'echo $((4000 + $$ % 1000))',
    "sacctmgr": 'printf "%s\\n" "$*" >> "$FAKE_SLURM_LOG/sacctmgr.args"; echo "  $FAKE_ACCOUNT"',
    "sacct": 'printf "%s\\n" "$*" >> "$FAKE_SLURM_LOG/sacct.args"; echo "4242|RUNNING"',
    "squeue": 'printf "%s\\n" "$*" >> "$FAKE_SLURM_LOG/squeue.args"; echo "4242|RUNNING"',
    "sshare": 'echo "$FAKE_ACCOUNT"',
    "sinfo": 'printf "%s\\n" "$*" >> "$FAKE_SLURM_LOG/sinfo.args"; printf "%s" "$FAKE_SINFO"',
    "scontrol": 'printf "%s\\n" "$*" >> "$FAKE_SLURM_LOG/scontrol.args"; echo "MaxArraySize = 1001"',
    "scancel": 'printf "%s\\n" "$*" >> "$FAKE_SLURM_LOG/scancel.args"',
}
SCRIPT = "workflow/scripts/install_slurm_profile.py"
GPU_PART, CPU_PART, ACCOUNT = "gpu-h100", "cpu-std", "proj42"
# the cluster as `sinfo -h -o "%P %l %m %G %c"` shows it: 48 h GPU nodes of 8 H100, 96 cores, 1031000 MB
SINFO = (f"{GPU_PART}* 2-00:00:00 1031000 gpu:h100:8(S:0-1) 96\n{GPU_PART}* 2-00:00:00 515000 gpu:h100:4(S:0) 48\n"
         f"{CPU_PART} 1-00:00:00 514000 (null) 128\n")
LIMITS = ["--gpu-type", "h100", "--cpus-per-gpu", "12", "--mem-per-cpu", "10000", "--time", "2880"]


def install_fakes(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True)
    for name, body in FAKE.items():
        p = bin_dir / name
        p.write_text(f"#!/bin/sh\n{body}\n")
        p.chmod(0o755)


def install(xdg: Path, *extra: str, repo: Path = REPO, fake_bin: Path | None = None) -> subprocess.CompletedProcess:
    """The installer; with `fake_bin`, the fake `sinfo` answers (limits from it), else LIMITS are passed. The
    recording conda beside `xdg` (xdg/../conda) is this shell's conda."""
    conda = make_conda(xdg.parent / "conda", xdg.parent / "conda-log")
    env = dict(os.environ, XDG_CONFIG_HOME=str(xdg), FAKE_SINFO=SINFO, FAKE_SLURM_LOG=str(xdg),
               CONDA_EXE=str(conda / "bin/conda"))
    if fake_bin is not None:
        env["PATH"] = f"{fake_bin}:{env['PATH']}"
    return subprocess.run(
        [sys.executable, repo / SCRIPT, "--account", ACCOUNT, "--partition", GPU_PART, "--cpu-partition", CPU_PART,
         *([] if fake_bin else LIMITS), *extra],
        env=env, capture_output=True, text=True,
    )


def test_installed_profile_names_partitions_and_no_checkout_path(tmp_path):
    proc = install(tmp_path / "xdg")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "xdg/snakemake/slurm/config.yaml").read_text()
    prof = yaml.safe_load(text)
    assert prof["executor"] == "ctpo-slurm" and prof["ctpo-slurm-requeue"] is True
    assert prof["configfile"] == "configs/experiments/paper.yaml"  # relative to the checkout run from
    assert str(REPO) not in text and "@" not in text.split("#")[0]
    assert prof["default-resources"]["slurm_account"] == ACCOUNT
    assert prof["default-resources"]["slurm_partition"] == CPU_PART  # every job but training and evaluation
    gpu = {"slurm_partition": GPU_PART, "gpu_model": "h100", "cpus_per_gpu": 12, "mem_mb_per_cpu": 10000}
    assert prof["set-resources"] == {"train": {**gpu, "runtime": 2880}, "eval": {**gpu, "runtime": 480},
                                     "preflight": gpu}
    assert prof["software-deployment-method"] == "conda" and "conda-prefix" not in prof
    assert prof["precommand"] == f". {tmp_path / 'conda/etc/profile.d/conda.sh'}"  # jobs find conda on the node
    no_conda = install(tmp_path / "xdg3", "--conda-base", str(tmp_path / "nowhere"))
    assert no_conda.returncode == 2 and "--conda-base" in no_conda.stderr and "conda.sh not found" in no_conda.stderr
    assert prof["ctpo-slurm-keep-successful-logs"] is True
    bad = subprocess.run(
        [sys.executable, REPO / SCRIPT, "--account", "a;rm -rf /", "--partition", "p", "--cpu-partition", "c", *LIMITS],
        env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg2"), CONDA_EXE=str(tmp_path / "conda/bin/conda")),
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "--account" in bad.stderr
    assert not (tmp_path / "xdg2/snakemake/slurm/config.yaml").exists()


def test_installing_never_destroys_an_existing_profile(tmp_path):
    xdg = tmp_path / "xdg"
    mine = xdg / "snakemake/slurm/config.yaml"
    mine.parent.mkdir(parents=True)
    own = "executor: slurm\ndefault-resources:\n  slurm_account: other_lab\n"
    mine.write_text(own)
    refused = install(xdg)
    assert refused.returncode == 3 and "not overwriting" in refused.stderr and str(mine) in refused.stderr
    assert mine.read_text() == own and list(mine.parent.iterdir()) == [mine]
    beside = install(xdg, "--name", "ctpo-slurm")  # a second profile next to the user's own
    assert beside.returncode == 0 and mine.read_text() == own
    assert yaml.safe_load((xdg / "snakemake/ctpo-slurm/config.yaml").read_text())["executor"] == "ctpo-slurm"
    forced = install(xdg, "--force")
    assert forced.returncode == 0, forced.stderr
    backups = sorted(mine.parent.glob("config.yaml.bak-*"))
    assert len(backups) == 1 and backups[0].read_text() == own and str(backups[0]) in forced.stdout
    assert yaml.safe_load(mine.read_text())["default-resources"]["slurm_account"] == ACCOUNT
    again = install(xdg)  # the same settings again: nothing to do, nothing backed up
    assert again.returncode == 0 and "already installed" in again.stdout
    assert len(list(mine.parent.glob("config.yaml.bak-*"))) == 1


def test_make_slurm_profile_from_two_checkouts_runs_each_checkouts_config(tmp_path):
    xdg = tmp_path / "xdg"
    a, b = copy_workflow(tmp_path / "a"), copy_workflow(tmp_path / "b")
    shutil.copy2(REPO / "Makefile", a / "Makefile")
    conda = make_conda(tmp_path / "conda", tmp_path / "conda-log")
    env = dict(os.environ, XDG_CONFIG_HOME=str(xdg), PATH=f"{VENV_BIN}:{conda / 'bin'}:{os.environ['PATH']}")
    base = ["make", "-s", "slurm-profile", f"ACCOUNT={ACCOUNT}", f"PARTITION={GPU_PART}", f"CPU_PARTITION={CPU_PART}"]
    no_sinfo = subprocess.run(base, cwd=a, env=env, capture_output=True, text=True)  # no sinfo here, no limits given
    assert no_sinfo.returncode == 2 and "--gpu-type: sinfo is not available here" in no_sinfo.stderr
    make = subprocess.run([*base, "GPU_TYPE=a100", "CPUS_PER_GPU=8", "MEM_PER_CPU=8000", "TIME=1440",
                           "CONDA_ENVS=/shared/ctpo-conda"], cwd=a, env=env, capture_output=True, text=True)
    assert make.returncode == 0, make.stdout + make.stderr
    prof = yaml.safe_load((xdg / "snakemake/slurm/config.yaml").read_text())
    assert prof["set-resources"]["train"] == {"slurm_partition": GPU_PART, "gpu_model": "a100", "cpus_per_gpu": 8,
                                              "mem_mb_per_cpu": 8000, "runtime": 1440}
    assert prof["set-resources"]["eval"]["runtime"] == 480 and prof["conda-prefix"] == "/shared/ctpo-conda"
    usage = subprocess.run(["make", "-s", "slurm-profile", f"ACCOUNT={ACCOUNT}"], cwd=a, env=env,
                           capture_output=True, text=True)
    assert usage.returncode != 0 and "CPU_PARTITION" in usage.stdout + usage.stderr
    exp_b = b / "configs/experiments/paper.yaml"
    exp_b.write_text(exp_b.read_text().replace("experiment: paper\n", "experiment: paper_b\n"))
    for wf, name in ((a, "paper"), (b, "paper_b")):  # the one installed profile, used from each checkout
        proc = subprocess.run([str(VENV_BIN / "snakemake"), "--profile", "slurm", "-n", "run_qwen3_4b_ctpo"],
                              cwd=wf, env=env, capture_output=True, text=True, timeout=HANG_S)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"results/{name}/train/qwen3_4b_ctpo/seed0/done.json" in proc.stdout


# what the paper's GPU preflight reads (every run's config, both hub models): staged before its marker
PREFLIGHT_INPUTS = [f"results/paper/configs/{r}/seed0.json" for r in
                    yaml.safe_load((REPO / "configs/experiments/paper.yaml").read_text())["runs"]] + [
                    f"results/paper/data/model_{m}.json" for m in ("qwen3_4b", "qwen3_14b")]


def submit(tmp_path: Path, targets: list[str], stage: list[str], n_calls: int,
           prepare=None) -> tuple[list[list[str]], Path]:
    """Run `snakemake --profile slurm TARGETS` with fake SLURM until sbatch was called n_calls times;
    `prepare(workflow_dir)` may edit the copied workflow first."""
    wf = copy_workflow(tmp_path / "repo")
    if prepare is not None:
        prepare(wf)
    xdg, log_dir = tmp_path / "xdg", tmp_path / "slurm_log"
    log_dir.mkdir()
    install_fakes(tmp_path / "bin")
    assert install(xdg, repo=wf, fake_bin=tmp_path / "bin").returncode == 0  # GPU limits from the fake sinfo
    for rel in stage:  # inputs as after the upstream jobs, so exactly the targets' jobs are submitted
        (wf / rel).parent.mkdir(parents=True, exist_ok=True)
        (wf / rel).write_text("{}\n")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{tmp_path / 'conda/bin'}:{VENV_BIN}:{os.environ['PATH']}",
               XDG_CONFIG_HOME=str(xdg),
               FAKE_SLURM_LOG=str(log_dir), FAKE_ACCOUNT=ACCOUNT, WANDB_MODE="offline", FAKE_SINFO=SINFO)
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.Popen([str(VENV_BIN / "snakemake"), "--profile", "slurm", *targets], cwd=wf, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    def calls() -> list[list[str]]:
        return [p.read_text().split("\0")[:-1] for p in sorted(log_dir.glob("sbatch.*.call"))]

    deadline = time.time() + HANG_S
    try:
        while time.time() < deadline and len(calls()) < n_calls and proc.poll() is None:
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # SIGTERM would wait for the (fake) running jobs
        out = proc.communicate(timeout=HANG_S)[0]
    assert len(calls()) == n_calls, f"sbatch calls {calls()}:\n{out[-4000:]}"
    assert (log_dir / "sacctmgr.args").exists()  # the plugin validated the account
    return calls(), wf


def value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_training_evaluation_and_merge_sbatch_lines(tmp_path):
    """One training (8 GPUs on exactly one node, GPU partition), one evaluation (1 GPU, one node, GPU
    partition) and one merge (CPU partition, no GPU); each line printed (run with -s to see them)."""
    train_run, eval_run, step, bench = "qwen3_14b_ctpo_fixed", "qwen3_14b_ctpo", 300, "aime25"
    R = "results/paper"
    targets = [
        f"{R}/train/{train_run}/seed0/done.json",
        f"{R}/merged/qwen3_14b_gspo/seed0/step{step}.json",
        f"{R}/eval/{eval_run}/seed0/step{step}/{bench}.parquet",
    ]
    stage = [  # in DAG order (a file newer than what was made from it would be made again)
        f"{R}/data/deepscaler.json", *PREFLIGHT_INPUTS,  # every run's config, both models (`prepare_model` ran)
        f"{R}/preflight/gpu.json",  # the GPU preflight passed
        f"{R}/train/qwen3_14b_gspo/seed0/done.json",  # the merge's
        f"{R}/train/{eval_run}/seed0/done.json",  # the evaluation's
        f"{R}/data/benchmarks.json", f"{R}/merged/{eval_run}/seed0/step{step}.json",
    ]
    argvs, wf = submit(tmp_path, targets, stage, n_calls=3)
    by_rule = {value(a, "--comment").split("_wildcards_")[0].removeprefix("rule_"): a for a in argvs}
    assert set(by_rule) == {"train", "eval", "merge"}, argvs
    for rule in ("train", "eval", "merge"):
        a = by_rule[rule]
        assert a[-1].startswith("--wrap=") and "--executor slurm-jobstep" in a[-1]
        print(f"\n{rule}: sbatch {shlex.join(a[:-1])} --wrap=<snakemake --executor slurm-jobstep ...>")
    exp = yaml.safe_load((REPO / "configs/experiments/paper.yaml").read_text())["resources"]
    # the GPU jobs' limits come from sinfo's 8 x H100, 96-core, 1031000 MB nodes: 12 cores and 10739 MB per
    # core (96 x 10739 = 1030944 MB <= 1031000), the partition's 48 h; evaluation min(48 h, 8 h)
    for rule, runtime in (("train", 2880), ("eval", 480)):
        a = by_rule[rule]
        assert f"--gpus=h100:{exp[rule]['gpu']}" in a and "--nodes=1" in a
        assert "--cpus-per-gpu=12" in a and value(a, "--mem-per-cpu") == str(1031000 // 96)
        assert value(a, "-p") == GPU_PART and value(a, "-A") == ACCOUNT and value(a, "-t") == str(runtime)
    assert exp["train"]["gpu"] == 8
    m = by_rule["merge"]
    assert value(m, "-p") == CPU_PART and value(m, "-A") == ACCOUNT
    assert not any(x.startswith(("--gpus", "--gres")) for x in m)
    assert f"--cpus-per-task={exp['merge']['cpus_per_task']}" in m and value(m, "--mem") == str(exp["merge"]["mem_mb"])
    for a in argvs:
        assert "--requeue" in a and value(a, "-D") == str(wf)
        assert value(a, "--job-name").startswith("ctpo_")  # the plugin's run id, with our prefix
        # the job sources conda's shell set-up, then its job step activates the rule's conda env
        assert a[-1].startswith("--wrap=. ") and "/etc/profile.d/conda.sh && " in a[-1]
        assert "--deployment-method conda" in a[-1] and "--executor slurm-jobstep" in a[-1]
    assert value(by_rule["train"], "--comment") == f"rule_train_wildcards_{train_run}_0"
    assert value(by_rule["eval"], "--comment") == f"rule_eval_wildcards_{eval_run}_0_{step}_{bench}"
    assert value(by_rule["merge"], "--comment") == f"rule_merge_wildcards_qwen3_14b_gspo_0_{step}"


def test_a_request_the_partition_cannot_run_fails_in_one_line_before_submitting(tmp_path):
    """TIME=4000 on a partition whose time limit is 48 h, and a merge asking 600000 MB of the CPU nodes' 514000:
    `snakemake --profile slurm -n` stops at parse time with one line naming the rule and the limit (sinfo)."""
    wf = copy_workflow(tmp_path / "repo")
    xdg = tmp_path / "xdg"
    install_fakes(tmp_path / "bin")
    assert install(xdg, "--time", "4000", repo=wf, fake_bin=tmp_path / "bin").returncode == 0
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{tmp_path / 'conda/bin'}:{VENV_BIN}:{os.environ['PATH']}",
               XDG_CONFIG_HOME=str(xdg), FAKE_SLURM_LOG=str(tmp_path), FAKE_ACCOUNT=ACCOUNT, FAKE_SINFO=SINFO)
    run = lambda *a: subprocess.run([str(VENV_BIN / "snakemake"), "--profile", "slurm", "-n", *a], cwd=wf,  # noqa: E731
                                    env=env, capture_output=True, text=True, timeout=HANG_S)
    proc = run()
    assert proc.returncode != 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    line = next(x for x in (proc.stdout + proc.stderr).splitlines() if "cannot run on the cluster" in x)
    assert f"rule train: partition '{GPU_PART}': runtime 4000 min exceeds its time limit of 2880 min" in line
    assert not list(tmp_path.glob("sbatch.*.call"))
    exp = wf / "configs/experiments/paper.yaml"
    exp.write_text(exp.read_text().replace("merge: {cpus_per_task: 16, mem_mb: 256000",
                                           "merge: {cpus_per_task: 16, mem_mb: 600000"))
    assert install(xdg, "--force", repo=wf, fake_bin=tmp_path / "bin").returncode == 0  # sinfo's 48 h
    proc = run()
    assert proc.returncode != 0 and f"rule merge: partition '{CPU_PART}': no node fits 0 x any GPU, 16 CPUs, " \
        f"600000 MB per node (its nodes: no GPU, 128 CPUs, 514000 MB" in proc.stdout + proc.stderr
    exp.write_text(exp.read_text().replace("mem_mb: 600000", "mem_mb: 500000"))
    ok = run()
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
