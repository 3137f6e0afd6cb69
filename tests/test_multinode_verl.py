"""verl 0.9.1's own trainer across two Ray nodes on one machine (issue 19, item 8): `python -m ctpo.train` with
`train.n_nodes: 2` under the `cpu` device profile, the recording `scontrol` / `srun` of tests/test_multinode.py
(the worker's `ray start` runs here), one logical GPU per node. Several minutes (a warm start, two Ray nodes and
verl's start-up on 2 cores): marked `variant` (`make test-variants`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl")
pytest.importorskip("transfer_queue")

from hang import HANG_S  # noqa: E402
from test_multinode import fake_slurm  # noqa: E402

from ctpo.config import load_experiment, resolve_run  # noqa: E402
from ctpo.io import read_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
@pytest.mark.variant
@pytest.mark.verl_e2e
def test_verl_trains_across_two_raylets_and_keeps_only_the_evaluated_checkpoints(tmp_path, verl_toy):
    """verl 0.9.1's own trainer (cpu device profile) with trainer.nnodes=2 and one logical GPU per node: its
    placement needs both raylets, so a finished run trained across them. The run goes through
    `python -m ctpo.train` (lock, Ray cluster, retention: only step 2 is evaluated, so step 1 is deleted)."""
    root, init = verl_toy
    exp = load_experiment(REPO / "configs/experiments/toy_verl.yaml")
    d = resolve_run(exp, "toy_ctpo", 0)
    d["data"]["train"], d["data"]["val"] = str(root / "data/train.parquet"), [str(root / "data/toy_arith.parquet")]
    d["wandb"]["mode"] = "offline"
    d["rollout"].update(n=2)
    d["train"].update(prompts_per_step=2, mini_batch_prompts=1, micro_batch_size_per_gpu=1, total_steps=2,
                      save_freq=1, test_freq=10, dump_steps=[1], n_nodes=2, n_gpus=1)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(d))
    wd, results = tmp_path / "runs" / "toy_ctpo" / "seed0", tmp_path / "results"
    env = dict(fake_slurm(tmp_path), WANDB_MODE="offline", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "ctpo.train", "--config", str(cfg), "--results", str(results),
                           "--workdir", str(wd), "--init", str(init), "--keep-steps", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=HANG_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert [ln for ln in out.splitlines() if ln.startswith("[ctpo] Ray cluster ")][-1].endswith(": 2 nodes")
    done = read_json(results / "done.json")
    assert done["final_step"] == 2 and done["saved_steps"] == [2]  # step 1 deleted after step 2 was saved
    assert "trainer.nnodes=2" in (wd / "verl_logs/attempt1.cmd").read_text()
    srun = (tmp_path / "srun.args").read_text().splitlines()
    assert len(srun) == 1 and "--num-gpus=1" in srun[0]
