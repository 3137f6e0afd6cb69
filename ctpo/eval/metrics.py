"""Evaluation metrics over per-sample records (numpy, pandas, scipy; reports import this, so no torch).

Records are rows of `ctpo.schema.EVAL_COLUMNS`: one row per (problem_id, sample_index). With k samples
per problem and c_i of them correct for problem i (P problems):

    avg_at_k          = (1 / P) * sum_i c_i / k                                 (the paper's avg@32)
    pass_at_k(n, c, k) = 1 - C(n - c, k) / C(n, k)                               (Chen et al. 2021, unbiased)
                       = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)                 (stable product form)

Uncertainty (scipy.stats for the library parts): a percentile bootstrap over problems (`bootstrap_ci`,
scipy.stats.bootstrap); over several training seeds a two-level bootstrap, seeds then problems
(`hierarchical_bootstrap`, ours: no library resamples two crossed levels), whose interval stays inside the
metric's range; the paired difference of two methods, by seed then by problem (`paired_bootstrap`); and
a Student-t interval (scipy.stats.t) for unbounded per-seed quantities (`aggregate_seeds`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

CI_LEVEL = 0.95
N_BOOT = 10_000
# resample means are rounded to this many decimals before taking percentiles, so that two summation orders of the
# same numbers (scipy's mean, our weighted sums) give the same interval to the last digit
ROUND_DECIMALS = 12


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


# ----------------------------------------------------------------------------- bootstrap: problems, seeds


def _as_seed_rows(scores: np.ndarray | Sequence[float], source: str) -> np.ndarray:
    """(S, P) float array: a (P,) vector is one seed."""
    a = np.asarray(scores, dtype=np.float64)
    a = a[None, :] if a.ndim == 1 else a
    if a.ndim != 2 or a.shape[1] == 0:
        raise EvalDataError(f"{source}: expected per-problem scores of shape (P,) or (S, P) with P > 0, got {a.shape}")
    return a


def _resample_weights(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """(n_boot, n) weights of n items drawn with replacement: count / n. Row b comes from the b-th row of
    `rng.integers(0, n, size=(n_boot, n))`, the draw scipy.stats.bootstrap makes for one sample."""
    idx = rng.integers(0, n, size=(n_boot, n))  # (n_boot, n)
    flat = (idx + n * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n) / n


def hierarchical_bootstrap(per_bench: Sequence[np.ndarray], n_boot: int = N_BOOT, seed: int = 0,
                           level: float = CI_LEVEL) -> dict:
    """Percentile bootstrap of the mean score over benchmarks, seeds and problems.

    `per_bench`: B arrays of per-problem scores, each (S, P_b) (or (P_b,) for one seed), every one with the
    same S seeds in the same order. Statistic: mean over benchmarks of the mean over seeds and problems
    (the Average column; one benchmark: its cell). Scores in [0, 1] give an interval inside [0, 1]
    (differences in [-1, 1]: inside [-1, 1]): every resample is a mean of observed scores.

    One seed: `scipy.stats.bootstrap` over problems, each benchmark resampled on its own.
    S > 1 seeds (no library resamples two crossed levels): each resample draws S seeds with replacement (one
    draw for every benchmark: a seed is one trained policy), then, per benchmark, P_b problems with
    replacement (one draw for every seed: all seeds answered the same problems), and averages. The seed level
    carries the run-to-run variation, the problem level the sampling of problems. Problem draws come from
    `default_rng(seed)` in scipy's order and seed draws from a second stream, so S identical seeds give
    exactly the one-seed interval.

    Returns {mean, ci95 [lo, hi], frac_le_0 (fraction of resamples <= 0: a one-sided bootstrap p-value for a
    difference > 0), seed_means (S,) (per-seed statistic), n_seeds, n_problems [P_b], n_boot, resampled}.
    """
    rows = [_as_seed_rows(s, "hierarchical_bootstrap") for s in per_bench]
    if not rows:
        raise EvalDataError("hierarchical_bootstrap: no benchmarks")
    n_seeds = rows[0].shape[0]
    if any(r.shape[0] != n_seeds for r in rows):
        raise EvalDataError(f"hierarchical_bootstrap: benchmarks have different seed counts {[r.shape[0] for r in rows]}")
    seed_means = np.mean([r.mean(axis=1) for r in rows], axis=0)  # (S,)
    if n_seeds == 1:
        res = stats.bootstrap(
            tuple(r[0] for r in rows), lambda *xs, axis: np.mean([x.mean(axis=axis) for x in xs], axis=0),
            n_resamples=n_boot, confidence_level=level, method="percentile", vectorized=True,
            rng=np.random.default_rng(seed),
        )
        dist = res.bootstrap_distribution
        resampled = "problems"
    else:
        problem_rng, seed_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
        w_seed = _resample_weights(seed_rng, n_seeds, n_boot)  # (n_boot, S), shared by every benchmark
        dist = np.mean([np.einsum("bs,sp,bp->b", w_seed, r, _resample_weights(problem_rng, r.shape[1], n_boot))
                        for r in rows], axis=0)  # (n_boot,)
        resampled = "seeds, then problems"
    dist = np.round(dist, ROUND_DECIMALS)
    ci = [float(x) for x in stats.quantile(dist, [(1 - level) / 2, (1 + level) / 2])]  # scipy's percentile interval
    return {
        "mean": float(seed_means.mean()),
        "ci95": ci,
        "frac_le_0": float(np.mean(dist <= 0.0)),
        "seed_means": seed_means.tolist(),
        "n_seeds": int(n_seeds),
        "n_problems": [int(r.shape[1]) for r in rows],
        "n_boot": int(n_boot),
        "resampled": resampled,
    }


def bootstrap_ci(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0, level: float = CI_LEVEL) -> list[float]:
    """Percentile bootstrap CI [lo, hi] of the mean of per-problem scores `values` (P,) (scipy.stats.bootstrap)."""
    return hierarchical_bootstrap([np.asarray(values, dtype=np.float64)], n_boot, seed, level)["ci95"]


def paired_bootstrap(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_boot: int = N_BOOT, seed: int = 0,
    level: float = CI_LEVEL,
) -> dict:
    """Difference of two methods scored on the same problems (and, for (S, P) inputs, the same seeds: seed s
    of each method starts from the same warm start), paired by seed, then by problem: the hierarchical
    bootstrap of a - b. `a`, `b`: (P,) or (S, P), aligned.

    Returns {mean_diff, ci95 [lo, hi], frac_le_0 (one-sided bootstrap p-value for a > b), seed_diffs (S,),
    n_seeds, n_problems, n_boot, resampled}.
    """
    a, b = _as_seed_rows(a, "paired_bootstrap"), _as_seed_rows(b, "paired_bootstrap")
    if a.shape != b.shape:
        raise EvalDataError(f"paired_bootstrap: methods cover different problem sets or seeds ({a.shape} vs {b.shape})")
    out = hierarchical_bootstrap([a - b], n_boot, seed, level)
    return {"mean_diff": out["mean"], "ci95": out["ci95"], "frac_le_0": out["frac_le_0"],
            "seed_diffs": out["seed_means"], "n_seeds": out["n_seeds"], "n_problems": out["n_problems"][0],
            "n_boot": out["n_boot"], "resampled": out["resampled"]}


def paired_records(a: pd.DataFrame, b: pd.DataFrame, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-problem c/k of two record sets, aligned on problem_id; their problem sets must be equal."""
    ca, cb = correct_counts(a).set_index("problem_id"), correct_counts(b).set_index("problem_id")
    if set(ca.index) != set(cb.index):
        only = sorted(set(ca.index) ^ set(cb.index))[:3]
        raise EvalDataError(f"paired comparison: problem sets differ (e.g. {only})")
    cb = cb.loc[ca.index]
    return ca["c"].to_numpy() / k, cb["c"].to_numpy() / k


# ----------------------------------------------------------------------------- across seeds


def student_t_quantile(p: float, dof: int) -> float:
    """The p-quantile of Student's t (0.5 < p < 1), scipy.stats.t."""
    if not 0.5 < p < 1 or dof < 1:
        raise ValueError(f"student_t_quantile: need 0.5 < p < 1 and dof >= 1, got p={p}, dof={dof}")
    return float(stats.t.ppf(p, dof))


def aggregate_seeds(values: Sequence[float], level: float = CI_LEVEL) -> dict:
    """Mean, standard deviation and Student-t CI across seeds: mean +- t_{(1+level)/2, S-1} * std / sqrt(S).

    `values`: (S,) one number per seed. For an unbounded quantity (a loss, a time); a bounded metric
    (accuracy) takes `hierarchical_bootstrap`, whose interval respects the bounds. One seed: std and CI None.
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
