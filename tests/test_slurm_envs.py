"""`snakemake --profile slurm` on a fake cluster whose nodes share nothing with the login node but the file
system. One run (`--retries 1`) of five paper jobs, two tests on it:

1. every rule runs in its rule family's environment (train and eval in the GPU env, every other job in the CPU
   env), both built once on the login node by Snakemake's conda deployment before anything is submitted;
2. retry only what a retry can fix: a job whose rule exits 78 (EXIT_PERMANENT: here a model or checkpoint not on
   disk) is submitted once; a job failing otherwise (exit 1 or 2) and a job SLURM ended with TIMEOUT are submitted
   again (the timed-out one then completes).

Real parts: Snakemake 9.27.1, snakemake-executor-plugin-slurm 2.8.0 (sbatch lines, status queries) under the
`ctpo-slurm` executor, its job-step plugin 0.6.1 (the `--wrap`), the installed `slurm` profile, the ctpo entry
points. Stand-ins (tests/fake_slurm.py): `sbatch` runs each job's --wrap under `env -i` (HOME, a minimal PATH,
SLURM_JOB_ID) in a mount namespace where the other family's conda env is hidden; `sacct` reports the jobs' ends
(Table 1's first job: TIMEOUT); `conda` records what the deployment creates and builds each env as a venv whose
interpreter logs every start. On this CPU machine the GPU jobs, the merge and the diagnostics (no model,
checkpoint or rollout dump here) stop early, after their interpreter started: where it started, and how often
each job was submitted, is what is asserted. Table 1 runs to completion.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ctpo import layout
from ctpo.config import REPO_ROOT, load_experiment, resolve_run
from fake_slurm import make_cluster, sbatch_calls, starts
from hang import HANG_S
from test_dag import VENV_BIN, copy_workflow
from test_slurm_submit import ACCOUNT, CPU_PART, GPU_PART, PREFLIGHT_INPUTS, SINFO, install

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # a DAG run on a fake cluster (minutes): `make test-e2e` (CI)

EXP = "paper"
TRAIN, EVAL_RUN, MERGE_RUN, DIAG_RUN, STEP, BENCH = "qwen3_4b_grpo", "qwen3_14b_ctpo", "qwen3_14b_gspo", \
    "qwen3_4b_ctpo", 300, "aime25"
GPU_RULES = {"train", "eval"}
MODULE = {"train": "ctpo.train", "eval": "ctpo.eval", "merge": "ctpo.train.verl_backend",
          "diagnostics": "ctpo.diagnostics", "table1": "ctpo.reports"}


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    if not shutil.which("unshare") or subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("the fake nodes need user and mount namespaces (unshare --user --map-root-user --mount)")
    tmp = tmp_path_factory.mktemp("cluster_run")
    wf = copy_workflow(tmp / "repo")
    root, envs, xdg = tmp / "cluster", tmp / "conda-envs", tmp / "xdg"
    make_cluster(root)
    assert install(xdg, "--conda-prefix", str(envs), repo=wf, fake_bin=root / "bin").returncode == 0
    conda = tmp / "conda"  # the login shell's conda (install()'s), sourced by every job through `precommand`
    P = layout.templates(EXP)
    f = lambda name, **w: P[name].format(**w)  # noqa: E731
    exp = load_experiment(REPO_ROOT / "configs/experiments/paper.yaml")
    for run in exp["runs"]:  # the resolved run configs, as the run_config rule writes them
        (wf / f("run_config", run=run, seed=0)).parent.mkdir(parents=True, exist_ok=True)
        (wf / f("run_config", run=run, seed=0)).write_text(json.dumps(resolve_run(exp, run, 0)))
    staged = [f("data_deepscaler"), f("data_model", model="qwen3_4b"), f("data_benchmarks"),
              f("train_done", run=EVAL_RUN, seed=0), f("merged", run=EVAL_RUN, seed=0, step=STEP),
              f("train_done", run=MERGE_RUN, seed=0), f("train_done", run=DIAG_RUN, seed=0)]
    # first (older than what follows): the GPU preflight passed (its inputs: every run's config, both models; the
    # resolved configs above are kept)
    first = [rel for rel in PREFLIGHT_INPUTS if not (wf / rel).exists()]
    staged = first + [f("preflight", partition="gpu")] + [rel for rel in staged if rel not in first]
    for rel in staged:  # as after the upstream jobs; no model, checkpoint or rollout dump on disk
        (wf / rel).parent.mkdir(parents=True, exist_ok=True)
        (wf / rel).write_text("{}\n")
    (tmp / "states").write_text("rule_table1 TIMEOUT\n")  # SLURM killed Table 1's first job at its time limit
    targets = {"train": f("train_done", run=TRAIN, seed=0),
               "eval": f("eval", run=EVAL_RUN, seed=0, step=STEP, bench=BENCH),
               "merge": f("merged", run=MERGE_RUN, seed=0, step=STEP),
               "diagnostics": f("diag", run=DIAG_RUN, seed=0, step=50),
               "table1": f("table1")}
    env = dict(os.environ, PATH=f"{root / 'bin'}:{conda / 'bin'}:{VENV_BIN}:{os.environ['PATH']}",
               XDG_CONFIG_HOME=str(xdg), FAKE_SLURM_ROOT=str(root), FAKE_ACCOUNT=ACCOUNT, FAKE_SINFO=SINFO,
               FAKE_GPU_PARTITION=GPU_PART, FAKE_CONDA_ENVS=str(envs), FAKE_SLURM_STATES=str(tmp / "states"),
               WANDB_MODE="offline", VIRTUAL_ENV=str(VENV_BIN.parent))  # the login shell's venv, not the nodes'
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.run(
        [str(VENV_BIN / "snakemake"), "--profile", "slurm", "--retries", "1",
         "--ctpo-slurm-init-seconds-before-status-checks", "1", *targets.values()],
        cwd=wf, env=env, capture_output=True, text=True, timeout=HANG_S)
    calls = sbatch_calls(root)
    rule_of = {jid: a[a.index("--comment") + 1].split("_wildcards_")[0].removeprefix("rule_")
               for jid, a in calls.items()}
    return {"tmp": tmp, "wf": wf, "root": root, "envs": envs, "proc": proc, "out": proc.stdout + proc.stderr,
            "targets": targets, "calls": calls, "rule_of": rule_of}


def env_dirs(envs: Path) -> dict[str, Path]:
    return {(p / "ctpo_env_name").read_text().strip(): p for p in envs.glob("*_") if (p / "ctpo_env_name").exists()}


def test_every_rule_runs_in_its_familys_env_on_a_scrubbed_node(cluster_run):
    r = cluster_run
    root, out = r["root"], r["out"]
    # the two envs were built once, on the login node, before any job was submitted
    creates = [c for c in (r["tmp"] / "conda-log/conda.calls").read_text().splitlines() if c.startswith("env create")]
    assert len(creates) == 2, out[-3000:]
    by_name = env_dirs(r["envs"])
    assert set(by_name) == {"ctpo-gpu", "ctpo-cpu"}
    assert (by_name["ctpo-gpu"] / "pip.calls").read_text().split() == [
        "install", "--no-build-isolation", "flash-attn==2.8.3"]  # envs/gpu.post-deploy.sh
    assert not (by_name["ctpo-cpu"] / "pip.calls").exists()
    first_sbatch = min(p.stat().st_mtime for p in (root / "log").glob("sbatch.*.call"))
    assert all((p / "ctpo_env_name").stat().st_mtime < first_sbatch for p in by_name.values())

    # GPU rules on the GPU partition; each job on a node where only its family's env exists
    assert set(r["rule_of"].values()) == set(MODULE), out[-3000:]
    for jid, rule in r["rule_of"].items():
        want = "ctpo-gpu" if rule in GPU_RULES else "ctpo-cpu"
        a = r["calls"][jid]
        assert a[a.index("-p") + 1] == (GPU_PART if rule in GPU_RULES else CPU_PART)
        node = yaml.safe_load((root / f"log/job.{jid}.node").read_text())
        other = by_name["ctpo-cpu" if want == "ctpo-gpu" else "ctpo-gpu"]
        assert node == {"family": want, "hidden": [str(other)]}

    # where each rule's `python -m ctpo...` started (the env's own start-up record)
    ran = {name: [x for x in starts(p) if "-m" in x["argv"]] for name, p in by_name.items()}
    for rule, module in MODULE.items():
        want = "ctpo-gpu" if rule in GPU_RULES else "ctpo-cpu"
        hits = {name: [x for x in recs if x["argv"][x["argv"].index("-m") + 1] == module] for name, recs in ran.items()}
        assert hits[want], f"{rule} ({module}) never started in {want}:\n{out[-3000:]}"
        assert not hits["ctpo-cpu" if want == "ctpo-gpu" else "ctpo-gpu"], f"{rule} ({module}) started in the other env"
        for x in hits[want]:
            assert x["prefix"] == str(by_name[want]) and x["virtual_env"] is None  # nothing of the login venv
    # the local rules (the run and experiment configs, on the login node) ran in the CPU env too
    assert any(x["argv"][x["argv"].index("-m") + 1] == "ctpo.configure" for x in ran["ctpo-cpu"])
    assert (r["wf"] / r["targets"]["table1"]).exists()  # a job that can finish here did, on its CPU node


def test_exit_78_is_not_resubmitted_a_timeout_and_other_failures_are(cluster_run):
    r = cluster_run
    out = r["out"]
    submitted = {rule: sorted(j for j, x in r["rule_of"].items() if x == rule) for rule in MODULE}
    # train (model not in the HF cache) and eval (checkpoint not on disk) exit 78: one job each, never again;
    # merge (no checkpoint, exit 1), diagnostics (no rollout dump, exit 2): resubmitted; table1: TIMEOUT, resubmitted
    assert {rule: len(j) for rule, j in submitted.items()} == {"train": 1, "eval": 1, "merge": 2, "diagnostics": 2,
                                                               "table1": 2}, out[-4000:]
    lines = [x for x in out.splitlines() if "not submitted again" in x]
    assert len(lines) == 2, out[-4000:]
    missing_ckpt = f"runs/{EXP}/{EVAL_RUN}/seed0/hf/step{STEP}"
    (eval_line,) = [x for x in lines if f"SLURM job {submitted['eval'][0]} exited 78" in x]
    assert f"error: model directory {missing_ckpt} does not exist" in eval_line
    (train_line,) = [x for x in lines if f"SLURM job {submitted['train'][0]} exited 78" in x]
    assert "error: model Qwen/Qwen3-4B at revision" in train_line and "is not in the local HF cache" in train_line
    rcs = {j: (r["root"] / f"log/job.{j}.rc").read_text() for j in r["calls"]}
    assert rcs[submitted["table1"][0]] == rcs[submitted["table1"][1]] == "0"  # SLURM said TIMEOUT; resubmitted
    assert (r["wf"] / r["targets"]["table1"]).exists()
    assert r["proc"].returncode != 0  # train, eval, merge, diagnostics cannot finish on this machine
