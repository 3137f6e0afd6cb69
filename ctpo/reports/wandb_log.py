"""Tables, figures and the eval / diagnostic summary numbers to W&B (one 'reports' run per experiment),
and the evaluation curves: one `eval` run per (run, seed) whose x axis is `train_step`, beside that
training run in its group (`log_eval_curves`). Evaluation jobs themselves never open W&B runs.

The CLI (`python -m ctpo.reports wandb ...`) logs only when the experiment's `wandb.mode` resolves to
online (ctpo.tracking.resolve_mode: auto = online when a key is configured). `log_reports` itself also
accepts mode='offline' (a local run directory to `wandb sync` later; the tests use it). wandb is imported
lazily; a failure to log is reported, never fatal to the report build.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hashlib
import json

from ctpo.io import read_json
from ctpo.reports.load import Results
from ctpo.tracking import run_id_for


def summary_metrics(exp: dict, results: Results, tables: dict) -> dict:
    """Flat scalars: eval/{run}/{bench}/avg_at_k (+ average) from Table 2/3 and diag/step{N}/{sigma_hat,r2,...}."""
    out = {}
    for t in tables["tables"]:
        if t["name"] not in ("table2", "table3"):
            continue
        for rec in t["data"]:
            if "run" not in rec or rec.get("excluded"):  # the difference row; a run whose every seed was excluded
                continue
            for bench, b in rec["benchmarks"].items():
                out[f"eval/{rec['run']}/{bench}/avg_at_k"] = b["mean"]
            out[f"eval/{rec['run']}/average/avg_at_k"] = rec["average"]["mean"]
    diag, seed = exp["diagnostics"], exp["seeds"][0]
    for step in diag["steps"]:
        _, meta = results.diagnostics(diag["run"], seed, step)
        for key in ("sigma_hat", "r2", "clip_rate_fixed", "clip_rate_adaptive"):
            if key in meta:
                out[f"diag/step{step}/{key}"] = meta[key]
    return out


def log_reports(exp: dict, results: Results, tables_dir: str | Path, figures_dir: str | Path, mode: str,
                wandb_dir: str | Path | None = None) -> str | None:
    """Log tables (wandb.Table), figures (wandb.Image) and summary scalars; returns the run id, or None on failure."""
    if mode not in ("online", "offline"):
        raise ValueError(f"log_reports: mode must be 'online' or 'offline', got '{mode}'")
    tables = read_json(Path(tables_dir) / "tables.json")
    figures = sorted(Path(figures_dir).glob("figure*.png"))
    try:
        import wandb

        run_id = run_id_for(exp["experiment"], "reports", 0)
        run = wandb.init(
            project=exp["wandb"]["project"], entity=exp["wandb"]["entity"], mode=mode, job_type="reports",
            group=f"{exp['experiment']}/reports", name=f"{exp['experiment']}-reports", id=run_id, resume="allow",
            dir=str(wandb_dir) if wandb_dir else None, config={"experiment": exp["experiment"], "label": exp["label"]},
        )
        payload = {f"tables/{t['name']}": wandb.Table(columns=t["columns"], data=t["rows"]) for t in tables["tables"]}
        payload.update({f"figures/{p.stem}": wandb.Image(str(p), caption=f"{p.stem} [{exp['label']}]") for p in figures})
        run.log(payload)
        run.summary.update(summary_metrics(exp, results, tables))
        run.finish()
        return run_id
    except Exception as e:  # tracking is never required
        print(f"warning: wandb logging of reports failed ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def eval_curve_rows(exp: dict, results: Results, run: str, seed: int) -> list[dict]:
    """One row per evaluated step of (run, seed), ascending: `train_step` and, per benchmark present,
    `eval/<bench>/avg_at_k` (from the per-sample records, as the tables compute it) plus
    `ci95_lo`, `ci95_hi`, `extraction_failure_rate`, `pass_at_<j>` when the eval sidecar JSON has them."""
    rows = []
    for step in results.eval_steps(run, seed):
        row: dict = {"train_step": step}
        for bench in exp["data"]["benchmarks"]:
            f = results.tree.path("eval_json", run=run, seed=seed, step=step, bench=bench)
            if not f.is_file():
                continue
            s = read_json(f)
            p = f"eval/{bench}/"
            row[p + "avg_at_k"] = float(results.eval_result(run, seed, step, bench).scores.mean())
            if "ci95" in s:
                row[p + "ci95_lo"], row[p + "ci95_hi"] = s["ci95"]
            if "extraction_failure_rate" in s:
                row[p + "extraction_failure_rate"] = s["extraction_failure_rate"]
            row.update({p + f"pass_at_{j}": v for j, v in s.get("pass_at_k", {}).items()})
        if len(row) > 1:
            rows.append(row)
    return rows


def log_eval_curves(exp: dict, results: Results, mode: str, wandb_dir: str | Path | None = None,
                    run_configs: dict | None = None) -> list[str]:
    """One W&B run per (run, seed) holding every evaluated step as a curve over `train_step`.

    The run id hashes the rows, so a rerun with the same evaluations reopens the same run (nothing twice
    in a curve) and new evaluations make a new run. `run_configs[(run, seed)]` (resolved run configs)
    gives group and config; else the group is `<experiment>/<run>`."""
    import wandb

    from ctpo.tracking import run_config_for_wandb, wandb_group

    ids = []
    for run in exp["runs"]:
        for seed in exp["seeds"]:
            if not results.eval_dir(run, seed).is_dir():
                continue
            rows = eval_curve_rows(exp, results, run, seed)
            if not rows:
                continue
            digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:8]
            cfg = (run_configs or {}).get((run, seed))
            w = wandb.init(
                project=exp["wandb"]["project"], entity=exp["wandb"]["entity"], mode=mode, job_type="eval",
                group=wandb_group(cfg) if cfg else f"{exp['experiment']}/{run}",
                name=f"{run}-seed{seed}-eval", id=run_id_for(exp["experiment"], f"{run}/eval/{digest}", seed),
                resume="allow", dir=str(wandb_dir) if wandb_dir else None,
                config=run_config_for_wandb(cfg) if cfg else {"run": run, "seed": seed},
            )
            w.define_metric("train_step")
            w.define_metric("eval/*", step_metric="train_step")
            for row in rows:
                w.log(row)
            ids.append(w.id)
            w.finish()
    return ids
