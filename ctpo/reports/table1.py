"""Table 1, measured: bias and variance of four importance ratios on a tabular autoregressive policy pair.

Setup (paper Sec. 2-3). Vocabulary V, horizon H, every response has exactly H tokens; the state s_t is the
prefix a_{1:t-1}. pi_theta(. | s) = softmax(theta[s]) with random logits theta (one row per prefix);
the behaviour policy pi_b(. | s) = softmax(theta[s] + perturb * xi[s]), xi ~ N(0, 1). A random reward
R(tau) ~ U[0, 1] per full sequence. The token-level advantage is the exact one under pi_theta,
A_t = Q(a_{1:t}) - V(a_{1:t-1}) (it depends on the prefix only, as Prop. 1 requires). All V^H sequences
are enumerated, so every expectation below is exact; a Monte-Carlo run from pi_b adds sampling error.

Estimators, for tau ~ pi_b:   g(tau) = sum_t w_t(tau) A_t grad_theta log pi_theta(a_t | s_t), with
    token      w_t = r_t                               (GRPO)
    full_seq   w_t = rho_seq = prod_{t'<=H} r_t'
    gspo       w_t = rho_seq^(1/H)                     (length-normalised, GSPO)
    cumulative w_t = rho_cum_t = prod_{t'<=t} r_t'     (CTPO)
The true gradient is grad J = E_{pi_theta}[sum_t A_t grad log pi_theta(a_t | s_t)].

Reported per estimator: bias ||E_b[g] - grad J|| (exact) and its Monte-Carlo counterpart with the MC
standard error sqrt(tr Cov_b[g] / n); Var_b(w_t) per position (exact); tr Cov_b[g].
Proposition 2 checks: (i) Var(rho_seq) > Var(rho_cum_t) for all t < H on this (dependent) pair;
(ii) on a pair whose per-token distributions depend on the position only (independent ratios),
Var(rho_cum_t) = prod_{t'<=t} (1 + chi^2_t') - 1 by enumeration vs the closed form; (iii) with the same
local divergence at every position, Var(rho_seq) / Var(rho_cum_t) -> H / t as pi_b -> pi_theta.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

ESTIMATORS = ("token", "full_seq", "gspo", "cumulative")
# The paper's Table 1 (qualitative) rebuilt from its prose (Sec. 3.2): the table's body is missing from our copy.
PAPER_TABLE1 = {
    "token": {"method": "GRPO (token r_t)", "bias": "biased", "variance": "low"},
    "full_seq": {"method": "full sequence rho_seq", "bias": "unbiased", "variance": "high"},
    "gspo": {"method": "GSPO (rho_seq^(1/|o|))", "bias": "biased", "variance": "reduced"},
    "cumulative": {"method": "CTPO (rho_cum_t)", "bias": "unbiased", "variance": "lower than seq"},
}


@dataclass(frozen=True)
class Table1Config:
    """The Monte-Carlo study's knobs (the defaults are the committed study; `QUICK` is for tests)."""

    vocab: int = 3
    horizon: int = 8
    logit_scale: float = 1.0  # std of pi_theta's logits
    perturb: float = 0.5  # std of the logit perturbation that makes pi_b
    n_samples: int = 200_000  # Monte-Carlo trajectories from pi_b
    perturb_sweep: tuple = (1.0, 0.3, 0.1, 0.03, 0.01)  # Prop. 2 (iii): towards on-policy
    seed: int = 0
    unbiased_tol: float = 1e-9  # |bias| / |grad J| below this counts as unbiased (exact arithmetic)


QUICK = Table1Config(vocab=3, horizon=5, perturb=0.3, n_samples=20_000)


# ----------------------------------------------------------------------------- tabular policies


@dataclass
class Tree:
    """All V^H sequences and their prefix states. Prefix a_{1:t} has code sum_i a_i V^(t-i); its state row
    is offset[t] + code. `seqs` (M, H) tokens, `state` (M, H) state row of s_t (the prefix before a_t)."""

    vocab: int
    horizon: int
    seqs: np.ndarray = field(init=False)
    state: np.ndarray = field(init=False)
    n_states: int = field(init=False)

    def __post_init__(self) -> None:
        v, h = self.vocab, self.horizon
        m = v**h
        codes = np.arange(m)
        self.seqs = np.stack([(codes // v ** (h - 1 - j)) % v for j in range(h)], axis=1)  # (M, H)
        offset = np.array([(v**t - 1) // (v - 1) for t in range(h + 1)])
        prefix_code = np.stack([codes // v ** (h - t) for t in range(h)], axis=1)  # (M, H) code of a_{1:t-1}
        self.state = offset[:h][None, :] + prefix_code
        self.n_states = int(offset[h])

    def log_probs(self, logits: np.ndarray) -> np.ndarray:
        """(M, H) log pi(a_t | s_t) for per-state logits (n_states, V)."""
        logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        return logp[self.state, self.seqs]


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def exact_advantages(tree: Tree, probs: np.ndarray, reward: np.ndarray) -> np.ndarray:
    """(M, H) A_t = Q(a_{1:t}) - V(a_{1:t-1}) under `probs` (n_states, V), by backward recursion."""
    v, h = tree.vocab, tree.horizon
    offset = [(v**t - 1) // (v - 1) for t in range(h + 1)]
    values = [None] * (h + 1)
    values[h] = reward  # (V^H,) value after all H tokens
    for t in range(h - 1, -1, -1):
        p = probs[offset[t] : offset[t + 1]]  # (V^t, V) pi(. | prefixes of length t)
        values[t] = np.sum(p * values[t + 1].reshape(v**t, v), axis=1)
    codes = np.arange(v**h)
    adv = np.empty((v**h, h))
    for t in range(1, h + 1):  # 1-based position of a_t
        adv[:, t - 1] = values[t][codes // v ** (h - t)] - values[t - 1][codes // v ** (h - t + 1)]
    return adv


def ratio_weights(log_r: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position weights w_t (M, H) of each estimator from per-token log ratios log r_t (M, H)."""
    h = log_r.shape[1]
    log_seq = log_r.sum(axis=1, keepdims=True)
    return {
        "token": np.exp(log_r),
        "full_seq": np.repeat(np.exp(log_seq), h, axis=1),
        "gspo": np.repeat(np.exp(log_seq / h), h, axis=1),
        "cumulative": np.exp(np.cumsum(log_r, axis=1)),
    }


def expected_gradient(tree: Tree, probs: np.ndarray, mass: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """sum_tau mass(tau) sum_t coef_t(tau) grad_theta log pi(a_t | s_t), as (n_states, V).

    grad of log softmax(theta[s])[a] w.r.t. theta[s] is onehot(a) - pi(. | s); other rows are 0.
    mass (M,), coef (M, H).
    """
    c = (mass[:, None] * coef).ravel()  # (M H,)
    s, a = tree.state.ravel(), tree.seqs.ravel()
    grad = np.zeros((tree.n_states, tree.vocab))
    np.add.at(grad, (s, a), c)
    c_state = np.bincount(s, weights=c, minlength=tree.n_states)  # (n_states,)
    return grad - c_state[:, None] * probs


def grad_sq_norm(tree: Tree, probs: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """(M,) ||g(tau)||^2; the H nonzero rows of g(tau) are distinct states (one per depth)."""
    p = probs[tree.state]  # (M, H, V)
    onehot = np.eye(tree.vocab)[tree.seqs]  # (M, H, V)
    row_sq = np.sum((onehot - p) ** 2, axis=2)  # (M, H)
    return np.sum(coef**2 * row_sq, axis=1)


def weighted_var(x: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """Var under `mass` (M,) of each column of x (M, H) -> (H,)."""
    mean = mass @ x
    return mass @ (x**2) - mean**2


# ----------------------------------------------------------------------------- the study


def _bias_variance(cfg: Table1Config, rng: np.random.Generator) -> dict:
    tree = Tree(cfg.vocab, cfg.horizon)
    theta = cfg.logit_scale * rng.standard_normal((tree.n_states, cfg.vocab))
    behaviour = theta + cfg.perturb * rng.standard_normal(theta.shape)
    reward = rng.random(cfg.vocab**cfg.horizon)
    p_theta, p_b = softmax(theta), softmax(behaviour)
    logp_theta, logp_b = tree.log_probs(theta), tree.log_probs(behaviour)
    seq_theta, seq_b = np.exp(logp_theta.sum(1)), np.exp(logp_b.sum(1))  # (M,) sequence probabilities
    adv = exact_advantages(tree, p_theta, reward)
    true_grad = expected_gradient(tree, p_theta, seq_theta, adv)
    grad_norm = float(np.linalg.norm(true_grad))
    weights = ratio_weights(logp_theta - logp_b)
    draws = rng.choice(seq_b.size, size=cfg.n_samples, p=seq_b / seq_b.sum())
    freq = np.bincount(draws, minlength=seq_b.size) / cfg.n_samples  # empirical pi_b
    out = {}
    for name in ESTIMATORS:
        coef = weights[name] * adv  # (M, H)
        mean_g = expected_gradient(tree, p_theta, seq_b, coef)
        mc_g = expected_gradient(tree, p_theta, freq, coef)
        tr_cov = float(seq_b @ grad_sq_norm(tree, p_theta, coef) - np.sum(mean_g**2))
        bias = float(np.linalg.norm(mean_g - true_grad))
        var_t = weighted_var(weights[name], seq_b)
        out[name] = {
            "bias_exact": bias,
            "rel_bias": bias / grad_norm,
            "bias_mc": float(np.linalg.norm(mc_g - true_grad)),
            "mc_se": float(np.sqrt(max(tr_cov, 0.0) / cfg.n_samples)),
            "grad_var_trace": tr_cov,
            "weight_mean_by_t": (seq_b @ weights[name]).tolist(),
            "weight_var_by_t": var_t.tolist(),
            "weight_var_mean": float(var_t.mean()),
            "weight_var_mc_mean": float(weighted_var(weights[name], freq).mean()),
            "unbiased": bias / grad_norm < cfg.unbiased_tol,
        }
    cum_var = np.array(out["cumulative"]["weight_var_by_t"])
    seq_var = out["full_seq"]["weight_var_by_t"][0]
    prop2_i = {
        "var_seq": seq_var,
        "var_cum_by_t": cum_var.tolist(),
        "holds": bool(np.all(seq_var > cum_var[:-1])),
    }
    return {"true_grad_norm": grad_norm, "estimators": out, "prop2_i": prop2_i}


def _independent_pair(cfg: Table1Config, rng: np.random.Generator, perturb: float, same_each_t: bool):
    """Per-position logits (H, V) for pi_theta and pi_b, broadcast to every state at that depth."""
    base = cfg.logit_scale * rng.standard_normal((1 if same_each_t else cfg.horizon, cfg.vocab))
    noise = rng.standard_normal(base.shape)
    theta_t = np.broadcast_to(base, (cfg.horizon, cfg.vocab))
    beh_t = np.broadcast_to(base + perturb * noise, (cfg.horizon, cfg.vocab))
    return theta_t, beh_t


def _enumerate_independent(cfg: Table1Config, theta_t: np.ndarray, beh_t: np.ndarray) -> dict:
    tree = Tree(cfg.vocab, cfg.horizon)
    depth = np.concatenate([np.full(cfg.vocab**t, t) for t in range(cfg.horizon)])  # (n_states,)
    logp_theta, logp_b = tree.log_probs(theta_t[depth]), tree.log_probs(beh_t[depth])
    seq_b = np.exp(logp_b.sum(1))
    var_cum = weighted_var(np.exp(np.cumsum(logp_theta - logp_b, axis=1)), seq_b)  # (H,)
    p_theta, p_b = softmax(theta_t), softmax(beh_t)
    chi2 = np.sum(p_theta**2 / p_b, axis=1) - 1.0  # (H,) local chi^2(pi_theta || pi_b)
    closed = np.cumprod(1.0 + chi2) - 1.0
    return {"var_cum_by_t": var_cum, "closed_form_by_t": closed, "chi2_by_t": chi2}


def _prop2_independent(cfg: Table1Config, rng: np.random.Generator) -> dict:
    theta_t, beh_t = _independent_pair(cfg, rng, cfg.perturb, same_each_t=False)
    r = _enumerate_independent(cfg, theta_t, beh_t)
    err = np.abs(r["var_cum_by_t"] - r["closed_form_by_t"]) / r["closed_form_by_t"]
    sweep = []
    for eps in cfg.perturb_sweep:
        theta_t, beh_t = _independent_pair(cfg, np.random.default_rng(cfg.seed + 1), eps, same_each_t=True)
        e = _enumerate_independent(cfg, theta_t, beh_t)
        var = e["var_cum_by_t"]
        delta = float(e["chi2_by_t"][0])
        ratio = var[-1] / var[:-1]  # Var(rho_seq) / Var(rho_cum_t), t = 1..H-1
        t = np.arange(1, cfg.horizon)
        sweep.append({
            "perturb": eps,
            "delta": delta,
            "ratio_by_t": ratio.tolist(),
            "closed_form_ratio_by_t": (((1 + delta) ** cfg.horizon - 1) / ((1 + delta) ** t - 1)).tolist(),
            "h_over_t": (cfg.horizon / t).tolist(),
            "max_rel_gap_to_h_over_t": float(np.max(np.abs(ratio / (cfg.horizon / t) - 1))),
        })
    return {
        "var_cum_by_t": r["var_cum_by_t"].tolist(),
        "closed_form_by_t": r["closed_form_by_t"].tolist(),
        "chi2_by_t": r["chi2_by_t"].tolist(),
        "max_rel_err": float(err.max()),
        "near_on_policy": sweep,
    }


def run_study(cfg: Table1Config) -> dict:
    """The whole study as a JSON-ready dict (see the module docstring)."""
    if cfg.vocab < 2 or cfg.horizon < 2:
        raise ValueError(f"Table1Config: need vocab >= 2 and horizon >= 2, got {cfg.vocab}, {cfg.horizon}")
    rng = np.random.default_rng(cfg.seed)
    res = _bias_variance(cfg, rng)
    ind = _prop2_independent(cfg, rng)
    est = res["estimators"]
    sweep = ind["near_on_policy"]
    checks = {
        "token_biased": not est["token"]["unbiased"],
        "gspo_biased": not est["gspo"]["unbiased"],
        "full_seq_unbiased": est["full_seq"]["unbiased"],
        "cumulative_unbiased": est["cumulative"]["unbiased"],
        "cum_weight_var_below_seq": est["cumulative"]["weight_var_mean"] < est["full_seq"]["weight_var_mean"],
        "prop2_i_var_seq_gt_var_cum_all_t_lt_H": res["prop2_i"]["holds"],
        "prop2_ii_closed_form_matches": ind["max_rel_err"] < 1e-8,
        "prop2_ratio_tends_to_H_over_t": sweep[-1]["max_rel_gap_to_h_over_t"]
        < sweep[0]["max_rel_gap_to_h_over_t"],
    }
    return {
        "study": "Table 1: bias / variance of importance ratios on a tabular autoregressive policy pair",
        "config": asdict(cfg),
        "n_sequences": cfg.vocab**cfg.horizon,
        "true_grad_norm": res["true_grad_norm"],
        "estimators": est,
        "prop2": {"i": res["prop2_i"], "independent": ind},
        "paper_table1": PAPER_TABLE1,
        "checks": checks,
    }


def format_text(study: dict) -> str:
    """A plain-text table: measured numbers beside the paper's Table 1 as rebuilt from its prose (PAPER_TABLE1)."""
    c = study["config"]
    lines = [
        f"Table 1 (measured): V={c['vocab']}, H={c['horizon']}, perturb={c['perturb']}, "
        f"{c['n_samples']} MC samples; |grad J| = {study['true_grad_norm']:.4g}",
        f"{'ratio':<12}{'|bias| exact':>14}{'|bias| MC':>12}{'MC s.e.':>10}{'Var(w) mean':>13}{'tr Cov g':>11}"
        f"   paper: bias / variance",
    ]
    for name in ESTIMATORS:
        e, p = study["estimators"][name], study["paper_table1"][name]
        lines.append(
            f"{name:<12}{e['bias_exact']:>14.3e}{e['bias_mc']:>12.3e}{e['mc_se']:>10.2e}"
            f"{e['weight_var_mean']:>13.4g}{e['grad_var_trace']:>11.4g}   {p['bias']} / {p['variance']}"
        )
    ind = study["prop2"]["independent"]
    lines.append(f"Prop. 2 (i) Var(rho_seq) > Var(rho_cum_t) for all t < H: {study['prop2']['i']['holds']}")
    lines.append(f"Prop. 2 (ii) closed form prod(1 + chi^2) - 1, max rel. error: {ind['max_rel_err']:.2e}")
    for s in ind["near_on_policy"]:
        ratios = ", ".join(f"{x:.3g}" for x in s["ratio_by_t"])
        lines.append(f"  perturb {s['perturb']:<6g} delta {s['delta']:.2e}: Var ratio by t = [{ratios}]")
    lines.append("  H/t = [" + ", ".join(f"{x:.3g}" for x in ind["near_on_policy"][-1]["h_over_t"]) + "]")
    lines.append("checks: " + ", ".join(f"{k}={v}" for k, v in study["checks"].items()))
    return "\n".join(lines)
