"""Data preparation entry points.

    python -m ctpo.data deepscaler --source S --out data/deepscaler/train.parquet [--expected-rows N] [--revision R]
    python -m ctpo.data benchmarks --experiment configs/experiments/paper.yaml --out <manifest.json>
    python -m ctpo.data toy --out-dir data/toy --n-train N --n-test M --seed S

Errors (bad file, checksum mismatch, wrong row count) print one line naming the file and exit 1.
"""
from __future__ import annotations

import argparse
import json
import sys

from ctpo.data.benchmarks import BENCHMARK_DIR, DataError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ctpo.data", description="prepare training and benchmark data")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("deepscaler", help="DeepScaleR (hub id or local .parquet/.json/.jsonl) -> verl parquet")
    d.add_argument("--source", required=True, help="agentica-org/DeepScaleR-Preview-Dataset or a local file")
    d.add_argument("--out", required=True)
    d.add_argument("--expected-rows", type=int, default=None, help="fail unless the source has exactly N rows")
    d.add_argument("--split", default="train")
    d.add_argument("--revision", default=None, help="hub revision (commit) to pin; ignored for local files")
    b = sub.add_parser("benchmarks", help="verify benchmark parquet checksums + schema, write a manifest")
    b.add_argument("--experiment", required=True, help="experiment YAML with data.benchmarks and data.checksums")
    b.add_argument("--out", required=True, help="manifest JSON")
    b.add_argument("--data-dir", default=str(BENCHMARK_DIR), help="directory holding {benchmark}.parquet")
    t = sub.add_parser("toy", help="generate the toy arithmetic task (train + test parquet)")
    t.add_argument("--out-dir", required=True)
    t.add_argument("--n-train", type=int, required=True)
    t.add_argument("--n-test", type=int, required=True)
    t.add_argument("--seed", type=int, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        if a.cmd == "deepscaler":
            from ctpo.data.deepscaler import prepare

            summary = prepare(a.source, a.out, expected_rows=a.expected_rows, split=a.split, revision=a.revision)
        elif a.cmd == "benchmarks":
            from ctpo.config import load_experiment
            from ctpo.data.benchmarks import verify_all
            from ctpo.io import write_json

            summary = verify_all(load_experiment(a.experiment), a.data_dir)
            write_json(a.out, summary)
        else:
            from ctpo.data.toy_task import write_toy_data

            paths = write_toy_data(a.out_dir, a.n_train, a.n_test, a.seed)
            summary = {k: str(v) for k, v in paths.items()}
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
