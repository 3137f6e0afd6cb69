"""Suite-wide settings and the toy warm start shared by the training tests.

One torch/OpenMP thread per process. The suite runs several processes at once (Snakemake jobs, sandboxes,
reward workers, verl's Ray actors) on a 2-core machine, often beside other jobs; with torch's default of
one thread per core, every op's thread barrier waits for a descheduled thread, and a tiny-model step ran
5-20x slower under load than with one thread (measured: 5 SFT steps, 1.8-9.8 s with 1 thread vs 30-64 s
with 2, at load average 8). Set before torch is imported, so every child process inherits it; an
explicit OMP_NUM_THREADS in the caller's environment wins.

Two workers. `make test` runs pytest-xdist with plain `--dist loadfile --no-loadscope-reorder` (documented options:
each test file is one unit of work, so its module fixtures are built once, and units go out in collection order).
The toy warm start several files share is built once per session under a file lock, in the session's base temp
directory that both workers share, keyed by the hash of its config (pytest-xdist's documented recipe for a session
fixture that runs once): the first worker to need it builds it, the other waits for it or finds it built.
Collection order: files marked `slow` (module `pytestmark`; > ~10 s) and files that use the warm start first, the
two kinds alternating so the second worker has other work while the first builds the warm start; short files fill
in at the end. A plain `pytest` run (no -n) only sees the order.
"""
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

WARMSTART_FIXTURE = "toy_warmstart"


def pytest_collection_modifyitems(config, items):
    """Slow files and warm-start files first, alternating (module docstring); the rest keep their order."""
    slow, warm = {}, {}
    for it in items:
        slow.setdefault(it.path, False)
        warm.setdefault(it.path, False)
        slow[it.path] |= it.get_closest_marker("slow") is not None
        warm[it.path] |= WARMSTART_FIXTURE in it.fixturenames
    uses = [p for p in warm if warm[p]]
    others = [p for p in slow if slow[p] and not warm[p]]
    first = [p for pair in zip(uses, others) for p in pair]
    first += uses[len(others):] + others[len(uses):]
    rank = {p: i for i, p in enumerate(first)}
    items.sort(key=lambda it: rank.get(it.path, len(rank)))  # stable: file order otherwise kept


@pytest.fixture(scope="session")
def toy_warmstart(tmp_path_factory, worker_id):
    """(data dir, SFT policy dir, SFT done record): toy data (200 train / 32 held-out problems) and the toy
    SFT warm start on it, built once per session by whichever xdist worker needs it first (the slowest fixture)
    and read-only for every test."""
    from filelock import FileLock

    from ctpo.config import config_hash, load_experiment, resolve_run
    from ctpo.data.toy_task import write_toy_data
    from ctpo.io import read_json
    from ctpo.train import sft

    d = resolve_run(load_experiment(REPO / "configs/experiments/toy.yaml"), "toy_grpo", 0)
    d["eval"].update(max_problems=None)  # warm-start accuracy on all 32 held-out problems
    d["wandb"]["mode"] = "offline"
    data = dict(n_train=200, n_test=32, seed=1234)
    # one directory per recipe, in the base temp directory both xdist workers share (one per session)
    shared = tmp_path_factory.getbasetemp().parent if worker_id != "master" else tmp_path_factory.getbasetemp()
    root = shared / f"toy_warmstart-{config_hash({'sft': d, 'data': data})}"
    with FileLock(f"{root}.lock"):
        if not (root / "sft" / "done.json").is_file():  # done.json is written last: a finished warm start
            write_toy_data(root / "data", **data)
            d["data"]["train"] = str(root / "data" / "train.parquet")
            d["data"]["val"] = [str(root / "data" / "toy_arith.parquet")]
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
