"""Tables, figures and the eval / diagnostic summary numbers to W&B (one 'reports' run per experiment).

The CLI (`python -m ctpo.reports wandb ...`) logs only when the experiment's `wandb.mode` resolves to
online (ctpo.tracking.resolve_mode: auto = online when a key is configured). `log_reports` itself also
accepts mode='offline' (a local run directory to `wandb sync` later; the tests use it). wandb is imported
lazily; a failure to log is reported, never fatal to the report build.
"""
from __future__ import annotations

import sys
from pathlib import Path

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
            if "run" not in rec:
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
