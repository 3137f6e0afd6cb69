"""`make demo`: the toy experiment end to end through the Snakemake DAG, then a summary.

    python -m ctpo.demo --jobs 2 [--experiment configs/experiments/toy.yaml] [--seeds 0 1 2]

`--seeds` overrides the experiment's `seeds` (Snakemake `--config seeds=[...]`): the same runs are trained
once per seed (seed0's results are reused), and Tables 2-3 and Figure 2 then show the across-seed mean with
a 95% CI from a two-level bootstrap (seeds, then problems) instead of the one-seed bootstrap over problems
(`make demo-seeds`).

Runs `snakemake --cores JOBS --configfile EXPERIMENT` as a subprocess (the library never imports
Snakemake; its own progress output is shown as it goes), then `snakemake --report` for the HTML report,
and prints where the tables, figures, report and W&B offline runs are, with the headline numbers read
from the written tables. A rerun after success does nothing but print the summary again.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from ctpo import layout
from ctpo.config import REPO_ROOT, ConfigError, load_experiment

DEFAULT_EXPERIMENT = "configs/experiments/toy.yaml"


def snakemake_cmd(experiment: str, jobs: int, *extra: str, seeds: list[int] | None = None) -> list[str]:
    over = ["--config", f"seeds=[{','.join(str(s) for s in seeds)}]"] if seeds else []
    return [sys.executable, "-m", "snakemake", "--cores", str(jobs), "--configfile", experiment, *over, *extra]


def run(cmd: list[str]) -> int:
    """Run `cmd` in the repository root with this interpreter's bin/ first on PATH (rules call `python`)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=REPO_ROOT, env=env)


def wandb_offline_dirs(exp: str) -> list[Path]:
    """W&B offline run directories the toy runs wrote (under runs/{exp}/ or ./wandb)."""
    found = []
    for base in (REPO_ROOT / layout.path("runs", exp=exp), REPO_ROOT / "wandb"):
        if base.is_dir():
            found += sorted(p for p in base.rglob("offline-run-*") if p.is_dir())
    return found


def summary(exp: str, report: Path | None, elapsed_s: float) -> str:
    tables = REPO_ROOT / layout.path("tables", exp=exp)
    figures = REPO_ROOT / layout.path("figures", exp=exp)
    lines = [
        "",
        f"== ctpo demo: experiment '{exp}' finished in {elapsed_s / 60:.1f} min (toy scale: labelled toy) ==",
        f"tables : {tables.relative_to(REPO_ROOT)}/  ({', '.join(sorted(p.name for p in tables.glob('*.md')))})",
        f"figures: {figures.relative_to(REPO_ROOT)}/  ({', '.join(sorted(p.name for p in figures.glob('*.png')))})",
    ]
    if report is not None:
        lines.append(f"report : {report.relative_to(REPO_ROOT)}  (open in a browser)")
    wb = wandb_offline_dirs(exp)
    lines.append(f"W&B    : {len(wb)} offline run dir(s)" + (f", e.g. {wb[0].relative_to(REPO_ROOT)}" if wb else ""))
    if wb:
        lines.append("         upload later with: wandb sync <dir>")
    for name in ("table2", "table3"):
        md = tables / f"{name}.md"
        if md.is_file():
            lines += ["", f"-- {md.relative_to(REPO_ROOT)} --", md.read_text().rstrip()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctpo.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="CPU cores for Snakemake (parallel jobs)")
    ap.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="experiment YAML (default: the toy)")
    ap.add_argument("--no-report", action="store_true", help="skip the HTML report")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="training seeds (default: the experiment's); >= 2 gives across-seed CIs in the tables")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        print(f"error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    if args.seeds is not None and (len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0):
        print(f"error: --seeds must be distinct non-negative integers, got {args.seeds}", file=sys.stderr)
        return 2
    try:
        exp = load_experiment(REPO_ROOT / args.experiment)["experiment"]
    except (ConfigError, KeyError) as e:
        print(f"error: {args.experiment}: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    rc = run(snakemake_cmd(args.experiment, args.jobs, seeds=args.seeds))
    if rc != 0:
        print(f"error: snakemake failed (exit {rc}); see the failed job's log under logs/{exp}/", file=sys.stderr)
        return rc
    report = None
    if not args.no_report:
        report = REPO_ROOT / layout.path("report", exp=exp)
        rc = run(snakemake_cmd(args.experiment, args.jobs, "--report", str(report.relative_to(REPO_ROOT)),
                               seeds=args.seeds))
        if rc != 0:
            print(f"error: snakemake --report failed (exit {rc})", file=sys.stderr)
            return rc
    print(summary(exp, report, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
