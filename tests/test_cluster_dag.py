"""The paper's dry-run DAG for the cluster (issue 19, items 2, 3, 6): GPU evaluations require vLLM (the toy stays
`auto`); one preflight on the profile's GPU partition, one GPU for 30 minutes, that every GPU training depends on (none for the
toy DAGs); each training keeps the checkpoint steps its evaluations read (`--keep-steps`). One paper dry run with
shell commands is shared by the checks."""
from __future__ import annotations

import re

import pytest
import yaml

from test_dag import REPO, copy_workflow, kv, parse_jobs, snakemake

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

PAPER = yaml.safe_load((REPO / "configs/experiments/paper.yaml").read_text())


@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("wf"))


@pytest.fixture(scope="module")
def paper(wf):
    """(jobs, stdout) of `snakemake -n -p` on the paper experiment."""
    proc = snakemake(wf, "-n", "-p", "--configfile", "configs/experiments/paper.yaml")
    return parse_jobs(proc.stdout), proc.stdout


@pytest.fixture(scope="module")
def toy(wf):
    proc = snakemake(wf, "-n", "-p")
    return parse_jobs(proc.stdout), proc.stdout


def shell_lines(stdout: str, module: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if f"python -m {module} " in ln]


def test_gpu_evaluations_require_vllm_and_the_toys_stay_auto(paper, toy):
    jobs, out = paper
    cmds = shell_lines(out, "ctpo.eval")
    assert len(cmds) == sum(1 for j in jobs if j["rule"] == "eval") == 73
    assert all(re.search(r"--backend vllm\b", c) for c in cmds), cmds[0]
    toy_cmds = shell_lines(toy[1], "ctpo.eval")
    assert toy_cmds and all(re.search(r"--backend auto\b", c) for c in toy_cmds), toy_cmds[0]


def test_one_preflight_before_every_gpu_training(paper, toy):
    jobs, _ = paper
    pre = [j for j in jobs if j["rule"] == "preflight"]
    assert len(pre) == 1 and pre[0]["output"] == "results/paper/preflight/gpu.json"
    res = kv(pre[0]["resources"])
    assert res["gpu"] == "1" and res["nodes"] == "1" and int(res["runtime"]) <= 30  # GPU type: the slurm profile's
    trains = [j for j in jobs if j["rule"] == "train"]
    assert len(trains) == len(PAPER["runs"])
    assert all("results/paper/preflight/gpu.json" in j["input"].split(", ") for j in trains)
    assert "preflight" not in {j["rule"] for j in toy[0]}  # the toy: none


def test_each_training_keeps_the_steps_its_evaluations_read(paper):
    _, out = paper
    total, freq = PAPER["defaults"]["train"]["total_steps"], PAPER["defaults"]["train"]["save_freq"]
    keep = {}
    for line in shell_lines(out, "ctpo.train"):
        m = re.search(r"--config \S+/configs/(\w+)/seed0\.json .*--keep-steps ([\d ]+)>", line)
        keep[m.group(1)] = [int(s) for s in m.group(2).split()]
    assert set(keep) == set(PAPER["runs"])
    curve = list(range(freq, total + 1, freq)) + ([total] if total % freq else [])
    for run in PAPER["runs"]:
        assert keep[run] == (curve if run in PAPER["evaluation"]["figure2_runs"] else [total]), run
