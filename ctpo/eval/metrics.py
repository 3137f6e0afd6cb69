"""Evaluation metrics over per-sample records (numpy + pandas only; reports import this, so no torch).

Records are rows of `ctpo.schema.EVAL_COLUMNS`: one row per (problem_id, sample_index). With k samples
per problem and c_i of them correct for problem i (P problems):

    avg_at_k          = (1 / P) * sum_i c_i / k                                 (the paper's avg@32)
    pass_at_k(n, c, k) = 1 - C(n - c, k) / C(n, k)                               (Chen et al. 2021, unbiased)
                       = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)                 (stable product form)

Uncertainty is over problems: a percentile bootstrap that resamples problems with replacement
(`bootstrap_ci`), a paired bootstrap of the difference of two methods on the same problems
(`paired_bootstrap`), and a Student-t interval across training seeds (`aggregate_seeds`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

CI_LEVEL = 0.95
N_BOOT = 10_000


class EvalDataError(ValueError):
    """Per-sample records that break the k-samples-per-problem contract; the message names the source."""


# ----------------------------------------------------------------------------- per-problem counts


def check_k_samples(records: pd.DataFrame, k: int, source: str) -> None:
    """Every problem must hold exactly the sample indices 0..k-1, each once. Raises EvalDataError naming `source`."""
    if len(records) == 0:
        raise EvalDataError(f"{source}: no evaluation records")
    dup = records.duplicated(["problem_id", "sample_index"])
    if dup.any():
        row = records[dup].iloc[0]
        raise EvalDataError(
            f"{source}: problem '{row.problem_id}' has sample_index {row.sample_index} more than once"
        )
    bad_index = (records["sample_index"] < 0) | (records["sample_index"] >= k)
    if bad_index.any():
        row = records[bad_index].iloc[0]
        raise EvalDataError(
            f"{source}: problem '{row.problem_id}' has sample_index {row.sample_index}, expected 0..{k - 1}"
        )
    counts = records.groupby("problem_id", sort=True)["sample_index"].count()
    wrong = counts[counts != k]
    if len(wrong):
        raise EvalDataError(
            f"{source}: expected exactly k={k} samples per problem; problem '{wrong.index[0]}' has "
            f"{int(wrong.iloc[0])} ({len(wrong)} of {len(counts)} problems are incomplete)"
        )


def correct_counts(records: pd.DataFrame) -> pd.DataFrame:
    """(P rows) problem_id, n (samples), c (correct samples), sorted by problem_id."""
    g = records.groupby("problem_id", sort=True)["correct"]
    return pd.DataFrame({"n": g.count(), "c": g.sum().astype(np.int64)}).reset_index()


# ----------------------------------------------------------------------------- point estimates


def avg_at_k(c: Sequence[int] | np.ndarray, k: int) -> float:
    """Mean over problems of c_i / k. `c`: (P,) correct counts out of k samples each."""
    c = np.asarray(c, dtype=np.float64)
    if c.size == 0:
        raise EvalDataError("avg_at_k: no problems")
    return float(np.mean(c / k))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples, c correct: 1 - C(n-c, k) / C(n, k), computed stably."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def mean_pass_at_k(n: Sequence[int], c: Sequence[int], k: int) -> float:
    """pass@k averaged over problems; `n`, `c`: (P,)."""
    return float(np.mean([pass_at_k(int(ni), int(ci), k) for ni, ci in zip(n, c)]))


def pass_at_k_ladder(k: int) -> list[int]:
    """The k' reported for pass@k': powers of two below k, then k itself (k=32 -> 1, 2, 4, 8, 16, 32)."""
    out, j = [], 1
    while j < k:
        out.append(j)
        j *= 2
    return out + [k]


# ----------------------------------------------------------------------------- bootstrap over problems


def bootstrap_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot,) means of `values` (P,) resampled with replacement.

    Resample b uses the b-th row of `default_rng(seed).integers(0, P, size=(n_boot, P))`, i.e. the same
    draws as calling `rng.integers(0, P, size=P)` n_boot times in a loop.
    """
    values = np.asarray(values, dtype=np.float64)
    p = values.size
    if p == 0:
        raise EvalDataError("bootstrap: no problems")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, p, size=(n_boot, p))  # (n_boot, P)
    return values[idx].mean(axis=1)


def _percentile_ci(samples: np.ndarray, level: float) -> list[float]:
    alpha = 1.0 - level
    lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return [float(lo), float(hi)]


def bootstrap_ci(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0, level: float = CI_LEVEL) -> list[float]:
    """Percentile bootstrap CI [lo, hi] of the mean of per-problem scores `values` (P,)."""
    return _percentile_ci(bootstrap_means(np.asarray(values), n_boot, seed), level)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], n_boot: int = N_BOOT, seed: int = 0, level: float = CI_LEVEL
) -> dict:
    """Difference of two methods scored on the same problems, `a` and `b` (P,) aligned by problem.

    Resamples problems (the same resample for both methods) and returns
    {mean_diff: mean(a - b), ci95: [lo, hi] of the resampled mean differences,
     frac_le_0: fraction of resamples whose mean difference is <= 0 (a one-sided bootstrap p-value for a > b)}.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise EvalDataError(f"paired_bootstrap: methods cover different problem sets ({a.size} vs {b.size})")
    diffs = bootstrap_means(a - b, n_boot, seed)
    return {
        "mean_diff": float(np.mean(a - b)),
        "ci95": _percentile_ci(diffs, level),
        "frac_le_0": float(np.mean(diffs <= 0.0)),
        "n_problems": int(a.size),
        "n_boot": int(n_boot),
    }


def paired_records(a: pd.DataFrame, b: pd.DataFrame, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-problem c/k of two record sets, aligned on problem_id; their problem sets must be equal."""
    ca, cb = correct_counts(a).set_index("problem_id"), correct_counts(b).set_index("problem_id")
    if set(ca.index) != set(cb.index):
        only = sorted(set(ca.index) ^ set(cb.index))[:3]
        raise EvalDataError(f"paired comparison: problem sets differ (e.g. {only})")
    cb = cb.loc[ca.index]
    return ca["c"].to_numpy() / k, cb["c"].to_numpy() / k


# ----------------------------------------------------------------------------- across seeds


def _student_t_cdf(x: float, dof: int) -> float:
    """P(T <= x) for Student's t with `dof` degrees of freedom, by Simpson integration of the density."""
    if x < 0:
        return 1.0 - _student_t_cdf(-x, dof)
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    m = 4000  # even number of Simpson intervals on [0, x]
    # substitute x = tan(u) so the heavy tail stays well-resolved for large x
    u = np.linspace(0.0, math.atan(x), m + 1)
    t = np.tan(u)
    f = np.exp(log_norm - (dof + 1) / 2 * np.log1p(t * t / dof)) / np.cos(u) ** 2
    h = (u[-1] - u[0]) / m
    integral = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + float(integral)


def student_t_quantile(p: float, dof: int) -> float:
    """The p-quantile of Student's t (0.5 < p < 1), by bisection on `_student_t_cdf`."""
    if not 0.5 < p < 1 or dof < 1:
        raise ValueError(f"student_t_quantile: need 0.5 < p < 1 and dof >= 1, got p={p}, dof={dof}")
    lo, hi = 0.0, 1.0
    while _student_t_cdf(hi, dof) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _student_t_cdf(mid, dof) < p else (lo, mid)
    return (lo + hi) / 2


def aggregate_seeds(values: Sequence[float], level: float = CI_LEVEL) -> dict:
    """Mean and Student-t CI across training seeds: mean +- t_{(1+level)/2, S-1} * std / sqrt(S).

    `values`: (S,) one score per seed (e.g. avg@k of each seed). With a single seed the CI is None.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise EvalDataError("aggregate_seeds: no seeds")
    mean = float(v.mean())
    if v.size == 1:
        return {"mean": mean, "std": None, "ci95": None, "n_seeds": 1, "values": v.tolist()}
    std = float(v.std(ddof=1))
    half = student_t_quantile((1 + level) / 2, v.size - 1) * std / math.sqrt(v.size)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n_seeds": int(v.size), "values": v.tolist()}


# ----------------------------------------------------------------------------- one evaluation


def summarize(records: pd.DataFrame, k: int, source: str, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """The sidecar's scores for one (checkpoint, benchmark): checks k samples per problem first.

    Returns {k, n_problems, n_samples, avg_at_k, pass_at_k {str(k'): value}, ci95 [lo, hi] (bootstrap over
    problems of c/k), extraction_failure_rate (fraction of samples whose answer could not be extracted)}.
    """
    check_k_samples(records, k, source)
    counts = correct_counts(records)
    n, c = counts["n"].to_numpy(), counts["c"].to_numpy()
    return {
        "k": int(k),
        "n_problems": int(len(counts)),
        "n_samples": int(len(records)),
        "avg_at_k": avg_at_k(c, k),
        "pass_at_k": {str(j): mean_pass_at_k(n, c, j) for j in pass_at_k_ladder(k)},
        "ci95": bootstrap_ci(c / k, n_boot=n_boot, seed=seed),
        "extraction_failure_rate": float(records["extraction_failed"].astype(bool).mean()),
    }


def load_eval(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """(records, sidecar) of one evaluation `{bench}.parquet` + `{bench}.json`, checked: k samples per problem
    (k from the sidecar) and the sidecar's avg@k equal to the records' (a stale or mixed-up pair fails)."""
    path = Path(path)
    side_path = path.with_suffix(".json")
    for p in (path, side_path):
        if not p.is_file():
            raise EvalDataError(f"{p}: evaluation output not found")
    records = pd.read_parquet(path)
    sidecar = json.loads(side_path.read_text())
    if "k" not in sidecar or "avg_at_k" not in sidecar:
        raise EvalDataError(f"{side_path}: expected keys 'k' and 'avg_at_k'")
    k = int(sidecar["k"])
    check_k_samples(records, k, str(path))
    recomputed = avg_at_k(correct_counts(records)["c"].to_numpy(), k)
    if not math.isclose(recomputed, float(sidecar["avg_at_k"]), abs_tol=1e-9):
        raise EvalDataError(
            f"{side_path}: avg_at_k {sidecar['avg_at_k']} does not match its records ({recomputed}); rerun the evaluation"
        )
    return records, sidecar
