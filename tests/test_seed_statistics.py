"""Across-seed statistics that respect the metric, and runs that learned nothing made visible (issue 24).

Synthetic per-seed results with known per-problem scores: intervals are checked against the metric's range
and against plain-loop recomputations of the same resampling; the degenerate-run flag against metrics rows.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctpo import grading, layout, schema
from ctpo.config import load_experiment
from ctpo.eval import metrics as M
from ctpo.io import write_json, write_text
from ctpo.reports import tables
from ctpo.reports.load import ReportInputError, Results, read_experiment
from ctpo.run_health import degenerate_reward

REPO = Path(__file__).resolve().parent.parent
K, P, STEP = 4, 40, 30


def _scores(rng: np.random.Generator, acc: float, n: int = P) -> np.ndarray:
    """(n,) per-problem c/k for k=K samples at accuracy `acc`."""
    return rng.binomial(K, acc, size=n) / K


# ----------------------------------------------------------------------------- hierarchical bootstrap


def _loop_two_level(per_bench: list[np.ndarray], n_boot: int, seed: int) -> list[float]:
    """The two-level percentile bootstrap written as a plain loop over resamples (the independent check):
    seeds drawn from default_rng([seed, 1]) (one draw for all benchmarks), problems from default_rng(seed)
    (one draw per benchmark, shared by every seed), benchmarks in order, as hierarchical_bootstrap states."""
    S = per_bench[0].shape[0]
    seed_idx = np.random.default_rng([seed, 1]).integers(0, S, size=(n_boot, S))
    prob_rng = np.random.default_rng(seed)
    prob_idx = [prob_rng.integers(0, x.shape[1], size=(n_boot, x.shape[1])) for x in per_bench]
    means = []
    for b in range(n_boot):
        per = []
        for x, pi in zip(per_bench, prob_idx):
            total = 0.0
            for s in seed_idx[b]:
                for p in pi[b]:
                    total += x[s, p]
            per.append(total / (S * x.shape[1]))
        means.append(sum(per) / len(per))
    return [float(v) for v in np.quantile(means, [0.025, 0.975])]


def test_two_level_bootstrap_matches_a_plain_loop_over_seeds_then_problems():
    rng = np.random.default_rng(3)
    per_bench = [np.stack([_scores(rng, a, 9) for a in (0.3, 0.6, 0.45)]), np.stack([_scores(rng, a, 6) for a in (0.2, 0.5, 0.4)])]
    out = M.hierarchical_bootstrap(per_bench, n_boot=300, seed=7)
    assert out["ci95"] == pytest.approx(_loop_two_level(per_bench, 300, 7), abs=1e-12)
    assert out["mean"] == pytest.approx(np.mean([x.mean() for x in per_bench]))
    assert out["seed_means"] == pytest.approx(np.mean([x.mean(axis=1) for x in per_bench], axis=0))
    assert out["resampled"] == "seeds, then problems" and out["n_seeds"] == 3 and out["n_problems"] == [9, 6]


def test_one_seed_at_zero_keeps_every_interval_inside_the_metric_range():
    rng = np.random.default_rng(0)
    good = [_scores(rng, 0.3), _scores(rng, 0.5)]
    collapsed = np.stack([good[0], np.zeros(P), good[1]])  # seed 1 learned nothing: 0 on every problem
    out = M.hierarchical_bootstrap([collapsed], n_boot=2000, seed=0)
    lo, hi = out["ci95"]
    assert 0.0 <= lo <= out["mean"] <= hi <= 1.0
    assert lo < collapsed[1].mean() + 0.05  # the zero seed pulls the interval down to near 0
    # the Student-t interval this replaces (issue 24: GRPO 62.1 [-72.1, 196.4]) leaves [0, 1] on the same data
    t = M.aggregate_seeds(collapsed.mean(axis=1))
    assert t["ci95"][0] < 0.0
    assert M.student_t_quantile(0.975, 2) == pytest.approx(4.302652729749464)  # scipy.stats.t; tables: 4.303


def test_one_seed_at_zero_widens_the_paired_difference_interval():
    rng = np.random.default_rng(1)
    a = np.stack([_scores(rng, 0.6) for _ in range(3)])  # (S, P) adaptive
    f = np.stack([_scores(rng, 0.4) for _ in range(3)])  # (S, P) fixed
    healthy = M.paired_bootstrap(a, f, n_boot=2000, seed=0)
    a0, f0 = a.copy(), f.copy()
    a0[1] = f0[1] = 0.0  # seed 1's warm start never learned: both methods at 0, difference 0 on that seed
    broken = M.paired_bootstrap(a0, f0, n_boot=2000, seed=0)
    width = lambda d: d["ci95"][1] - d["ci95"][0]  # noqa: E731
    assert width(broken) > 1.3 * width(healthy)
    assert broken["seed_diffs"][1] == 0.0 and broken["n_seeds"] == 3
    assert -1.0 <= broken["ci95"][0] <= broken["mean_diff"] <= broken["ci95"][1] <= 1.0
    # pairing by problem only (seed-averaged scores, what Table 3 did before) hides the seed spread
    by_problem = M.paired_bootstrap(a0.mean(axis=0), f0.mean(axis=0), n_boot=2000, seed=0)
    assert width(broken) > 1.5 * width(by_problem)


def test_identical_seeds_reproduce_the_one_seed_numbers_exactly():
    rng = np.random.default_rng(2)
    one = [_scores(rng, 0.4), _scores(rng, 0.7, 25)]
    same = [np.stack([x] * 3) for x in one]
    assert M.hierarchical_bootstrap(same, 1000, 4)["ci95"] == M.hierarchical_bootstrap(one, 1000, 4)["ci95"]
    assert M.hierarchical_bootstrap(same, 1000, 4)["mean"] == pytest.approx(M.hierarchical_bootstrap(one, 1000, 4)["mean"])
    f = _scores(rng, 0.3)
    single = M.paired_bootstrap(one[0], f, n_boot=1000, seed=5)
    triple = M.paired_bootstrap(np.stack([one[0]] * 3), np.stack([f] * 3), n_boot=1000, seed=5)
    assert triple["ci95"] == single["ci95"] and triple["mean_diff"] == pytest.approx(single["mean_diff"])
    assert single["resampled"] == "problems" and triple["resampled"] == "seeds, then problems"


# ----------------------------------------------------------------------------- the degenerate-run flag


def test_degenerate_flag_fires_on_a_reward_stuck_at_zero_or_one_only():
    rows = lambda rs: [{schema.STEP: i + 1, schema.REWARD_MEAN: r} for i, r in enumerate(rs)]  # noqa: E731
    assert degenerate_reward(rows([0.0] * 30)) == "reward 0 at every step (30 steps)"
    assert degenerate_reward(rows([1.0] * 5)) == "reward 1 at every step (5 steps)"
    assert degenerate_reward(rows([0.0] * 29 + [0.0625])) is None  # one step with a reward: it had a signal
    assert degenerate_reward(rows([0.5] * 30)) is None
    assert degenerate_reward([{schema.STEP: 1}]) is None  # no reward logged: nothing to judge


def test_done_marker_carries_the_flag(tmp_path):
    rows = [{schema.STEP: i, schema.REWARD_MEAN: 0.0} for i in range(1, 4)]
    done = layout.TrainDone(experiment="toy", run="r", seed=1, backend="local", final_step=3, total_steps=3,
                            saved_steps=[0, 3], dump_steps=[], metrics_rows=3, wandb_run_id=None, config_hash=None,
                            checkpoints="c", final=rows[-1], degenerate=degenerate_reward(rows))
    layout.write_done(tmp_path / "done.json", done)
    assert layout.read_done(tmp_path / "done.json").degenerate == "reward 0 at every step (3 steps)"
    old = {k: v for k, v in json.loads((tmp_path / "done.json").read_text()).items() if k != "degenerate"}
    write_json(tmp_path / "old.json", old)  # a marker written before the flag existed reads as unflagged
    assert layout.read_done(tmp_path / "old.json").degenerate is None


# ----------------------------------------------------------------------------- tables on a controlled tree


def _write_tree(root: Path, exp: dict, scores: dict[tuple[str, int], dict[str, np.ndarray]],
                rewards: dict[tuple[str, int], float]) -> Results:
    """results/ with the given per-problem scores (c/k, k=K) at STEP and a constant metrics reward per run x seed."""
    tree = layout.results(root)
    for (run, seed), per_bench in scores.items():
        for bench, sc in per_bench.items():
            where = dict(run=run, seed=seed, step=STEP, bench=bench)
            c = np.rint(sc * K).astype(int)
            correct = np.concatenate([[True] * ci + [False] * (K - ci) for ci in c])
            df = pd.DataFrame({"problem_id": np.repeat([f"{bench}-{i:03d}" for i in range(c.size)], K),
                               "sample_index": np.tile(np.arange(K), c.size).astype(np.int64), "correct": correct})
            for g in grading.GRADERS:  # both graders agree here
                df[grading.correct_column(g)] = correct
            path = tree.path("eval", **where)
            path.parent.mkdir(parents=True, exist_ok=True)
            df.to_parquet(path)
            write_json(tree.path("eval_json", **where), {"k": K, "grader": grading.GRADERS[0]})
        reward = rewards.get((run, seed), 0.25)
        rows = [{schema.STEP: i, schema.REWARD_MEAN: reward if reward in (0.0, 1.0) else reward + 0.01 * (i % 3)}
                for i in range(1, STEP + 1)]
        write_text(tree.path("metrics", run=run, seed=seed), "".join(json.dumps(r) + "\n" for r in rows))
    return Results(root)


@pytest.fixture(scope="module")
def toy_exp():
    exp = load_experiment(REPO / "configs/experiments/toy.yaml")
    exp.setdefault("paper_reference", {})
    exp.setdefault("assumptions", {})
    return exp


def _runs(exp) -> list[str]:
    return sorted(set(exp["evaluation"]["table2_runs"]) | set(exp["evaluation"]["table3_runs"]))


def test_tables_with_identical_seeds_reproduce_the_one_seed_tables(toy_exp, tmp_path):
    rng = np.random.default_rng(4)
    benches = toy_exp["evaluation"]["table2_benchmarks"]
    base = {run: {b: _scores(rng, 0.3 + 0.1 * i) for b in benches} for i, run in enumerate(_runs(toy_exp))}
    res = _write_tree(tmp_path, toy_exp, {(r, s): base[r] for r in base for s in (0, 1, 2)}, {})
    one, three = copy.deepcopy(toy_exp), copy.deepcopy(toy_exp)
    one["seeds"], three["seeds"] = [0], [0, 1, 2]
    for build in (tables.table2, tables.table3):
        t1, t3 = build(one, res), build(three, res)
        assert [r[1:] for r in t1.rows] == [r[1:] for r in t3.rows]  # every cell: mean and interval
        assert "problems only" in t1.caption and "two-level bootstrap over 3 seeds" in t3.caption


def test_a_collapsed_seed_is_flagged_kept_in_range_and_widens_table3s_difference(toy_exp, tmp_path):
    rng = np.random.default_rng(5)
    benches = toy_exp["evaluation"]["table2_benchmarks"]
    a_run, f_run = toy_exp["evaluation"]["table3_runs"]
    acc = {run: 0.25 + 0.1 * i for i, run in enumerate(_runs(toy_exp))}
    acc[a_run], acc[f_run] = 0.65, 0.45
    scores, rewards = {}, {}
    for run in _runs(toy_exp):
        for s in (0, 1, 2):
            scores[(run, s)] = {b: (np.zeros(P) if s == 1 else _scores(rng, acc[run])) for b in benches}
            if s == 1:
                rewards[(run, s)] = 0.0  # seed 1's warm start never learned: reward 0 for all 30 steps
    res = _write_tree(tmp_path, toy_exp, scores, rewards)
    exp = copy.deepcopy(toy_exp)
    exp["seeds"] = [0, 1, 2]
    t2, t3 = tables.table2(exp, res), tables.table3(exp, res)
    for t in (t2, t3):
        assert f"WARNING, learned nothing ({a_run} seed 1: reward 0 at every step (30 steps)" in t.caption
        assert "included in the means and intervals" in t.caption
    for rec in t2.data + t3.data[:-1]:
        for cell in [*rec["benchmarks"].values(), rec["average"]]:
            assert 0.0 <= cell["ci95"][0] <= cell["mean"] <= cell["ci95"][1] <= 1.0
            assert cell["seed_values"][1] == 0.0
    diff = t3.data[-1]
    assert diff["average"]["seed_diffs"][1] == 0.0 and diff["seeds"] == [0, 1, 2]
    assert t3.rows[-1][0] == "Difference (paired bootstrap by seed, then problem)"
    # the same data without the collapsed seed: a narrower difference interval
    healthy = copy.deepcopy(exp)
    healthy["seeds"] = [0, 2]
    d_all, d_ok = diff["average"]["ci95"], tables.table3(healthy, res).data[-1]["average"]["ci95"]
    assert d_all[1] - d_all[0] > d_ok[1] - d_ok[0]
    assert any(n.startswith("Difference Average per seed [0, 1, 2]:") for n in t3.notes)


def test_exclusion_only_where_the_experiment_says_so_and_stated(toy_exp, tmp_path):
    rng = np.random.default_rng(6)
    benches = toy_exp["evaluation"]["table2_benchmarks"]
    scores = {(run, s): {b: (np.zeros(P) if s == 1 else _scores(rng, 0.5)) for b in benches}
              for run in _runs(toy_exp) for s in (0, 1, 2)}
    res = _write_tree(tmp_path, toy_exp, scores, {(run, 1): 0.0 for run in _runs(toy_exp)})
    exp = copy.deepcopy(toy_exp)
    exp["seeds"] = [0, 1, 2]
    exp["evaluation"]["exclude_degenerate"] = True
    t2, t3 = tables.table2(exp, res), tables.table3(exp, res)
    for t in (t2, t3):
        assert "EXCLUDED, learned nothing" in t.caption and "evaluation.exclude_degenerate: true" in t.caption
    for rec in t2.data:
        assert rec["seeds"] == [0, 2] and rec["degenerate"] == {"1": "reward 0 at every step (30 steps)"}
        kept = [res.seed_scores(rec["run"], [0, 2], STEP, b).mean() for b in benches]
        assert rec["average"]["mean"] == pytest.approx(np.mean(kept))
    assert t3.data[-1]["seeds"] == [0, 2]
    # a malformed switch is a named error, not a silent default
    bad = tmp_path / "bad.json"
    write_json(bad, {**exp, "evaluation": {**exp["evaluation"], "exclude_degenerate": "yes"}})
    with pytest.raises(ReportInputError, match="evaluation.exclude_degenerate must be true or false, got 'yes'"):
        read_experiment(bad)
