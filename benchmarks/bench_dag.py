"""Wall time of a dry-run of the full paper DAG (target < 3 s), and optionally of `make demo`.

    python benchmarks/bench_dag.py [--repeats 5] [--demo]

The dry-run runs `snakemake -n --configfile configs/experiments/paper.yaml` in a temporary copy of the
workflow (no .snakemake/ state in the checkout), `--repeats` times; the baseline is the bare start-up
of the same interpreter importing snakemake, so the ratio shows what parsing + DAG building add.
`--demo` times `python -m ctpo.demo --jobs 2` in the checkout itself (minutes; writes results/toy).
Prints one markdown table row per measurement.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def timed(cmd: list[str], cwd: Path) -> float:
    env = dict(os.environ, PATH=f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}", WANDB_MODE="offline")
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--demo", action="store_true", help="also time `python -m ctpo.demo --jobs 2` (minutes)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wf = Path(tmp)
        shutil.copy2(REPO / "Snakefile", wf / "Snakefile")
        for d in ("workflow", "configs", "profiles", "envs"):
            shutil.copytree(REPO / d, wf / d)
        dry = [PY, "-m", "snakemake", "-n", "--quiet", "all", "--configfile", "configs/experiments/paper.yaml"]
        base = [PY, "-c", "import snakemake.api"]
        timed(dry, wf)  # warm the file cache
        t_dry = [timed(dry, wf) for _ in range(args.repeats)]
        t_base = [timed(base, wf) for _ in range(args.repeats)]
    md, mb = statistics.median(t_dry), statistics.median(t_base)
    print("| measurement | median s (of %d) | min s | vs. bare `import snakemake.api` |" % args.repeats)
    print("|---|---|---|---|")
    print(f"| paper DAG dry-run (150 jobs), `snakemake -n` | {md:.2f} | {min(t_dry):.2f} | {md / mb:.1f}x |")
    print(f"| bare `import snakemake.api` | {mb:.2f} | {min(t_base):.2f} | 1.0x |")
    if args.demo:
        t = timed([PY, "-m", "ctpo.demo", "--jobs", "2"], REPO)
        print(f"| `python -m ctpo.demo --jobs 2` (toy, end to end) | {t:.0f} | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
