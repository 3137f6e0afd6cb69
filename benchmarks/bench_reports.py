"""Reports benchmark: wall time to regenerate every table and figure from a SYNTHETIC paper-size results tree,
and the streaming diagnostics' peak memory against reading a whole dump at once.

    .venv/bin/python benchmarks/bench_reports.py [--out results/_synthetic] [--regen] [--repeats 3]

1. Builds `results/_synthetic` from configs/experiments/paper.yaml if missing (or with --regen):
   7 runs x 16 checkpoints x 8 benchmarks x 30 problems x 32 samples, metrics.jsonl of 305 steps,
   3 diagnostics files. Not timed against the target.
2. Times `python -m ctpo.reports tables` and `... figures` as subprocesses (what Snakemake runs, Python
   start-up included), `repeats` times each, and reports the median; target: tables + figures < 20 s.
3. Diagnostics on a synthetic dump (N x T tokens, iid log ratios): streamed in row chunks vs the whole
   arrays loaded with np.load and fed in one update. Peak traced memory (tracemalloc) and wall time,
   side by side, with their ratios.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ctpo.config import load_experiment  # noqa: E402
from ctpo.diagnostics.bands import clip_bands, plan_bands  # noqa: E402
from ctpo.diagnostics.run import diagnose  # noqa: E402
from ctpo.diagnostics.stream import PositionAccumulator  # noqa: E402
from ctpo.reports.synthetic import write_synthetic  # noqa: E402

TARGET_S = 20.0


def _timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) for one run of `cmd`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def bench_reports(root: Path, repeats: int) -> dict:
    exp = root / "experiment.json"
    with tempfile.TemporaryDirectory() as tmp:
        cmds = {
            "tables": [sys.executable, "-m", "ctpo.reports", "tables", "--experiment", str(exp), "--results",
                       str(root), "--out", f"{tmp}/tables"],
            "figures": [sys.executable, "-m", "ctpo.reports", "figures", "--experiment", str(exp), "--results",
                        str(root), "--out", f"{tmp}/figures"],
        }
        times = {k: [_timed(c) for _ in range(repeats)] for k, c in cmds.items()}
    med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    med["total"], cpu["total"] = med["tables"] + med["figures"], cpu["tables"] + cpu["figures"]
    return {"runs": times, "median": med, "cpu": cpu}


def _write_dump(path: Path, n: int, t: int, sigma: float, rng) -> None:
    new = rng.normal(0.0, sigma, (n, t)).astype(np.float32)
    lengths = rng.integers(t // 8, t + 1, n)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int8)
    np.savez(path, old_log_prob=np.zeros_like(new), log_prob=new, response_mask=mask,
             advantages=np.zeros(n, np.float32))


def bench_diagnostics(n: int, t: int, chunk_rows: int) -> dict:
    bands = clip_bands(plan_bands(load_experiment(REPO / "configs/experiments/paper.yaml")))  # the paper's Figure 1 bands
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "step50.npz"
        _write_dump(dump, n, t, 0.01, np.random.default_rng(0))
        for name in ("streamed", "whole"):
            tracemalloc.start()
            t0 = time.perf_counter()
            if name == "streamed":
                diagnose(dump, bands, bin_width=250, chunk_rows=chunk_rows)
            else:
                z = np.load(dump)
                acc = PositionAccumulator(bands)
                acc.update(z["old_log_prob"], z["log_prob"], z["response_mask"])
                acc.binned(250)
            elapsed = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            out[name] = {"seconds": elapsed, "peak_mib": peak / 2**20}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "results/_synthetic"))
    ap.add_argument("--regen", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dump-rows", type=int, default=1024)
    ap.add_argument("--dump-tokens", type=int, default=8000)
    ap.add_argument("--chunk-rows", type=int, default=64)
    args = ap.parse_args()
    root = Path(args.out)
    if args.regen or not (root / "experiment.json").exists():
        t0 = time.perf_counter()
        write_synthetic(load_experiment(REPO / "configs/experiments/paper.yaml"), root)
        print(f"synthetic tree written to {root} in {time.perf_counter() - t0:.1f} s (not part of the target)")
    r = bench_reports(root, args.repeats)
    m, c = r["median"], r["cpu"]
    print(f"reports from the synthetic paper-size tree (median of {args.repeats}), wall [CPU]: tables "
          f"{m['tables']:.2f} [{c['tables']:.2f}] s, figures {m['figures']:.2f} [{c['figures']:.2f}] s, total "
          f"{m['total']:.2f} [{c['total']:.2f}] s; target {TARGET_S:.0f} s wall (total / target = "
          f"{m['total'] / TARGET_S:.2f}); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    d = bench_diagnostics(args.dump_rows, args.dump_tokens, args.chunk_rows)
    s, w = d["streamed"], d["whole"]
    print(f"diagnostics on a {args.dump_rows} x {args.dump_tokens} dump: streamed ({args.chunk_rows}-row chunks) "
          f"{s['seconds']:.2f} s, peak {s['peak_mib']:.0f} MiB | whole arrays {w['seconds']:.2f} s, peak "
          f"{w['peak_mib']:.0f} MiB | memory ratio whole/streamed = {w['peak_mib'] / s['peak_mib']:.1f}x, "
          f"time ratio streamed/whole = {s['seconds'] / w['seconds']:.2f}")


if __name__ == "__main__":
    main()
