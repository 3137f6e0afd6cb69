"""More than one node (issue 19, item 8). `train.n_nodes > 1` asks SLURM for that many nodes (the real executor
plugin's sbatch line against recording stand-ins) and starts a Ray cluster across them inside the job: the head on
the first node, workers through `srun`, which verl joins through RAY_ADDRESS. Here the "nodes" are one machine:
a recording `scontrol` names two, a recording `srun` runs the worker's `ray start` locally, so a head and a second
raylet really form one Ray cluster (cpu device profile resources). verl training across the two raylets:
tests/test_multinode_verl.py (variant). Unexercised here: srun placing the worker on another host, GPUs per node,
NCCL across hosts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctpo.config import load_experiment, load_run_config, resolve_run
from ctpo.train import ray_cluster
from ctpo.train import verl_command
from test_verl_backend import verl_argv
from hang import HANG_S

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

REPO = Path(__file__).resolve().parent.parent

SCONTROL = '#!/bin/sh\necho "$*" >> "$FAKE_LOG/scontrol.args"\nhostname -s\necho fake-worker-1\n'
# srun: record the call, then run the step's command (after srun's own --options) here
SRUN = ('#!/bin/sh\nprintf "%s\\n" "$*" >> "$FAKE_LOG/srun.args"\n'
        'while [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done\nexec "$@"\n')

NODES = """
import json, ray
ray.init(logging_level="ERROR")
print(json.dumps(sorted([n["Resources"].get("GPU", 0), n["Resources"].get("CPU", 0)] for n in ray.nodes() if n["Alive"])))
"""


def fake_slurm(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path),
                SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_ID="31337")


def two_node_cfg():
    exp = load_experiment(REPO / "configs/experiments/toy_verl.yaml")
    d = resolve_run(exp, next(iter(exp["runs"])), 0)
    d["train"]["n_nodes"], d["train"]["n_gpus"] = 2, 1
    return load_run_config(d)


@pytest.mark.e2e  # two Ray raylets (about a minute): `make test-e2e` (CI)
def test_two_raylets_form_one_cluster_that_a_driver_joins_and_both_stop(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_cluster, "JOIN_TIMEOUT_S", HANG_S)
    env = fake_slurm(tmp_path)
    said = []
    cluster = ray_cluster.for_run(two_node_cfg(), verl_command.ray_temp_dir(tmp_path), env, log=said.append)
    assert isinstance(cluster, ray_cluster.RayCluster)
    with cluster as address:
        seen = subprocess.run([sys.executable, "-c", NODES], env=dict(env, **ray_cluster.driver_env(address)), capture_output=True,
                              text=True, timeout=HANG_S)
        procs = list(cluster.procs)
    assert seen.returncode == 0, seen.stderr[-2000:]
    from ctpo.train.verl_cpu import RAY_LOGICAL_CPUS

    assert seen.stdout.strip() == f"[[1.0, {float(RAY_LOGICAL_CPUS)}], [1.0, {float(RAY_LOGICAL_CPUS)}]]"
    assert (tmp_path / "scontrol.args").read_text().split() == ["show", "hostnames", "node[1-2]"]
    srun = (tmp_path / "srun.args").read_text().splitlines()
    host = os.uname().nodename.split(".")[0]
    assert len(srun) == 1 and srun[0].startswith(
        f"--nodes=1 --ntasks=1 --ntasks-per-node=1 --exclude={host} --kill-on-bad-exit=1 ")
    assert f"start --address={address} --num-gpus=1 --num-cpus={RAY_LOGICAL_CPUS}" in srun[0] and "--block" in srun[0]
    assert said[-1] == f"[ctpo] Ray cluster {address}: 2 nodes"
    assert all(p.poll() is not None for p in procs)  # the worker step and the head are gone


def test_cluster_refuses_outside_a_multinode_job(tmp_path):
    env = fake_slurm(tmp_path)
    for broken, match in (({"SLURM_JOB_NODELIST": ""}, "not inside sbatch"),):
        with pytest.raises(ray_cluster.ClusterError, match=match):
            with ray_cluster.RayCluster(2, 1, tmp_path / "ray", dict(env, **broken)):
                pass
    with pytest.raises(ray_cluster.ClusterError, match=r"train.n_nodes 3: the SLURM job has 2 node\(s\)"):
        with ray_cluster.RayCluster(3, 1, tmp_path / "ray", env):
            pass
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/sh\necho other-node\necho " + os.uname().nodename + "\n")
    with pytest.raises(ray_cluster.ClusterError, match="not on the job's first node other-node"):
        with ray_cluster.RayCluster(2, 1, tmp_path / "ray", env):
            pass
    assert not (tmp_path / "srun.args").exists()  # nothing was started


def test_verl_command_joins_the_cluster_and_one_node_is_unchanged(tmp_path):
    multi = two_node_cfg()
    argv = verl_argv(multi, tmp_path / "w", init=tmp_path / "policy")
    keys = {a.split("=", 1)[0].lstrip("+"): a.split("=", 1)[1] for a in argv[3:]}
    assert keys["trainer.nnodes"] == "2" and keys["trainer.n_gpus_per_node"] == "1"
    assert not set(ray_cluster.CLUSTER_KEYS) & set(keys)  # ray.init refuses them when it connects
    single = load_run_config(resolve_run(load_experiment(REPO / "configs/experiments/toy_verl.yaml"),
                                         multi.run, 0))
    keys1 = {a.split("=", 1)[0].lstrip("+")
             for a in verl_argv(single, tmp_path / "w", init=tmp_path / "policy")[3:]}
    assert set(ray_cluster.CLUSTER_KEYS) <= keys1  # one node: verl's own private Ray, as before
    with ray_cluster.for_run(single, tmp_path / "ray", {}) as address:
        assert address is None


def test_sbatch_asks_for_the_nodes_gpus_per_node_and_a_task_per_node(tmp_path):
    from test_slurm_submit import PREFLIGHT_INPUTS, submit, value

    run = "qwen3_4b_ctpo"

    def two_nodes(wf):
        exp = wf / "configs/experiments/paper.yaml"
        exp.write_text(exp.read_text().replace(
            f"  {run}: {{model: qwen3_4b, method: ctpo}}",
            f"  {run}: {{model: qwen3_4b, method: ctpo, overrides: {{train: {{n_nodes: 2}}}}}}"))

    R = "results/paper"
    targets = [f"{R}/train/{run}/seed0/done.json", f"{R}/train/qwen3_4b_grpo/seed0/done.json"]
    stage = [f"{R}/data/deepscaler.json", *PREFLIGHT_INPUTS, f"{R}/preflight/gpu.json"]
    argvs, _ = submit(tmp_path, targets, stage, n_calls=2, prepare=two_nodes)
    by_run = {value(a, "--comment").removeprefix("rule_train_wildcards_").rsplit("_", 1)[0]: a for a in argvs}
    two, one = by_run[run], by_run["qwen3_4b_grpo"]
    print(f"\n2 nodes: sbatch {' '.join(two[:-1])}\n1 node:  sbatch {' '.join(one[:-1])}")
    assert "--nodes=2" in two and "--gres=gpu:h100:8" in two and "--ntasks-per-node=1" in two
    assert not any(a.startswith("--gpus") for a in two) and "--cpus-per-gpu=12" in two
    assert "--nodes=1" in one and "--gpus=h100:8" in one and not any(a.startswith("--gres") for a in one)
    assert "--ntasks-per-node=1" not in one

