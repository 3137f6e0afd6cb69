"""Table 1 Monte-Carlo study: enumeration building blocks against plain loops, and the paper's claims."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ctpo.reports import table1 as t1

V, H = 2, 3


def _logits(rng, tree):
    return rng.normal(size=(tree.n_states, tree.vocab))


def _pi(logits_row):
    z = np.exp(logits_row - logits_row.max())
    return z / z.sum()


def _state_of(tree):
    """{prefix tuple: state row}, read from the tree and checked to be one-to-one."""
    mapping = {}
    for m in range(tree.seqs.shape[0]):
        for t in range(tree.horizon):
            prefix = tuple(tree.seqs[m, :t])
            assert mapping.setdefault(prefix, tree.state[m, t]) == tree.state[m, t]
    assert len(set(mapping.values())) == len(mapping) == tree.n_states
    return mapping


def _seq_prob(logits, state_of, seq):
    return math.prod(_pi(logits[state_of[tuple(seq[:t])]])[a] for t, a in enumerate(seq))


def test_tree_enumerates_every_sequence_once_with_one_state_per_prefix():
    tree = t1.Tree(V, H)
    assert sorted(map(tuple, tree.seqs)) == list(itertools.product(range(V), repeat=H))
    assert len(_state_of(tree)) == sum(V**t for t in range(H))


def test_exact_advantages_equal_brute_force_q_minus_v():
    rng = np.random.default_rng(0)
    tree = t1.Tree(V, H)
    logits = _logits(rng, tree)
    reward = rng.random(V**H)
    state_of = _state_of(tree)
    r_of = {tuple(s): reward[m] for m, s in enumerate(tree.seqs)}

    def value(prefix):  # E[R | prefix] under pi_theta, by summing over completions
        total = 0.0
        for rest in itertools.product(range(V), repeat=H - len(prefix)):
            p = math.prod(_pi(logits[state_of[prefix + rest[:j]]])[a] for j, a in enumerate(rest))
            total += p * r_of[prefix + rest]
        return total

    adv = t1.exact_advantages(tree, t1.softmax(logits), reward)
    for m, seq in enumerate(map(tuple, tree.seqs)):
        for t in range(H):
            assert adv[m, t] == pytest.approx(value(seq[: t + 1]) - value(seq[:t]), abs=1e-12)


def test_true_gradient_equals_finite_differences_of_expected_reward():
    rng = np.random.default_rng(1)
    tree = t1.Tree(V, H)
    logits = _logits(rng, tree)
    reward = rng.random(V**H)
    state_of = _state_of(tree)

    def J(th):
        return sum(_seq_prob(th, state_of, s) * reward[m] for m, s in enumerate(tree.seqs))

    p = t1.softmax(logits)
    seq_theta = np.exp(tree.log_probs(logits).sum(1))
    grad = t1.expected_gradient(tree, p, seq_theta, t1.exact_advantages(tree, p, reward))
    h = 1e-6
    for s in range(tree.n_states):
        for a in range(V):
            e = np.zeros_like(logits)
            e[s, a] = h
            assert grad[s, a] == pytest.approx((J(logits + e) - J(logits - e)) / (2 * h), abs=1e-8)


def test_ratio_weights_are_token_prefix_sequence_and_geometric_mean_products():
    rng = np.random.default_rng(2)
    log_r = rng.normal(0, 0.3, size=(5, 4))
    w = t1.ratio_weights(log_r)
    r = np.exp(log_r)
    for i in range(5):
        for t in range(4):
            assert w["token"][i, t] == pytest.approx(r[i, t])
            assert w["cumulative"][i, t] == pytest.approx(math.prod(r[i, : t + 1]))
            assert w["full_seq"][i, t] == pytest.approx(math.prod(r[i]))
            assert w["gspo"][i, t] == pytest.approx(math.prod(r[i]) ** (1 / 4))


def test_independent_tokens_variance_matches_loop_and_closed_form():
    """Per-position distributions only: Var(rho_cum_t) = prod_{t'<=t}(1 + chi^2_t') - 1 (Prop. 2 ii)."""
    rng = np.random.default_rng(3)
    cfg = t1.Table1Config(vocab=3, horizon=4)
    theta_t, beh_t = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    got = t1._enumerate_independent(cfg, theta_t, beh_t)
    p, q = [_pi(x) for x in theta_t], [_pi(x) for x in beh_t]
    for t in range(1, 5):
        m1 = m2 = 0.0
        for seq in itertools.product(range(3), repeat=t):
            prob_b = math.prod(q[j][a] for j, a in enumerate(seq))
            w = math.prod(p[j][a] / q[j][a] for j, a in enumerate(seq))
            m1 += prob_b * w
            m2 += prob_b * w * w
        closed = math.prod(sum(p[j][a] ** 2 / q[j][a] for a in range(3)) for j in range(t)) - 1
        assert m1 == pytest.approx(1.0)
        assert got["var_cum_by_t"][t - 1] == pytest.approx(m2 - m1**2, rel=1e-10)
        assert got["closed_form_by_t"][t - 1] == pytest.approx(closed, rel=1e-10)


@pytest.fixture(scope="module")
def quick_study():
    return t1.run_study(t1.QUICK)


def test_study_reproduces_the_paper_table1_bias_pattern(quick_study):
    est = quick_study["estimators"]
    assert est["cumulative"]["rel_bias"] < 1e-9 and est["full_seq"]["rel_bias"] < 1e-9
    assert est["token"]["rel_bias"] > 0.05 and est["gspo"]["rel_bias"] > 0.05
    for name in ("cumulative", "full_seq"):  # MC error of an unbiased estimator is about its standard error
        assert est[name]["bias_mc"] < 4 * est[name]["mc_se"]
    for name in ("token", "gspo"):  # a biased estimator's MC bias sits at its exact bias
        assert abs(est[name]["bias_mc"] - est[name]["bias_exact"]) < 4 * est[name]["mc_se"]
    assert all(quick_study["checks"].values()), quick_study["checks"]


def test_study_variances_follow_proposition_2(quick_study):
    est = quick_study["estimators"]
    assert est["cumulative"]["weight_var_mean"] < est["full_seq"]["weight_var_mean"]
    assert est["gspo"]["weight_var_mean"] < est["full_seq"]["weight_var_mean"]
    p2 = quick_study["prop2"]
    assert all(p2["i"]["var_seq"] > v for v in p2["i"]["var_cum_by_t"][:-1])
    assert p2["i"]["var_cum_by_t"][-1] == pytest.approx(p2["i"]["var_seq"])  # rho_cum_H = rho_seq
    gaps = [s["max_rel_gap_to_h_over_t"] for s in p2["independent"]["near_on_policy"]]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-3
    for s in p2["independent"]["near_on_policy"]:
        np.testing.assert_allclose(s["ratio_by_t"], s["closed_form_ratio_by_t"], rtol=1e-8)


def test_study_weights_have_mean_one_for_unbiased_ratios(quick_study):
    for name in ("token", "cumulative", "full_seq"):  # E_b[r_t] = E_b[rho_cum_t] = 1
        np.testing.assert_allclose(quick_study["estimators"][name]["weight_mean_by_t"], 1.0, atol=1e-12)
