"""Steps per second on the toy: verl's own trainer on CPU (the `cpu` device profile of the verl launcher)
vs the local CPU trainer, side by side, same config, same warm start.

    .venv/bin/python benchmarks/bench_verl_vs_local.py [--init runs/toy_verl/sft/seed0/policy] [--steps 4]

Both runs use configs/experiments/toy_verl.yaml (toy_ctpo: 8 prompts x 4 responses, 2 mini-batch updates per
step) from the same SFT warm start (trained first without --init), each through its real entry point
(`python -m ctpo.train`), one after the other. Per-step seconds are each backend's own `time/step_s` in
metrics.jsonl (rollout + old log-probs + updates; verl adds its reward workers and TransferQueue); the
verl launch's wall time minus its steps is its start-up (Ray, workers, model load), the validation verl
runs after the last step, and the final checkpoint. Output lines are timestamped as they arrive, so the
verl launch is split into: launch -> "Started a local Ray instance" (imports + `ray.init`), launch -> start
of step 1 (Ray, TaskRunner, TransferQueue, FSDP2 worker, rollout server, agent-loop and reward workers,
model load), and the rest after the last step. OMP_NUM_THREADS is inherited by both runs (set it once).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
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
    proc = subprocess.Popen([sys.executable, "-m", "ctpo.train", "--config", str(cfg_path), "--results", str(res),
                             "--workdir", str(wd), "--init", str(policy)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[tuple[float, str]] = []  # (seconds since launch, line)

    def read() -> None:
        for raw in proc.stdout:
            lines.append((time.perf_counter() - t0, raw.decode(errors="replace").rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    reader.join(timeout=60)
    (root / f"{backend}.log").write_text("".join(f"{t:9.2f} {line}\n" for t, line in lines))
    if rc != 0:
        raise SystemExit(f"{backend} run failed ({rc}):\n" + "\n".join(line for _, line in lines[-60:]))
    rows = [json.loads(line) for line in (res / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["time/step_s"] for r in rows]
    out = {"backend": backend, "steps": len(rows), "wall_s": wall, "step_s": step_s,
           "median_step_s": statistics.median(step_s), "overhead_s": wall - sum(step_s),
           "ray_up_s": _first(lines, r"Started a local Ray instance"), "to_step1_s": None}
    step1_logged = _first(lines, r"step:1 - .*timing_s/step:")  # verl's console logger, end of step 1
    if step1_logged is not None:
        out["to_step1_s"] = step1_logged - step_s[0]
    return out


def _first(lines: list[tuple[float, str]], pattern: str) -> float | None:
    rx = re.compile(pattern)
    return next((t for t, line in lines if rx.search(line)), None)


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
    if ver["to_step1_s"] is not None:
        rest = ver["wall_s"] - ver["to_step1_s"] - sum(ver["step_s"])
        ray = f"{ver['ray_up_s']:.1f} s to 'Started a local Ray instance', " if ver["ray_up_s"] is not None else ""
        print(f"verl launch: {ray}{ver['to_step1_s']:.1f} s from launch to the start of step 1, "
              f"{sum(ver['step_s']):.1f} s in {ver['steps']} steps, {rest:.1f} s after the last step "
              f"(validation, final save, shutdown, conversion)")
    (root / "bench.json").write_text(json.dumps(results, indent=1))
    print(f"logs and bench.json in {root}")


if __name__ == "__main__":
    main()
