"""A SYNTHETIC paper-size results tree, for the reports benchmark and tests. Never real results.

`python -m ctpo.reports synthetic --experiment configs/experiments/paper.yaml --out results/_synthetic`
writes, under OUT (whose name must contain 'synthetic'; results/paper is refused) and at the paths of
`ctpo.layout.results(OUT)`:

  experiment              the experiment with label 'synthetic' (every title then says so)
  eval, eval_json         every run x saved step (`ctpo.layout.saved_steps`) x benchmark, k samples/problem
  metrics                 one row per step (ctpo.schema.TRAIN_KEYS)
  diag, diag_json         from the real PositionAccumulator on iid log ratios
  table1                  the real (quick) Monte-Carlo study
  SYNTHETIC.txt           what this is

Every JSON object / JSONL row carries "synthetic": true and every parquet file has the schema metadata
synthetic=true. Accuracies follow a made-up saturating curve per method; nothing here is a measurement.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ctpo import schema
from ctpo.config import experiment_grader
from ctpo.grading import correct_column
from ctpo.diagnostics.stream import ClipBands, PositionAccumulator, fit_sqrt_t
from ctpo.diagnostics.bands import clip_bands, plan_bands
from ctpo.io import atomic_path, write_json, write_text
from ctpo.layout import results, saved_steps
from ctpo.reports.table1 import QUICK, run_study

# made-up final accuracy gain and clip fraction level per method (synthetic shapes only)
_GAIN = {"grpo": 0.06, "gspo": 0.08, "ctpo": 0.12, "ctpo_fixed": 0.09, "full_seq": 0.04}
_CLIP = {"grpo": 0.002, "gspo": 0.15, "ctpo": 0.04, "ctpo_fixed": 0.05, "full_seq": 0.3}
_BASE = {"qwen3_4b": 0.35, "qwen3_14b": 0.45}


def _write_parquet_synthetic(path: Path, df: pd.DataFrame) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"synthetic": b"true"})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _eval_records(rng, difficulty: np.ndarray, acc: float, k: int, bench: str, grader: str) -> pd.DataFrame:
    p_problem = 1 / (1 + np.exp(-(np.log(acc / (1 - acc)) - difficulty)))  # (P,)
    correct = rng.random((difficulty.size, k)) < p_problem[:, None]  # (P, k)
    n = correct.size
    failed = rng.random(n) < 0.02
    correct = correct.ravel() & ~failed
    lenient = rng.random(n) < 0.05  # the release grader credits some answers the strict one does not
    by_grader = ({"release": correct, "strict": correct & ~lenient} if grader == "release"
                 else {"release": correct | lenient, "strict": correct})
    return pd.DataFrame({
        "problem_id": np.repeat([f"{bench}-{i:03d}" for i in range(difficulty.size)], k),
        "sample_index": np.tile(np.arange(k), difficulty.size).astype(np.int64),
        "ground_truth": "0",
        "extracted_answer": np.where(failed, "", "0"),
        "extraction_failed": failed,
        "correct": correct,
        "grader": grader,
        **{correct_column(g): v for g, v in by_grader.items()},
        "turns": rng.integers(1, 6, n).astype(np.int64),
        "tool_calls": rng.integers(0, 5, n).astype(np.int64),
        "response_length": rng.integers(500, 8000, n).astype(np.int64),
    })


def _metrics_rows(rng, method: str, total_steps: int) -> list[dict]:
    rows = []
    for step in range(1, total_steps + 1):
        prog = 1 - np.exp(-step / 120)
        row = {k: float(rng.normal(0, 0.01)) for k in schema.TRAIN_KEYS}
        row.update({
            schema.STEP: step,
            schema.REWARD_MEAN: 0.4 + 0.2 * prog + rng.normal(0, 0.02),
            schema.ACCURACY: 0.4 + 0.2 * prog + rng.normal(0, 0.02),
            schema.CLIP_FRAC: _CLIP.get(method, 0.05) * (1 + 0.1 * rng.normal()),
            schema.CLIP_FRAC_ACTIVE: 0.6 * _CLIP.get(method, 0.05) * (1 + 0.1 * rng.normal()),
            schema.RESPONSE_LENGTH: 2500 + 2500 * prog + rng.normal(0, 100),
            schema.MODEL_TOKENS: 2000 + 2000 * prog,
            schema.STEP_TIME_S: 600 + rng.normal(0, 20),
            "synthetic": True,
        })
        rows.append(row)
    return rows


def _diagnostics(rng, step: int, bands: ClipBands, bin_width: int, max_len: int, n_seq: int,
                 min_bin_tokens: int = 1) -> tuple:
    sigma = 0.008 + 0.002 * step / 100  # made-up per-token log-ratio std, growing with the step
    acc = PositionAccumulator(bands)
    lengths = rng.integers(max_len // 8, max_len + 1, n_seq)
    for s in range(0, n_seq, 32):
        n = min(32, n_seq - s)
        new = rng.normal(-0.5 * sigma**2, sigma, (n, max_len)).astype(np.float32)
        mask = (np.arange(max_len)[None, :] < lengths[s : s + n, None]).astype(np.int8)
        acc.update(np.zeros_like(new), new, mask)
    cols = acc.binned(bin_width)
    kept = cols["n_tokens"] >= min_bin_tokens
    sigma_hat, r2 = fit_sqrt_t(cols["t_mid"][kept], cols["std_log_rho_cum"][kept], cols["n_tokens"][kept])
    meta = {"step": step, "sigma_hat": sigma_hat, "r2": r2, "n_sequences": n_seq, "n_tokens": int(cols["n_tokens"].sum()),
            "max_t": int(acc.count.size), "bin_width": bin_width, "min_bin_tokens": min_bin_tokens, "fixed_bounds": [bands.fixed_lo, bands.fixed_hi],
            "adaptive": {"eps_low": bands.eps_low, "eps_high": bands.eps_high, "power": bands.power}, "synthetic": True}
    return pd.DataFrame(cols), meta


def write_synthetic(exp: dict, out: str | Path, n_problems: int = 30, n_diag_sequences: int = 256, seed: int = 0) -> Path:
    """Write the synthetic tree for experiment `exp` under `out`; returns `out`."""
    out = Path(out)
    if "synthetic" not in out.name:
        raise ValueError(f"--out {out}: a synthetic tree's directory name must contain 'synthetic'")
    rng = np.random.default_rng(seed)
    k, seeds = exp["defaults"]["eval"]["k"], exp["seeds"]
    total, freq = exp["defaults"]["train"]["total_steps"], exp["defaults"]["train"]["save_freq"]
    benches, steps, tree = exp["data"]["benchmarks"], saved_steps(total, freq), results(out)
    difficulty = {b: rng.normal(0, 1.5, n_problems) for b in benches}
    grader = experiment_grader(exp)
    for run, spec in exp["runs"].items():
        base, gain = _BASE.get(spec["model"], 0.3), _GAIN.get(spec["method"], 0.05)
        for s in seeds:
            for step in steps:
                acc = base + gain * (1 - np.exp(-step / 100))
                for b in benches:
                    where = dict(run=run, seed=s, step=step, bench=b)
                    records = _eval_records(rng, difficulty[b], acc, k, b, grader)
                    _write_parquet_synthetic(tree.path("eval", **where), records)
                    meta = {"synthetic": True, "experiment": exp["experiment"], "run": run, "seed": s, "step": step,
                            "benchmark": b, "label": "synthetic", "k": k, "n_problems": n_problems,
                            "grader": grader}
                    write_json(tree.path("eval_json", **where), meta)
            rows = _metrics_rows(rng, spec["method"], total)
            write_text(tree.path("metrics", run=run, seed=s), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    diag = exp["diagnostics"]
    bands = clip_bands(plan_bands(exp))  # Figure 1's bands as the workflow plans them (ctpo.diagnostics.bands)
    max_len = exp["defaults"]["rollout"]["max_response_tokens"]
    for s in seeds:
        for step in diag["steps"]:
            df, meta = _diagnostics(rng, step, bands, diag["bin_width"], max_len, n_diag_sequences,
                                    diag["min_bin_tokens"])
            where = dict(run=diag["run"], seed=s, step=step)
            _write_parquet_synthetic(tree.path("diag", **where), df)
            write_json(tree.path("diag_json", **where), {**meta, "run": diag["run"], "seed": s})
    write_json(tree.path("table1"), {**run_study(QUICK), "synthetic_tree": True})
    write_json(tree.path("experiment"), {**exp, "label": "synthetic", "synthetic": True})
    write_text(out / "SYNTHETIC.txt", "SYNTHETIC results tree written by `python -m ctpo.reports synthetic` "
               f"from experiment '{exp['experiment']}'. Made-up numbers for benchmarks and tests; not results.\n")
    return out
