"""Micro-batching and padding do not change the loss or its gradient (user pain point: aggregation bugs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ctpo.config import LossConfig
from ctpo.losses import compute_policy_loss

L = dict(loss_agg_mode="token-mean")
CFGS = {
    "ctpo": LossConfig(method="ctpo", **L, eps_low=0.025, eps_high=0.05, power=0.5, dual_clip_c=0.05),
    "ctpo_fixed": LossConfig(method="ctpo_fixed", **L, fixed_bounds=[0.9, 1.1], fixed_dual_clip=1.1),
    "grpo": LossConfig(method="grpo", **L, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0),
    "gspo": LossConfig(method="gspo", loss_agg_mode="seq-mean-token-mean", clip_ratio_low=0.01, clip_ratio_high=0.02),
    "full_seq": LossConfig(method="full_seq", loss_agg_mode="seq-mean-token-sum", clip_ratio_low=0.2,
                           clip_ratio_high=0.2, clip_ratio_c=3.0),
}


def batch(seed, B=8, T=20):
    g = np.random.default_rng(seed)
    lp = -np.abs(g.normal(1, 0.5, (B, T)))
    olp = lp + g.normal(0, 0.1, (B, T))
    mask = g.random((B, T)) > 0.2
    mask[1] = False
    adv = np.repeat(g.normal(size=(B, 1)), T, axis=1) * mask
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return f(olp), f(lp), f(adv), torch.tensor(mask)


@pytest.mark.parametrize("method", list(CFGS))
def test_micro_batches_with_global_denominators_equal_one_pass(method):
    cfg = CFGS[method]
    olp, lp, adv, mask = batch(0)
    full_lp = lp.clone().requires_grad_()
    full, _ = compute_policy_loss(olp, full_lp, adv, mask, cfg)
    full.backward()

    # verl's global_batch_info: the mini-batch's token count and number of non-empty sequences
    n_tokens = mask.sum()
    n_seqs = (mask.sum(-1) > 0).sum()
    acc_lp = lp.clone().requires_grad_()
    total = torch.zeros(())
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):
        part, _ = compute_policy_loss(olp[rows], acc_lp[rows], adv[rows], mask[rows], cfg,
                                      batch_num_tokens=n_tokens, global_batch_size=n_seqs)
        part.backward()
        total = total + part.detach()
    # fp32: the parts (up to ~1.6 here) cancel to ~0.19, so allow a few ulps of the parts, not of the total
    assert total.item() == pytest.approx(full.item(), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(acc_lp.grad, full_lp.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", list(CFGS))
def test_extra_right_padding_changes_nothing(method):
    cfg = CFGS[method]
    olp, lp, adv, mask = batch(1)
    base_lp = lp.clone().requires_grad_()
    base, base_m = compute_policy_loss(olp, base_lp, adv, mask, cfg)
    base.backward()

    pad = 7
    g = torch.Generator().manual_seed(0)
    junk = lambda: -30 * torch.rand(lp.shape[0], pad, generator=g)  # noqa: E731
    p_olp = torch.cat([olp, junk()], dim=1)
    p_lp = torch.cat([lp, junk()], dim=1).requires_grad_()
    p_adv = torch.cat([adv, torch.randn(lp.shape[0], pad, generator=g)], dim=1)  # even nonzero advantages
    p_mask = torch.cat([mask, torch.zeros(lp.shape[0], pad, dtype=torch.bool)], dim=1)
    padded, padded_m = compute_policy_loss(p_olp, p_lp, p_adv, p_mask, cfg)
    padded.backward()
    assert padded.item() == pytest.approx(base.item(), rel=1e-6, abs=1e-8)
    torch.testing.assert_close(p_lp.grad[:, : lp.shape[1]], base_lp.grad, rtol=1e-6, atol=1e-9)
    assert torch.all(p_lp.grad[:, lp.shape[1]:] == 0)
    for k in base_m:
        assert padded_m[k].item() == pytest.approx(base_m[k].item(), rel=1e-5, abs=1e-7), k
