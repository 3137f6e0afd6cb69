"""Suite-wide settings and the toy warm start shared by the training tests.

One torch/OpenMP thread per process. The suite runs several processes at once (Snakemake jobs, sandboxes,
reward workers, verl's Ray actors) on a 2-core machine, often beside other jobs; with torch's default of
one thread per core, every op's thread barrier waits for a descheduled thread, and a tiny-model step ran
5-20x slower under load than with one thread (measured: 5 SFT steps, 1.8-9.8 s with 1 thread vs 30-64 s
with 2, at load average 8). Set before torch is imported, so every child process inherits it; an
explicit OMP_NUM_THREADS in the caller's environment wins.

Two workers. `make test` runs pytest-xdist with `--dist loadfile --no-loadscope-reorder`; the hooks below keep
each test file one unit of work (its module fixtures are built once) but make the files that share the toy warm
start one unit (it is built once), and order the units longest first, so the longest starts at once and short
files fill the other worker. A plain `pytest` run (no -n) only sees the order.
"""
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# files whose tests use `toy_warmstart`: one xdist unit, so one worker builds it once
WARMSTART_UNIT = "toy_warmstart"
WARMSTART_FILES = frozenset({"test_train_local.py", "test_verl_e2e.py", "test_verl_e2e_methods.py",
                             "test_multinode_verl.py"})
# the longest units first, measured one after the other at idle (2 cores, 564 tests in 602 s): the warm-start
# unit 294 s (CTPO through verl 142 s, the SFT warm start 55 s), tiny toy DAG 103 s, reward pool 34 s, verl
# preempt 25 s, DAG dry runs 25 s, sandbox integrity 18 s, verl backend 16 s, reports 13 s; every other file
# < 10 s. Measured under load (load average 8-10), not at idle: config injections 57 s (real snakemake runs,
# verl compose), relation guard + reward-worker limits 21 s, observation text 43-75 s (reward workers), sandbox
# without a cgroup 30-50 s; the fake-SLURM cluster run 141 s (mostly waiting on the executor's status polls,
# little CPU), the sbatch lines and profile installer 55 s, the band-input dry runs 26 s. Issue 19's files at load
# average ~33: test_multinode ~180 s (two Ray nodes 105-113 s), test_preflight ~70 s, test_controller_restart
# ~45 s, test_cluster_dag ~40 s. xdist gives a worker its next unit once 2 or fewer of its tests are pending, so
# a unit ends with short tests: the verl test (one long test) runs first in the warm-start unit, not last.
LONGEST_FIRST = ("test_verl_e2e.py", "test_verl_e2e_methods.py", "test_train_local.py", "test_slurm_envs.py",
                 "test_workflow_toy.py", "test_multinode.py", "test_reward.py", "test_preflight.py",
                 "test_config_data.py", "test_observation_text.py", "test_slurm_submit.py", "test_sandbox_nocgroup.py",
                 "test_verl_preempt.py", "test_diag_band_inputs.py", "test_dag.py", "test_controller_restart.py",
                 "test_cluster_dag.py", "test_reward_guard.py", "test_sandbox_integrity.py", "test_verl_backend.py",
                 "test_reports.py", "test_release_objective.py", "test_release_reward.py", "test_warmstart_band.py")


def unit_of(nodeid: str) -> str:
    """The xdist unit of work of a test id: its file's name, or the warm-start unit."""
    name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return WARMSTART_UNIT if name in WARMSTART_FILES else name


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # stable: file order otherwise kept


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent without pytest-xdist
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with the warm-start files as one unit (xdist's `loadgroup` cannot be used: pytest-xdist
    3.8 renames node ids for it through an attribute pytest 9.2 no longer reads)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ByUnit(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return ByUnit(config, log)


@pytest.fixture(scope="session")
def toy_warmstart(tmp_path_factory):
    """(data dir, SFT policy dir, SFT done record): toy data (200 train / 32 held-out problems) and the toy
    SFT warm start on it, built once per session (the slowest fixture) and read-only for every test."""
    from ctpo.config import load_experiment, resolve_run
    from ctpo.data.toy_task import write_toy_data
    from ctpo.io import read_json
    from ctpo.train import sft

    root = tmp_path_factory.mktemp("toy_warmstart")
    write_toy_data(root / "data", n_train=200, n_test=32, seed=1234)
    d = resolve_run(load_experiment(REPO / "configs/experiments/toy.yaml"), "toy_grpo", 0)
    d["data"]["train"] = str(root / "data" / "train.parquet")
    d["data"]["val"] = [str(root / "data" / "toy_arith.parquet")]
    d["eval"].update(max_problems=None)  # warm-start accuracy on all 32 held-out problems
    d["wandb"]["mode"] = "offline"
    (root / "sft.json").write_text(json.dumps(d))
    os.environ["WANDB_MODE"] = "offline"
    assert sft.main(["--config", str(root / "sft.json"), "--out", str(root / "sft")]) == 0
    return root / "data", root / "sft" / "policy", read_json(root / "sft" / "done.json")


@pytest.fixture(scope="module")
def verl_toy(tmp_path_factory, toy_warmstart):
    """(root, SFT warm-start policy dir) for the verl end-to-end tests: small toy data (64 train / 4 held-out)
    under root/data, and the session's warm start (toy_verl.yaml's sft block must be toy.yaml's), or the policy
    dir in $CTPO_E2E_WARMSTART (a warm start built earlier; saves minutes when iterating)."""
    from ctpo.config import load_experiment
    from ctpo.data.toy_task import write_toy_data

    def sft_block(name: str) -> dict:
        return load_experiment(REPO / f"configs/experiments/{name}.yaml")["defaults"]["sft"]

    assert sft_block("toy_verl") == sft_block("toy"), "the shared warm start is toy.yaml's recipe"
    root = tmp_path_factory.mktemp("verl_toy")
    write_toy_data(root / "data", n_train=64, n_test=4, seed=1234)
    reuse = os.environ.get("CTPO_E2E_WARMSTART")
    return root, Path(reuse) if reuse else toy_warmstart[1]
