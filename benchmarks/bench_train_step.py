"""Seconds and peak memory (RSS) per toy RL step on CPU, every method side by side.

    .venv/bin/python benchmarks/bench_train_step.py [--init runs/toy/sft/seed0/policy] [--steps 4]

Each method runs in its own subprocess (so peak RSS is its own), from the same warm-start policy, with
the same seeds and the toy.yaml sizes (16 prompts x 4 responses, 4 mini-batch updates per step). Step 1
rollouts are identical across methods, so time differences come from the loss and what it changes
later. Without --init, the toy warm start is trained first (ctpo.train.sft, toy.yaml sizes).
Reported: median seconds per step (rollout + old log-prob + updates), the update part alone, and the
peak RSS of the worker; ratios are against GRPO.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
METHODS = ("grpo", "gspo", "ctpo", "ctpo_fixed")


def _cfg_dict(data_dir: Path, method: str) -> dict:
    from ctpo.config import load_experiment, resolve_run

    d = resolve_run(load_experiment(REPO / "configs/experiments/toy.yaml"), f"toy_{method}", 0)
    d["data"]["train"] = str(data_dir / "train.parquet")
    d["data"]["val"] = [str(data_dir / "toy_arith.parquet")]
    d["wandb"]["mode"] = "disabled"
    return d


def worker(method: str, data_dir: Path, policy: Path, steps: int) -> dict:
    """Run `steps` RL steps of `method` in this process; time them."""
    import numpy as np
    import torch

    from ctpo.agent import load_policy
    from ctpo.config import load_run_config
    from ctpo.data.toy_task import read_questions
    from ctpo.sandbox import SandboxPool
    from ctpo.train import local

    cfg = load_run_config(_cfg_dict(data_dir, method))
    model, tok = load_policy(str(policy))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    qs, gts = read_questions(cfg.data.train)
    times, updates, consumed = [], [], 0
    with SandboxPool.for_rollout(cfg.rollout) as pool:
        for step in range(1, steps + 1):
            idx = local.draw_prompts(len(qs), consumed, cfg.train.prompts_per_step, cfg.seed)
            consumed += len(idx)
            t0 = time.perf_counter()
            res = local.rl_step(model, opt, tok, cfg, qs, gts, idx, step, pool)
            times.append(time.perf_counter() - t0)
            updates.append(res.update_s)
    return {
        "method": method,
        "step_s_median": float(np.median(times)),
        "step_s": times,
        "update_s_median": float(np.median(updates)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "reward_last": res.row["train/reward_mean"],
        "torch_threads": torch.get_num_threads(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", default=None, help="warm-start policy dir (default: train one first)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.data), Path(args.init), args.steps)))
        return 0
    from ctpo.data.toy_task import write_toy_data

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_step."))
    write_toy_data(tmp / "data", n_train=2000, n_test=64, seed=1234)
    policy = Path(args.init) if args.init else None
    if policy is None:
        cfg_path = tmp / "sft.json"
        cfg_path.write_text(json.dumps(_cfg_dict(tmp / "data", "grpo")))
        subprocess.run([sys.executable, "-m", "ctpo.train.sft", "--config", str(cfg_path), "--out", str(tmp / "sft")],
                       check=True, cwd=REPO)
        policy = tmp / "sft" / "policy"
    results = []
    for m in METHODS:
        out = subprocess.run([sys.executable, __file__, "--worker", m, "--data", str(tmp / "data"), "--init",
                              str(policy), "--steps", str(args.steps)], check=True, capture_output=True, text=True,
                             cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"})
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results[0]
    print(f"toy RL step, CPU ({os.cpu_count()} cores, torch threads {base['torch_threads']}), {args.steps} steps, "
          f"16 prompts x 4 responses, 4 updates/step")
    print("| method | s/step (median) | vs GRPO | update s/step | vs GRPO | peak RSS MB | vs GRPO |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['step_s_median']:.2f} | {r['step_s_median'] / base['step_s_median']:.2f}x | "
              f"{r['update_s_median']:.2f} | {r['update_s_median'] / base['update_s_median']:.2f}x | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
