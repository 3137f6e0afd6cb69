"""Steps per second on the toy: verl's own trainer on CPU (the `cpu` device profile of the verl launcher)
vs the local CPU trainer, side by side, same config, same warm start.

    .venv/bin/python benchmarks/bench_verl_vs_local.py [--init runs/toy_verl/sft/seed0/policy] [--steps 4]

Both runs use configs/experiments/toy_verl.yaml (toy_ctpo: 8 prompts x 4 responses, 2 mini-batch updates per
step) from the same SFT warm start (trained first without --init), each through its real entry point
(`python -m ctpo.train`), one after the other. Per-step seconds are each backend's own `time/step_s` in
metrics.jsonl (rollout + old log-probs + updates; verl adds its reward workers and TransferQueue); the
verl launch's wall time minus its steps is its start-up (Ray, workers, model load) and final checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _cfg(root: Path, backend: str, steps: int) -> dict:
    from ctpo.config import load_experiment, resolve_run

    d = resolve_run(load_experiment(REPO / "configs/experiments/toy_verl.yaml"), "toy_ctpo", 0)
    d["data"]["train"] = str(root / "data/train.parquet")
    d["data"]["val"] = [str(root / "data/toy_arith.parquet")]
    d["wandb"]["mode"] = "disabled"
    d["train"].update(backend=backend, total_steps=steps, save_freq=steps, test_freq=10 * steps, dump_steps=[])
    return d


def run(root: Path, backend: str, steps: int, policy: Path) -> dict:
    cfg_path = root / f"{backend}.json"
    cfg_path.write_text(json.dumps(_cfg(root, backend, steps)))
    res, wd = root / "results" / backend, root / "runs" / backend
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ctpo.train", "--config", str(cfg_path), "--results", str(res),
                          "--workdir", str(wd), "--init", str(policy)], cwd=REPO, env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{backend} run failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in (res / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["time/step_s"] for r in rows]
    return {"backend": backend, "steps": len(rows), "wall_s": wall, "step_s": step_s,
            "median_step_s": statistics.median(step_s), "overhead_s": wall - sum(step_s)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", default=None, help="toy SFT policy dir (trained first when omitted)")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    from ctpo.data.toy_task import write_toy_data

    root = Path(tempfile.mkdtemp(prefix="bench_verl_"))
    write_toy_data(root / "data", n_train=400, n_test=8, seed=1234)
    policy = Path(args.init) if args.init else None
    if policy is None:
        from ctpo.train import sft

        (root / "sft.json").write_text(json.dumps(_cfg(root, "local", args.steps)))
        assert sft.main(["--config", str(root / "sft.json"), "--out", str(root / "sft")]) == 0
        policy = root / "sft" / "policy"
    results = [run(root, "local", args.steps, policy), run(root, "verl", args.steps, policy)]
    loc, ver = results
    print(f"{'backend':8s} {'steps':>5s} {'median s/step':>14s} {'steps/s':>8s} {'wall s':>8s} {'start-up+save s':>16s}")
    for r in results:
        print(f"{r['backend']:8s} {r['steps']:5d} {r['median_step_s']:14.2f} {1 / r['median_step_s']:8.3f} "
              f"{r['wall_s']:8.1f} {r['overhead_s']:16.1f}")
    print(f"verl / local seconds per step: {ver['median_step_s'] / loc['median_step_s']:.2f}x; "
          f"per-step seconds local {[round(s, 2) for s in loc['step_s']]}, verl {[round(s, 2) for s in ver['step_s']]}")


if __name__ == "__main__":
    main()
