"""Warm-start accuracy over many seeds: the toy SFT alone (ctpo.train.sft), not the whole DAG.

    .venv/bin/python benchmarks/bench_warmstart_seeds.py --seeds 0 1 2 3 4 5 6 7 8 9 [--procs 2] \\
        [--experiment configs/experiments/toy.yaml] [--out build/warmstart_seeds]

Each seed's config is the one the DAG's `warmstart` rule runs (ctpo.configure.warmstart_config of the
experiment), on the toy data the DAG generates (the experiment's data.toy sizes and seed), with
sft.accuracy_band opened to [0, 1] so every seed records its accuracy; the experiment's own band is then
applied here. One `python -m ctpo.train.sft` subprocess per seed (OMP_NUM_THREADS=1), `--procs` at a time.
Prints one line per seed (final loss, held-out accuracy at the rollout temperature) and the distribution,
and writes <out>/summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def seed_config(experiment: dict, seed: int, data_dir: Path) -> dict:
    from ctpo.configure import warmstart_config

    cfg = warmstart_config(experiment, seed)
    cfg["data"]["train"] = str(data_dir / "train.parquet")
    cfg["data"]["val"] = [str(data_dir / "toy_arith.parquet")]
    cfg["wandb"]["mode"] = "disabled"
    cfg["sft"]["accuracy_band"] = [0.0, 1.0]  # record every seed; the experiment's band is applied below
    return cfg


def run_seed(seed: int, cfg: dict, out: Path) -> dict:
    d = out / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    done = d / "done.json"
    if not done.is_file():
        t0 = time.time()
        env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
        proc = subprocess.run([sys.executable, "-m", "ctpo.train.sft", "--config", str(d / "config.json"),
                               "--out", str(d)], cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"seed {seed}: ctpo.train.sft exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        print(f"seed {seed}: done in {time.time() - t0:.0f} s wall", flush=True)
    return json.loads(done.read_text())


def main(argv: list[str] | None = None) -> int:
    from ctpo.config import load_experiment
    from ctpo.data.toy_task import write_toy_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--experiment", default=str(REPO / "configs/experiments/toy.yaml"))
    ap.add_argument("--out", default=str(REPO / "build/warmstart_seeds"))
    args = ap.parse_args(argv)
    experiment = load_experiment(args.experiment)
    out = Path(args.out)
    toy = experiment["data"]["toy"]
    data_dir = out / "data"
    if not (data_dir / "toy_arith.parquet").is_file():
        write_toy_data(data_dir, toy["n_train"], toy["n_test"], toy["seed"])
    band = experiment["defaults"]["sft"].get("accuracy_band", [0.0, 1.0])
    with ThreadPoolExecutor(args.procs) as pool:
        recs = list(pool.map(lambda s: run_seed(s, seed_config(experiment, s, data_dir), out), args.seeds))
    acc = np.array([r["accuracy"] for r in recs])
    for r in recs:
        inside = band[0] <= r["accuracy"] <= band[1]
        print(f"seed {r['seed']:>3}: loss {r['loss_first']:.2f} -> {r['loss_last']:.3f}, accuracy "
              f"{100 * r['accuracy']:5.1f}% ({round(r['accuracy'] * r['accuracy_n'])}/{r['accuracy_n']}), "
              f"train {r['train_seconds']:.0f} s{'' if inside else '  OUTSIDE sft.accuracy_band'}")
    summary = {
        "experiment": experiment["experiment"], "sft": experiment["defaults"]["sft"], "seeds": args.seeds,
        "accuracy": acc.tolist(), "loss_last": [r["loss_last"] for r in recs],
        "min": float(acc.min()), "median": float(np.median(acc)), "mean": float(acc.mean()), "max": float(acc.max()),
        "band": band, "outside_band": [r["seed"] for r in recs if not band[0] <= r["accuracy"] <= band[1]],
    }
    print(f"accuracy over {len(recs)} seeds: min {100 * summary['min']:.1f}%, median {100 * summary['median']:.1f}%, "
          f"mean {100 * summary['mean']:.1f}%, max {100 * summary['max']:.1f}%; outside the band {band}: "
          f"{summary['outside_band'] or 'none'}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
