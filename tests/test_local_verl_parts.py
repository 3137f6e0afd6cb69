"""The local trainer's advantages and loss aggregation are verl's pure functions (issue 23, item 5), checked
against references written here, and the one place ours differs from verl's: an empty batch. (Its rollout IS
weights, verl's compute_rollout_correction_weights, are checked in tests/test_train_units.py.)"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("verl")
from verl.trainer.ppo.core_algos import agg_loss  # noqa: E402

from ctpo.config import method_loss  # noqa: E402
from ctpo.losses import compute_policy_loss  # noqa: E402
from ctpo.train.local import step_advantages  # noqa: E402

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def test_step_advantages_are_grpo_group_advantages_with_infra_episodes_alone():
    n = 3
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0, 2.0]
    finish = ["stop", "stop", "void", "stop", "infra", "stop", "stop", "stop", "stop"]
    mask = torch.tensor(np.random.default_rng(0).random((9, 5)) > 0.3, dtype=torch.float32)
    mask[2] = 0.0  # a void episode: masked out of the loss, its reward still in its group (as before verl's)
    episodes = [SimpleNamespace(finish_reason=f) for f in finish]
    groups = [f"infra{i}" if f == "infra" else i // n for i, f in enumerate(finish)]
    for norm in (True, False):
        out = step_advantages(torch.tensor(rewards), episodes, mask, n, norm)
        assert out.shape == mask.shape and out.dtype == torch.float32
        for i, g in enumerate(groups):
            members = [rewards[k] for k in range(9) if groups[k] == g]
            if len(members) == 1:
                expected = rewards[i]  # a group of one: mean 0, std 1 (verl), so A = R / (1 + eps)
                expected = expected / (1 + 1e-6) if norm else expected
            else:
                mu = sum(members) / len(members)
                sd = math.sqrt(sum((x - mu) ** 2 for x in members) / (len(members) - 1))
                expected = (rewards[i] - mu) / (sd + 1e-6) if norm else rewards[i] - mu
            for j in range(5):
                assert out[i, j].item() == pytest.approx(expected * mask[i, j].item(), abs=1e-5), (i, j)


@pytest.mark.parametrize("mode", MODES)
def test_compute_policy_loss_aggregates_with_verls_agg_loss(mode):
    """Parity: the loss is verl's agg_loss of the method's token losses, with and without verl's global
    batch information."""
    g = torch.Generator().manual_seed(5)
    olp = -torch.rand(5, 9, generator=g)
    lp = olp + 0.2 * torch.randn(5, 9, generator=g)
    mask = torch.rand(5, 9, generator=g) > 0.3
    mask[1] = False
    adv = torch.randn(5, 1, generator=g).expand(5, 9) * mask
    cfg = method_loss("ctpo", loss_agg_mode=mode)
    from ctpo.losses import ctpo_token_losses

    token_loss, _ = ctpo_token_losses(olp, lp, adv, mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                      power=cfg.power, dual_clip_c=cfg.dual_clip_c)
    ours, _ = compute_policy_loss(olp, lp, adv, mask, cfg)
    assert ours.item() == agg_loss(token_loss, mask, mode).item()
    info = dict(batch_num_tokens=40, global_batch_size=8)
    ours, _ = compute_policy_loss(olp, lp, adv, mask, cfg, **info)
    assert ours.item() == agg_loss(token_loss, mask, mode, **info).item()


@pytest.mark.parametrize("mode", MODES)
def test_an_empty_batch_gives_loss_zero_where_verls_agg_loss_divides_by_zero(mode):
    """Ours differs here on purpose: a micro-batch of void / infra episodes only has no model token. verl's
    agg_loss divides by its zero counts (NaN, which would poison the parameters through backward); ours
    defaults the counts to 1, so the loss and its gradient are 0."""
    z = torch.zeros(3, 4)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    lp = z.clone().requires_grad_()
    loss, metrics = compute_policy_loss(z, lp, z, mask, method_loss("ctpo", loss_agg_mode=mode))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(lp.grad == 0)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert math.isnan(agg_loss(z, mask, mode).item())
