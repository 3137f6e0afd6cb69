"""Run every benchmark script in turn with its defaults (`make bench`); each prints its own table.

    python benchmarks/run_all.py [--only losses sandbox ...]

Benchmarks are measurements, not tests: nothing here fails on a missed target. Copy the printed rows into
BENCHMARKS.md together with the machine they ran on.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="names without the bench_ prefix, e.g. losses sandbox")
    args = ap.parse_args()
    if args.only:
        known = {s.stem.removeprefix("bench_"): s for s in scripts}
        unknown = sorted(set(args.only) - set(known))
        if unknown:
            print(f"run_all: unknown benchmark(s) {unknown}; have {sorted(known)}", file=sys.stderr)
            return 2
        scripts = [known[n] for n in args.only]
    failed = []
    for script in scripts:
        print(f"\n=== {script.name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(script)], cwd=HERE.parent)
        print(f"=== {script.name}: exit {rc}, {time.perf_counter() - t0:.1f} s", flush=True)
        if rc != 0:
            failed.append(script.name)
    if failed:
        print(f"run_all: failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
