"""ctpo.eval.metrics against independent computations: enumeration, hand-computed fixtures, plain loops."""
from __future__ import annotations

import itertools
import math
import statistics
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ctpo.eval import metrics as M


def _records(correct_by_problem: dict[str, list[bool]], failed: dict[str, list[bool]] | None = None) -> pd.DataFrame:
    rows = []
    for pid, flags in correct_by_problem.items():
        for j, ok in enumerate(flags):
            rows.append({
                "problem_id": pid, "sample_index": j, "correct": ok,
                "extraction_failed": bool(failed[pid][j]) if failed else False,
            })
    return pd.DataFrame(rows)


def _loop_percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile written out by hand (numpy's default 'linear' method)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def test_avg_at_k_matches_hand_computed_fixture():
    # k = 4: problem a 4/4, b 1/4, c 0/4 -> (1 + 0.25 + 0) / 3
    recs = _records({"a": [True] * 4, "b": [False, True, False, False], "c": [False] * 4})
    summary = M.summarize(recs, k=4, source="fixture", n_boot=200)
    assert summary["avg_at_k"] == pytest.approx(1.25 / 3)
    assert summary["n_problems"] == 3 and summary["n_samples"] == 12 and summary["k"] == 4
    # pass@1 equals avg@k; pass@4 = fraction of problems with any correct sample = 2/3
    assert summary["pass_at_k"]["1"] == pytest.approx(1.25 / 3)
    assert summary["pass_at_k"]["4"] == pytest.approx(2 / 3)
    assert sorted(summary["pass_at_k"], key=int) == ["1", "2", "4"]


def test_unbiased_pass_at_k_matches_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
                assert M.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 500) overflows floats; the product form must still agree with exact integer arithmetic
    n, c, k = 1000, 3, 500
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # Python ints: exact ratio
    assert M.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError, match="k <= n"):
        M.pass_at_k(4, 1, 5)


def test_pass_at_k_ladder_ends_at_k():
    assert M.pass_at_k_ladder(32) == [1, 2, 4, 8, 16, 32]
    assert M.pass_at_k_ladder(6) == [1, 2, 4, 6]
    assert M.pass_at_k_ladder(1) == [1]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda df: df[~((df.problem_id == "b") & (df.sample_index == 2))], "problem 'b' has 3"),
        (lambda df: pd.concat([df, df.iloc[[0]]]), "more than once"),
        (lambda df: df.assign(sample_index=df.sample_index.where(df.index != 5, 9)), "expected 0..3"),
        (lambda df: df.iloc[0:0], "no evaluation records"),
    ],
)
def test_wrong_sample_count_names_the_file(mutate, message):
    recs = _records({"a": [True] * 4, "b": [False] * 4})
    with pytest.raises(M.EvalDataError, match=message) as err:
        M.summarize(mutate(recs), k=4, source="results/x/aime25.parquet")
    assert "results/x/aime25.parquet" in str(err.value)


def test_extraction_failure_rate_counts_failed_samples():
    recs = _records(
        {"a": [True, False], "b": [False, False]},
        failed={"a": [False, True], "b": [True, True]},
    )
    assert M.summarize(recs, k=2, source="f", n_boot=100)["extraction_failure_rate"] == pytest.approx(3 / 4)


def test_bootstrap_ci_matches_plain_loop_with_same_seed():
    values = [0.0, 0.25, 1.0, 0.5, 0.75, 0.0, 1.0]
    n_boot, seed = 500, 11
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(values), size=len(values))
        means.append(sum(values[i] for i in idx) / len(values))
    expected = [_loop_percentile(means, 0.025), _loop_percentile(means, 0.975)]
    assert M.bootstrap_ci(values, n_boot=n_boot, seed=seed) == pytest.approx(expected, abs=1e-12)
    assert M.bootstrap_ci(values, n_boot=n_boot, seed=seed) == M.bootstrap_ci(values, n_boot=n_boot, seed=seed)


def test_bootstrap_ci_covers_true_mean_at_nominal_rate():
    true_mean, hits, reps = 0.5, 0, 100
    gen = np.random.default_rng(0)
    for r in range(reps):
        values = gen.uniform(0, 1, size=120)
        lo, hi = M.bootstrap_ci(values, n_boot=1000, seed=r)
        assert lo <= values.mean() <= hi
        hits += lo <= true_mean <= hi
    assert 0.88 <= hits / reps <= 1.0


def test_paired_bootstrap_matches_plain_loop():
    a = [1.0, 0.5, 0.25, 0.75, 0.0, 1.0]
    b = [0.75, 0.5, 0.5, 0.25, 0.0, 0.5]
    n_boot, seed = 400, 5
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(a), size=len(a))
        diffs.append(sum(a[i] - b[i] for i in idx) / len(a))
    out = M.paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
    assert out["mean_diff"] == pytest.approx(sum(x - y for x, y in zip(a, b)) / len(a))
    assert out["ci95"] == pytest.approx([_loop_percentile(diffs, 0.025), _loop_percentile(diffs, 0.975)], abs=1e-12)
    assert out["frac_le_0"] == pytest.approx(sum(d <= 0 for d in diffs) / n_boot)


def test_paired_bootstrap_of_dominating_method_never_le_zero():
    a = [1.0, 0.75, 0.5, 0.5]
    b = [0.5, 0.25, 0.25, 0.0]
    out = M.paired_bootstrap(a, b, n_boot=300, seed=0)
    assert out["frac_le_0"] == 0.0 and out["ci95"][0] > 0
    with pytest.raises(M.EvalDataError, match="different problem sets"):
        M.paired_bootstrap(a, b[:3])


def test_paired_records_align_problems_by_id():
    a = _records({"p1": [True, True], "p2": [False, True]})
    b = _records({"p2": [True, True], "p1": [False, False]}).sample(frac=1.0, random_state=0)
    sa, sb = M.paired_records(a, b, k=2)
    assert list(sa) == [1.0, 0.5] and list(sb) == [0.0, 1.0]  # both ordered p1, p2
    with pytest.raises(M.EvalDataError, match="problem sets differ"):
        M.paired_records(a, _records({"p1": [True, True]}), k=2)


def test_student_t_quantile_matches_closed_forms():
    for p in (0.9, 0.95, 0.975):
        assert M.student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-8)  # Cauchy
        assert M.student_t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-8)
    normal = statistics.NormalDist().inv_cdf(0.975)
    assert M.student_t_quantile(0.975, 2000) == pytest.approx(normal, rel=1e-3)


def test_aggregate_seeds_gives_student_t_interval():
    values = [0.5, 0.6, 0.7]
    out = M.aggregate_seeds(values)
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    t = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)  # closed-form t quantile, 2 degrees of freedom
    assert out["mean"] == pytest.approx(mean) and out["std"] == pytest.approx(std)
    assert out["ci95"] == pytest.approx([mean - t * std / math.sqrt(3), mean + t * std / math.sqrt(3)])
    assert out["n_seeds"] == 3
    single = M.aggregate_seeds([0.4])
    assert single["mean"] == 0.4 and single["ci95"] is None


def test_metrics_module_does_not_import_torch():
    code = "import sys, ctpo.eval.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_eval_checks_records_against_sidecar(tmp_path):
    import json

    recs = _records({"a": [True, False], "b": [True, True]})
    path = tmp_path / "aime25.parquet"
    recs.to_parquet(path)
    (tmp_path / "aime25.json").write_text(json.dumps({"k": 2, "avg_at_k": 0.75}))
    loaded, side = M.load_eval(path)
    assert len(loaded) == 4 and side["k"] == 2
    (tmp_path / "aime25.json").write_text(json.dumps({"k": 2, "avg_at_k": 0.5}))
    with pytest.raises(M.EvalDataError, match=r"aime25\.json: avg_at_k 0\.5 does not match"):
        M.load_eval(path)
    (tmp_path / "aime25.json").write_text(json.dumps({"k": 3, "avg_at_k": 0.75}))
    with pytest.raises(M.EvalDataError, match=r"aime25\.parquet: expected exactly k=3"):
        M.load_eval(path)
