"""python -m ctpo.reports <command> (never imports torch):

  table1     --out results/{exp}/table1.json [--quick]              the Monte-Carlo bias/variance study
  tables     --experiment E --results results/{exp} --out results/{exp}/tables     Tables 1-3 (.md, .tex)
  figures    --experiment E --results results/{exp} --out figures/{exp}            Figures 1-2 (.pdf, .png)
  synthetic  --experiment configs/experiments/paper.yaml --out results/_synthetic  SYNTHETIC tree (bench/tests)
  wandb      --experiment E --results R --tables T --figures F [--out M]  eval curves + reports to W&B (online)

E is an experiment .yaml or .json. A missing input exits with status 2 and one line naming the file.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ctpo import layout
from ctpo.io import write_json


def _table1(args) -> None:
    from ctpo.reports.table1 import QUICK, Table1Config, format_text, run_study

    cfg = QUICK if args.quick else Table1Config()
    study = run_study(cfg)
    study["quick"] = bool(args.quick)
    write_json(args.out, study)
    print(format_text(study))
    failed = [k for k, v in study["checks"].items() if not v]
    if failed:
        print(f"warning: Table 1 checks that did not hold: {failed}", file=sys.stderr)


def _tables(args) -> None:
    from ctpo.reports.load import Results, read_experiment
    from ctpo.reports.tables import write_tables

    paths = write_tables(read_experiment(args.experiment), Results(args.results), args.out)
    print("wrote " + ", ".join(str(p) for p in paths))


def _figures(args) -> None:
    from ctpo.reports.figures import write_figures
    from ctpo.reports.load import Results, read_experiment

    paths = write_figures(read_experiment(args.experiment), Results(args.results), args.out)
    print("wrote " + ", ".join(str(p) for p in paths))


def _synthetic(args) -> None:
    from ctpo.config import load_experiment
    from ctpo.reports.synthetic import write_synthetic

    out = write_synthetic(load_experiment(args.experiment), args.out, n_problems=args.problems)
    print(f"wrote SYNTHETIC results tree {out} (experiment file: {layout.results(out).path('experiment')})")


def _wandb(args) -> None:
    import time as _time

    from ctpo.io import write_json
    from ctpo.reports.load import Results, read_experiment
    from ctpo.reports.wandb_log import log_eval_curves, log_reports
    from ctpo.tracking import fallback_message, usable_mode

    exp = read_experiment(args.experiment)
    t0 = _time.monotonic()
    mode, reason = usable_mode(exp["wandb"]["mode"])
    if mode not in ("online", "offline") or (mode == "offline" and not reason):
        print(f"wandb: mode resolves to '{mode}'; reports are logged only online (nothing sent)")
        ids, report_id = [], None
    else:
        wandb_dir = Path(args.wandb_dir or layout.path("reports_wandb", exp=exp["experiment"]))
        wandb_dir.mkdir(parents=True, exist_ok=True)
        if reason:
            print(fallback_message(reason, _time.monotonic() - t0, wandb_dir / "wandb"), file=sys.stderr)
        results = Results(args.results)
        run_configs = {}
        for run in exp["runs"]:
            for seed in exp["seeds"]:
                f = layout.results(args.results).path("run_config", run=run, seed=seed)
                if f.is_file():
                    run_configs[(run, seed)] = json.loads(f.read_text())
        ids = log_eval_curves(exp, results, mode, wandb_dir, run_configs)
        report_id = log_reports(exp, results, args.tables, args.figures, mode, wandb_dir)
        print(f"wandb ({mode}): eval curves in runs {', '.join(ids) or '(none)'}; "
              + (f"tables and figures in run {report_id}" if report_id else "reports logging failed (see warning)"))
    if args.out:
        write_json(args.out, {"mode": mode, "fallback_reason": reason, "eval_runs": ids, "reports_run": report_id})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctpo.reports", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("table1", help="Monte-Carlo bias/variance study (Table 1)")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="smaller policy pair and fewer samples (tests)")
    p.set_defaults(fn=_table1)
    for name, fn, out_help in (("tables", _tables, "tables directory"), ("figures", _figures, "figures directory")):
        p = sub.add_parser(name)
        p.add_argument("--experiment", required=True)
        p.add_argument("--results", required=True, help="results/{exp}")
        p.add_argument("--out", required=True, help=out_help)
        p.set_defaults(fn=fn)
    p = sub.add_parser("synthetic", help="write a SYNTHETIC paper-size results tree")
    p.add_argument("--experiment", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--problems", type=int, default=30, help="problems per benchmark")
    p.set_defaults(fn=_synthetic)
    p = sub.add_parser("wandb", help="log eval curves, tables and figures to W&B (online; offline if unreachable)")
    for opt in ("--experiment", "--results", "--tables", "--figures"):
        p.add_argument(opt, required=True)
    p.add_argument("--wandb-dir", help="where offline runs go (default runs/<exp>/reports)")
    p.add_argument("--out", help="marker JSON: mode and the W&B run ids")
    p.set_defaults(fn=_wandb)
    args = ap.parse_args(argv)
    from ctpo.config import ConfigError
    from ctpo.eval.metrics import EvalDataError

    t0 = time.perf_counter()
    try:
        args.fn(args)
    except (ConfigError, EvalDataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:  # an experiment file without a section this command reads
        print(f"error: {getattr(args, 'experiment', 'input')}: missing key {e}", file=sys.stderr)
        return 2
    print(f"{args.command}: {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
