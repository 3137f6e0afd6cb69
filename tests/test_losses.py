"""ctpo.losses against independent references written here (numpy float64, plain Python loops)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctpo import methods, schema
from ctpo.config import LossConfig, method_loss
from ctpo.losses import compute_policy_loss, ctpo_fixed_token_losses, ctpo_token_losses, cumulative_log_ratio

# ----------------------------------------------------------------------------- references (loops, float64)


def _clip(x, lo, hi):
    return min(max(x, lo), hi)


def ref_token_terms(method, olp, lp, adv, mask, p):
    """Per-token (loss, d loss / d log_prob) for one method by loops over rows and positions."""
    B, T = olp.shape
    loss = np.zeros((B, T))
    grad = np.zeros((B, T))
    for i in range(B):
        idx = [j for j in range(T) if mask[i, j]]
        raw = {j: float(lp[i, j] - olp[i, j]) for j in idx}
        clamped = {j: _clip(raw[j], -20.0, 20.0) for j in idx}
        seq_sum = sum(clamped.values())
        gspo_mean = sum(raw.values()) / max(len(idx), 1)
        s_cum, t = 0.0, 0
        for j in idx:
            a = float(adv[i, j])
            s_cum += clamped[j]
            t += 1
            cap_c = None
            if method in ("ctpo", "ctpo_fixed"):
                logw = min(s_cum, 10.0)
                if method == "ctpo":
                    lo, hi = -p["eps_low"] * t ** p["power"], p["eps_high"] * t ** p["power"]
                else:
                    lo, hi = math.log(p["fixed_bounds"][0]), math.log(p["fixed_bounds"][1])
                w, wc = math.exp(logw), math.exp(_clip(logw, lo, hi))
                grad_ok = s_cum <= 10.0
                if p["dual_clip_c"] is not None:
                    cap_c = math.exp(p["dual_clip_c"] * t ** p["power"])
                if p.get("fixed_dual_clip") is not None:
                    cap_c = p["fixed_dual_clip"]
            else:
                if method == "grpo":
                    w, grad_ok = math.exp(clamped[j]), abs(raw[j]) <= 20.0
                elif method == "gspo":
                    w, grad_ok = math.exp(min(gspo_mean, 10.0)), gspo_mean <= 10.0
                else:  # full_seq
                    w, grad_ok = math.exp(min(seq_sum, 10.0)), seq_sum <= 10.0
                wc = _clip(w, 1 - p["clip_ratio_low"], 1 + p["clip_ratio_high"])
                if method != "gspo" and p["clip_ratio_c"] is not None:
                    cap_c = p["clip_ratio_c"]
            l1, l2 = -a * w, -a * wc
            val, g = (l1, -a * w) if l1 >= l2 else (l2, 0.0)
            if cap_c is not None and a < 0 and val > -a * cap_c:
                val, g = -a * cap_c, 0.0
            loss[i, j] = val
            grad[i, j] = g if grad_ok else 0.0
    return loss, grad


def ref_agg(loss, mask, mode):
    B = loss.shape[0]
    rows = []
    for i in range(B):
        vals = [loss[i, j] for j in range(loss.shape[1]) if mask[i, j]]
        if vals:
            rows.append(vals)
    if mode == "token-mean":
        n = sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / max(n, 1)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / max(len(rows), 1)
    return sum(sum(r) for r in rows) / max(len(rows), 1)  # seq-mean-token-sum


def ref_agg_grad(grad, mask, mode):
    """d agg / d log_prob given per-token derivatives (each token's loss depends on its own log_prob only)."""
    out = np.zeros_like(grad)
    counts = mask.sum(axis=1)
    n_rows = max(int((counts > 0).sum()), 1)
    n_tok = max(int(mask.sum()), 1)
    for i in range(grad.shape[0]):
        for j in range(grad.shape[1]):
            if mask[i, j]:
                if mode == "token-mean":
                    out[i, j] = grad[i, j] / n_tok
                elif mode == "seq-mean-token-mean":
                    out[i, j] = grad[i, j] / counts[i] / n_rows
                else:
                    out[i, j] = grad[i, j] / n_rows
    return out


# ----------------------------------------------------------------------------- fixtures


def make_batch(seed, B=6, T=24, scale=0.3, p_mask=0.25, empty_row=True):
    g = np.random.default_rng(seed)
    lp = -np.abs(g.normal(1.0, 0.5, (B, T)))
    olp = lp + g.normal(0, scale, (B, T))
    mask = g.random((B, T)) > p_mask
    if empty_row:
        mask[-1] = False  # an all-masked row
    adv = np.repeat(g.normal(0, 1, (B, 1)), T, axis=1) * mask
    return olp, lp, adv, mask


def file_knobs(method):
    """The method's knobs as its method file sets them (the only place their defaults live)."""
    return {k: getattr(method_loss(method), k) for k in methods.get(method).knobs}


def tensors(olp, lp, adv, mask):
    """(old_log_prob, log_prob with grad, advantages, mask) as torch tensors."""
    lpt = torch.tensor(lp, dtype=torch.float32, requires_grad=True)
    return torch.tensor(olp, dtype=torch.float32), lpt, torch.tensor(adv, dtype=torch.float32), torch.tensor(mask)


def run(method, olp, lp, adv, mask, mode, **kw):
    """`compute_policy_loss` on numpy inputs; knobs not in `kw` as configs/methods/<method>.yaml sets them.
    Returns (loss, d loss / d log_prob as float64, metrics)."""
    olpt, lpt, advt, maskt = tensors(olp, lp, adv, mask)
    cfg = LossConfig(method=method, loss_agg_mode=mode, **{**file_knobs(method), **kw})
    loss, metrics = compute_policy_loss(olpt, lpt, advt, maskt, cfg)
    loss.backward()
    return loss.item(), lpt.grad.numpy().astype(np.float64), metrics


PARAMS = {
    "ctpo": dict(eps_low=0.025, eps_high=0.05, power=0.5, dual_clip_c=0.05),
    "ctpo_fixed": dict(fixed_bounds=(0.8, 1.25), fixed_dual_clip=1.25),
    "grpo": dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0),
    "gspo": dict(clip_ratio_low=0.05, clip_ratio_high=0.08),
    "full_seq": dict(clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=1.5),
}


# ----------------------------------------------------------------------------- tests


def test_cumulative_ratio_matches_prefix_product():
    olp, lp, _, mask = make_batch(0)
    lp[0, 3] = olp[0, 3] + 30.0  # beyond the [-20, 20] clamp
    log_rho, t = cumulative_log_ratio(torch.tensor(lp), torch.tensor(olp), torch.tensor(mask))
    for i in range(lp.shape[0]):
        prod, count = 1.0, 0
        for j in range(lp.shape[1]):
            if mask[i, j]:
                prod *= math.exp(_clip(lp[i, j] - olp[i, j], -20, 20))
                count += 1
                assert math.isclose(math.exp(log_rho[i, j].item()), prod, rel_tol=1e-5)
                assert t[i, j].item() == count
            else:
                assert t[i, j].item() == 0


def test_tool_tokens_neither_add_nor_count():
    g = np.random.default_rng(1)
    model_lp, model_olp = -g.random(8), -g.random(8)
    # the same 8 model tokens, with two tool observations (absurd log-probs, mask 0) in between
    layout = [1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 1]
    lp, olp = np.zeros(len(layout)), np.zeros(len(layout))
    k = 0
    for j, m in enumerate(layout):
        if m:
            lp[j], olp[j] = model_lp[k], model_olp[k]
            k += 1
        else:
            lp[j], olp[j] = -50.0, -1e-3
    mask = np.array(layout, dtype=bool)
    a_log, a_t = cumulative_log_ratio(torch.tensor(lp[None]), torch.tensor(olp[None]), torch.tensor(mask[None]))
    b_log, b_t = cumulative_log_ratio(torch.tensor(model_lp[None]), torch.tensor(model_olp[None]),
                                      torch.ones(1, 8, dtype=torch.bool))
    assert torch.allclose(a_log[0][torch.tensor(mask)], b_log[0], atol=1e-6)
    assert a_t[0][torch.tensor(mask)].tolist() == list(range(1, 9))
    assert b_t[0].tolist() == list(range(1, 9))
    # across a tool block the cumulative ratio is carried unchanged
    assert a_log[0, 5].item() == pytest.approx(a_log[0, 2].item())


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_adaptive_bounds_grow_as_t_power(power):
    eps_low, eps_high, T = 0.025, 0.05, 64
    positions = [1, 4, 16, 64]
    rows = []
    for t in positions:
        for side, factor in (("hi", 1.02), ("hi", 0.98), ("lo", 1.02), ("lo", 0.98)):
            bound = eps_high * t ** power if side == "hi" else -eps_low * t ** power
            lr = np.zeros(T)
            lr[t - 1] = bound * factor  # log rho_cum_t = factor * bound at position t (t-1 on-policy tokens before)
            rows.append((t, side, factor, lr))
    B = len(rows)
    olp = np.full((B, T), -1.0)
    lp = olp + np.stack([r[3] for r in rows])
    mask = np.zeros((B, T), dtype=bool)
    adv = np.zeros((B, T))
    for i, (t, side, _, _) in enumerate(rows):
        mask[i, :t] = True
        adv[i, :t] = 1.0 if side == "hi" else -1.0  # the sign for which this bound is active
    _, grad, metrics = run("ctpo", olp, lp, adv, mask, "token-mean", eps_low=eps_low, eps_high=eps_high,
                           power=power, dual_clip_c=None)
    n = mask.sum()
    for i, (t, side, factor, _) in enumerate(rows):
        clipped = factor > 1.0
        assert (grad[i, t - 1] == 0.0) == clipped, (t, side, factor)
    n_high = sum(1 for t, s, f, _ in rows if s == "hi" and f > 1)
    n_low = sum(1 for t, s, f, _ in rows if s == "lo" and f > 1)
    assert metrics[schema.CLIP_FRAC_HIGH].item() == pytest.approx(n_high / n)
    assert metrics[schema.CLIP_FRAC_LOW].item() == pytest.approx(n_low / n)
    assert metrics[schema.CLIP_FRAC].item() == pytest.approx((n_high + n_low) / n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_is_minus_advantage_times_rho_cum_over_n(seed):
    olp, lp, adv, mask = make_batch(seed, scale=0.05)
    eps_low, eps_high, power = 0.025, 0.05, 0.5
    _, grad, _ = run("ctpo", olp, lp, adv, mask, "token-mean", eps_low=eps_low, eps_high=eps_high, power=power,
                     dual_clip_c=None)
    n = mask.sum()
    n_unclipped = 0
    for i in range(lp.shape[0]):
        s, t = 0.0, 0
        for j in range(lp.shape[1]):
            if not mask[i, j]:
                assert grad[i, j] == 0.0
                continue
            s += lp[i, j] - olp[i, j]
            t += 1
            a = adv[i, j]
            clipped = (a > 0 and s > eps_high * t ** power) or (a < 0 and s < -eps_low * t ** power)
            expected = 0.0 if clipped else -a * math.exp(s) / n
            n_unclipped += not clipped
            assert grad[i, j] == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert n_unclipped > 10  # the check is not vacuous


def test_on_policy_all_methods_give_the_same_loss_and_gradient():
    olp, _, adv, mask = make_batch(3)
    n = mask.sum()
    expected_loss = -(adv * mask).sum() / n
    for method, kw in PARAMS.items():
        loss, grad, metrics = run(method, olp, olp.copy(), adv, mask, "token-mean", **kw)
        assert loss == pytest.approx(expected_loss, rel=1e-6), method
        np.testing.assert_allclose(grad, -adv * mask / n, rtol=1e-6, atol=1e-9, err_msg=method)
        assert metrics[schema.CLIP_FRAC].item() == 0.0


def test_fixed_and_adaptive_differ_only_in_bounds():
    # with power 0 the adaptive log bounds are the constants [-eps_low, eps_high]: fixed bounds
    # (e^-eps_low, e^eps_high) must then give the identical token losses, gradient and clip fractions. The token
    # losses are called directly: this constant dual clip e^0.15 < e^0.2 is one the ablation's checks refuse.
    olp, lp, adv, mask = make_batch(4, scale=0.1)
    eps_low, eps_high = 0.1, 0.2
    common = dict(eps_low=eps_low, eps_high=eps_high, power=0.0, dual_clip_c=0.15)
    a_args, f_args = tensors(olp, lp, adv, mask), tensors(olp, lp, adv, mask)
    la, ma = ctpo_token_losses(*a_args, **common)
    lf, mf = ctpo_fixed_token_losses(*f_args, fixed_bounds=(math.exp(-eps_low), math.exp(eps_high)),
                                     fixed_dual_clip=math.exp(0.15))  # constant dual clip exp(0.15 t^0)
    torch.testing.assert_close(la, lf, rtol=1e-6, atol=1e-7)
    la.sum().backward()
    lf.sum().backward()
    torch.testing.assert_close(a_args[1].grad, f_args[1].grad, rtol=1e-6, atol=1e-7)
    for k in ma:
        assert ma[k].item() == pytest.approx(mf[k].item(), abs=1e-7), k
    assert ma[schema.CLIP_FRAC].item() > 0.05
    # and with power 0.5 they differ
    lb, _ = ctpo_token_losses(*tensors(olp, lp, adv, mask), **{**common, "power": 0.5})
    assert (lb - la).abs().max().item() > 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", list(PARAMS))
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_every_loss_matches_its_loop_reference(method, mode, seed):
    olp, lp, adv, mask = make_batch(seed, scale=0.4 if method != "gspo" else 0.05)
    if seed == 2:
        lp[0, :] = olp[0, :] + 25.0  # beyond the per-token clamp and the e^10 cap
    p = PARAMS[method]
    ref_loss, ref_grad = ref_token_terms(method, olp, lp, adv, mask, {**PARAMS["ctpo"], **PARAMS["grpo"], **p})
    loss, grad, metrics = run(method, olp, lp, adv, mask, mode, **p)
    assert loss == pytest.approx(ref_agg(ref_loss, mask, mode), rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(grad, ref_agg_grad(ref_grad, mask, mode), rtol=1e-5, atol=1e-8)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_dual_clip_caps_negative_advantage_tokens_at_minus_a_exp_c_t_power():
    T = 9
    olp = np.full((1, T), -1.0)
    lp = olp + 0.3  # log rho_cum_t = 0.3 t, far above every bound
    mask = np.ones((1, T), dtype=bool)
    adv = np.full((1, T), -2.0)
    c, p = 0.05, 0.5
    loss, grad, metrics = run("ctpo", olp, lp, adv, mask, "seq-mean-token-sum",
                              dual_clip_c=c, power=p)
    expected = sum(2.0 * math.exp(c * t ** p) for t in range(1, T + 1))
    assert loss == pytest.approx(expected, rel=1e-6)
    assert np.all(grad == 0.0)
    assert metrics[schema.DUAL_CLIP_FRAC].item() == 1.0
    loss_off, grad_off, _ = run("ctpo", olp, lp, adv, mask, "seq-mean-token-sum", power=p, dual_clip_c=None)
    assert loss_off == pytest.approx(sum(2.0 * math.exp(0.3 * t) for t in range(1, T + 1)), rel=1e-6)
    assert np.all(grad_off > 0)  # -A rho_cum with A < 0: pushes log_prob down


def test_fixed_ablation_is_fixed_at_every_position_for_both_advantage_signs():
    # the case: A < 0, rho_cum = 2 (inside [0.5, 5]) at every position; the ablation must pass the
    # gradient -A rho_cum at every t, where CTPO's position-scaled dual clip exp(0.05 sqrt t) < 2 zeroes it
    T = 200
    olp = np.full((1, T), -1.0)
    lp = olp.copy()
    lp[0, 0] += math.log(2.0)  # log rho_cum_t = log 2 for every t
    mask = np.ones((1, T), dtype=bool)
    adv = np.full((1, T), -1.0)
    cfg = LossConfig(method="ctpo_fixed", loss_agg_mode="token-mean", fixed_bounds=[0.5, 5.0], fixed_dual_clip=5.0)
    lpt = torch.tensor(lp, dtype=torch.float32, requires_grad=True)
    loss, m = compute_policy_loss(torch.tensor(olp, dtype=torch.float32), lpt, torch.tensor(adv, dtype=torch.float32),
                                  torch.tensor(mask), cfg)
    loss.backward()
    np.testing.assert_allclose(lpt.grad.numpy(), np.full((1, T), 2.0 / T), rtol=1e-5)  # -A rho_cum / N, all t
    assert m[schema.CLIP_FRAC].item() == 0.0 and m[schema.DUAL_CLIP_FRAC].item() == 0.0
    _, _, m_c = run("ctpo", olp, lp, adv, mask, "token-mean", dual_clip_c=0.05)
    n_capped = sum(1 for t in range(1, T + 1) if math.exp(0.05 * t**0.5) < 2.0)  # t <= 192
    assert m_c[schema.DUAL_CLIP_FRAC].item() == pytest.approx(n_capped / T)
    # above the band, A < 0: loss capped at the constant -A * 5 at every position, no gradient
    lp[0, 0] = olp[0, 0] + math.log(8.0)
    loss8, grad8, m8 = run("ctpo_fixed", olp, lp, adv, mask, "seq-mean-token-sum", fixed_bounds=(0.5, 5.0),
                           fixed_dual_clip=5.0)
    assert loss8 == pytest.approx(5.0 * T, rel=1e-6) and np.all(grad8 == 0.0)
    assert m8[schema.CLIP_FRAC].item() == 1.0 and m8[schema.DUAL_CLIP_FRAC].item() == 1.0


@pytest.mark.parametrize("kw, match", [
    (dict(dual_clip_c=0.05, fixed_dual_clip=None), "loss.dual_clip_c"),
    (dict(dual_clip_c=None, fixed_dual_clip=4.0), "tighter than the upper bound"),
])
def test_fixed_ablation_rejects_a_position_scaled_or_too_tight_dual_clip(kw, match):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        compute_policy_loss(x, x, x, x.bool(), LossConfig(method="ctpo_fixed", loss_agg_mode="token-mean",
                                                          fixed_bounds=[0.5, 5.0], **kw))


def test_clip_frac_is_out_of_band_and_active_is_low_plus_high():
    olp, lp, adv, mask = make_batch(3, scale=0.4)
    _, _, m = run("grpo", olp, lp, adv, mask, "token-mean", **PARAMS["grpo"])
    r = np.exp(np.clip(lp - olp, -20, 20))
    out = (r < 0.8) | (r > 1.28)
    a = adv
    n = mask.sum()
    assert m[schema.CLIP_FRAC].item() == pytest.approx((out & mask).sum() / n, abs=1e-6)
    active = ((r > 1.28) & (a > 0) | (r < 0.8) & (a < 0)) & mask
    assert m[schema.CLIP_FRAC_ACTIVE].item() == pytest.approx(active.sum() / n, abs=1e-6)
    assert m[schema.CLIP_FRAC].item() > m[schema.CLIP_FRAC_ACTIVE].item() > 0


def test_extreme_inputs_stay_finite():
    B, T = 4, 8000
    olp = torch.full((B, T), -1.0)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None]
    lp = (olp + 20.0 * sign).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[3] = False  # all-masked row
    adv = torch.tensor([1.0, -1.0, -1.0, 0.5])[:, None].expand(B, T).contiguous()
    cfgs = [method_loss("ctpo", dual_clip_c=0.05), method_loss("ctpo", dual_clip_c=None),
            method_loss("ctpo_fixed", fixed_bounds=[0.5, 5.0], fixed_dual_clip=5.0),
            method_loss("grpo", clip_ratio_c=3.0), method_loss("gspo"), method_loss("full_seq", clip_ratio_c=None)]
    for cfg in cfgs:
        lp.grad = None
        loss, metrics = compute_policy_loss(olp, lp, adv, mask, cfg)
        loss.backward()
        assert torch.isfinite(loss), cfg.method
        assert torch.isfinite(lp.grad).all(), cfg.method
        assert all(torch.isfinite(v) for v in metrics.values()), cfg.method
        # empty response (T = 0) and an all-masked batch
        for shape, m in (((B, 0), torch.zeros(B, 0, dtype=torch.bool)), ((B, 5), torch.zeros(B, 5, dtype=torch.bool))):
            x = torch.zeros(shape, requires_grad=True)
            loss0, met0 = compute_policy_loss(torch.zeros(shape), x, torch.zeros(shape), m, cfg)
            loss0.backward()
            assert loss0.item() == 0.0 and all(torch.isfinite(v) for v in met0.values()), cfg.method
        # bf16 inputs: computed in fp32, gradient returned in bf16
        lpb = lp.detach()[:, :64].bfloat16().requires_grad_()
        lossb, _ = compute_policy_loss(olp[:, :64].bfloat16(), lpb, adv[:, :64].bfloat16(), mask[:, :64], cfg)
        lossb.backward()
        assert lossb.dtype == torch.float32 and lpb.grad.dtype == torch.bfloat16
        assert torch.isfinite(lpb.grad.float()).all(), cfg.method


def test_metrics_log_ratio_statistics():
    olp, lp, adv, mask = make_batch(5)
    _, _, metrics = run("ctpo", olp, lp, adv, mask, "token-mean", dual_clip_c=None)
    lr = [lp[i, j] - olp[i, j] for i in range(lp.shape[0]) for j in range(lp.shape[1]) if mask[i, j]]
    cum = []
    for i in range(lp.shape[0]):
        s = 0.0
        for j in range(lp.shape[1]):
            if mask[i, j]:
                s += lp[i, j] - olp[i, j]
                cum.append(s)
    assert metrics[schema.LOG_RATIO_MEAN].item() == pytest.approx(np.mean(lr), rel=1e-5)
    assert metrics[schema.LOG_RATIO_ABS_MAX].item() == pytest.approx(np.max(np.abs(lr)), rel=1e-5)
    assert metrics[schema.LOG_RHO_CUM_MEAN].item() == pytest.approx(np.mean(cum), rel=1e-5)
    assert metrics[schema.LOG_RHO_CUM_STD].item() == pytest.approx(np.std(cum), rel=1e-4)


def test_bad_input_fails_with_a_clear_message():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages: expected shape"):
        ctpo_token_losses(x, x, torch.zeros(2, 4), x.bool(), **file_knobs("ctpo"))
    with pytest.raises(ValueError, match="loss.loss_agg_mode"):
        compute_policy_loss(x, x, x, x.bool(), LossConfig(method="ctpo", loss_agg_mode="token-max",
                                                          **file_knobs("ctpo")))
    with pytest.raises(ValueError, match="loss.method"):
        compute_policy_loss(x, x, x, x.bool(), LossConfig(method="ppo"))
    with pytest.raises(ValueError, match="loss.fixed_bounds"):
        compute_policy_loss(x, x, x, x.bool(), LossConfig(method="ctpo_fixed", loss_agg_mode="token-mean"))
