"""`snakemake --profile slurm` on a fake cluster whose nodes share nothing with the login node but the file
system: every rule runs in its rule family's environment (train and eval in the GPU env, every other job in
the CPU env), built once on the login node by Snakemake's conda deployment.

Real parts: Snakemake 9.27.1, snakemake-executor-plugin-slurm 2.8.0 (submission, status) and its job-step plugin
0.6.1 (the `--wrap`), the installed `slurm` profile, the ctpo entry points. Stand-ins (tests/fake_slurm.py):
`sbatch` runs each job's --wrap under `env -i` (HOME, a minimal PATH and SLURM_JOB_ID only) in a mount
namespace where the other family's conda env is hidden; `conda` records what the deployment creates and
builds each env as a venv whose interpreter logs every start. Jobs of the paper DAG run with their inputs
staged; on this CPU machine the GPU jobs (and the merge and diagnostics, lacking checkpoints and dumps) stop
early, after their interpreter started: where it started is what is asserted. Table 1 runs to completion.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from ctpo import layout
from fake_slurm import make_cluster, sbatch_calls, starts
from hang import HANG_S
from test_dag import VENV_BIN, copy_workflow
from test_slurm_submit import ACCOUNT, CPU_PART, GPU_PART, SINFO, install

EXP = "paper"
TRAIN, EVAL_RUN, MERGE_RUN, DIAG_RUN, STEP, BENCH = "qwen3_4b_grpo", "qwen3_14b_ctpo", "qwen3_14b_gspo", \
    "qwen3_4b_ctpo", 300, "aime25"


def test_every_rule_runs_in_its_familys_env_on_a_scrubbed_node(tmp_path):
    wf = copy_workflow(tmp_path / "repo")
    root, envs, xdg = tmp_path / "cluster", tmp_path / "conda-envs", tmp_path / "xdg"
    fake = make_cluster(root)
    assert install(xdg, "--conda-prefix", str(envs), repo=wf, fake_bin=root / "bin").returncode == 0
    conda = tmp_path / "conda"  # the login shell's conda (install()'s), sourced by every job through `precommand`
    P = layout.templates(EXP)
    f = lambda name, **w: P[name].format(**w)  # noqa: E731
    staged = [f("data_deepscaler"), f("data_model", model="qwen3_4b"), f("data_benchmarks"),
              *(f("run_config", run=r, seed=0) for r in (EVAL_RUN, MERGE_RUN, DIAG_RUN)),
              f("train_done", run=EVAL_RUN, seed=0), f("merged", run=EVAL_RUN, seed=0, step=STEP),
              f("train_done", run=MERGE_RUN, seed=0), f("train_done", run=DIAG_RUN, seed=0)]
    for rel in staged:  # as after the upstream jobs
        (wf / rel).parent.mkdir(parents=True, exist_ok=True)
        (wf / rel).write_text("{}\n")
    targets = {"train": f("train_done", run=TRAIN, seed=0),
               "eval": f("eval", run=EVAL_RUN, seed=0, step=STEP, bench=BENCH),
               "merge": f("merged", run=MERGE_RUN, seed=0, step=STEP),
               "diagnostics": f("diag", run=DIAG_RUN, seed=0, step=50),
               "table1": f("table1")}
    env = dict(os.environ, PATH=f"{root / 'bin'}:{conda / 'bin'}:{VENV_BIN}:{os.environ['PATH']}",
               XDG_CONFIG_HOME=str(xdg), FAKE_SLURM_ROOT=fake["FAKE_SLURM_ROOT"], FAKE_ACCOUNT=ACCOUNT,
               FAKE_SINFO=SINFO, FAKE_GPU_PARTITION=GPU_PART, FAKE_CONDA_ENVS=str(envs), WANDB_MODE="offline",
               VIRTUAL_ENV=str(VENV_BIN.parent))
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.run(
        [str(VENV_BIN / "snakemake"), "--profile", "slurm", "--retries", "0",
         "--slurm-init-seconds-before-status-checks", "1", *targets.values()],
        cwd=wf, env=env, capture_output=True, text=True, timeout=HANG_S)
    out = proc.stdout + proc.stderr

    # the two envs were built once, on the login node, before any job was submitted
    creates = [c for c in (tmp_path / "conda-log/conda.calls").read_text().splitlines() if c.startswith("env create")]
    assert len(creates) == 2, out[-3000:]
    by_name = {(p / "ctpo_env_name").read_text().strip(): p for p in envs.glob("*_") if (p / "ctpo_env_name").exists()}
    assert set(by_name) == {"ctpo-gpu", "ctpo-cpu"}
    assert (by_name["ctpo-gpu"] / "pip.calls").read_text().split() == [
        "install", "--no-build-isolation", "flash-attn==2.8.3"]  # envs/gpu.post-deploy.sh
    assert not (by_name["ctpo-cpu"] / "pip.calls").exists()
    first_sbatch = min(p.stat().st_mtime for p in (root / "log").glob("sbatch.*.call"))
    assert all((p / "ctpo_env_name").stat().st_mtime < first_sbatch for p in by_name.values())

    # one job per target rule; GPU rules on the GPU partition, each on a node where only its family's env exists
    calls = sbatch_calls(root)
    rule_of = {jid: a[a.index("--comment") + 1].split("_wildcards_")[0].removeprefix("rule_") for jid, a in calls.items()}
    assert sorted(rule_of.values()) == sorted(targets), out[-3000:]
    family = {"train": "ctpo-gpu", "eval": "ctpo-gpu"}
    for jid, rule in rule_of.items():
        want = family.get(rule, "ctpo-cpu")
        a = calls[jid]
        assert a[a.index("-p") + 1] == (GPU_PART if want == "ctpo-gpu" else CPU_PART)
        node = yaml.safe_load((root / f"log/job.{jid}.node").read_text())
        other = by_name["ctpo-cpu" if want == "ctpo-gpu" else "ctpo-gpu"]
        assert node == {"family": want, "hidden": [str(other)]}
        assert (root / f"log/job.{jid}.rc").exists()

    # where each rule's `python -m ctpo...` started (the env's own start-up record)
    module_of = {"train": "ctpo.train", "eval": "ctpo.eval", "merge": "ctpo.train.verl_backend",
                 "diagnostics": "ctpo.diagnostics", "table1": "ctpo.reports"}
    ran = {name: [r for r in starts(p) if "-m" in r["argv"]] for name, p in by_name.items()}
    for rule, module in module_of.items():
        want = family.get(rule, "ctpo-cpu")
        hits = {name: [r for r in recs if r["argv"][r["argv"].index("-m") + 1] == module] for name, recs in ran.items()}
        assert hits[want], f"{rule} ({module}) never started in {want}:\n{out[-3000:]}"
        other = "ctpo-cpu" if want == "ctpo-gpu" else "ctpo-gpu"
        assert not hits[other], f"{rule} ({module}) started in {other}"
        for r in hits[want]:
            assert r["prefix"] == str(by_name[want]) and r["virtual_env"] is None  # nothing of the login venv
    # the local rules (configs, on the login node) ran in the CPU env too
    assert any(r["argv"][r["argv"].index("-m") + 1] == "ctpo.configure" for r in ran["ctpo-cpu"])
    assert (wf / targets["table1"]).exists()  # a job that can finish here did, on its CPU node
    assert proc.returncode != 0  # train/eval/merge/diagnostics cannot finish on this machine
