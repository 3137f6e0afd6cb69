"""Proposition 1 by exact enumeration on a tabular autoregressive policy (vocab 3, horizon 3).

E_{tau ~ pi_b}[ sum_t rho_cum_t A_t grad log pi_theta(a_t | s_t) ] = grad J(theta), with J(theta) = E_{pi_theta}[R].
The estimator is the gradient of our per-token losses (with clipping switched off), weighted by pi_b(tau)
over all 27 trajectories; grad J comes from autograd of the exact J written here.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from ctpo.losses import ctpo_token_losses, full_seq_token_losses, gspo_token_losses, token_ratio_token_losses

V, H = 3, 3
TRAJS = list(itertools.product(range(V), repeat=H))  # all 27 action sequences
PREFIXES = [p for t in range(H) for p in itertools.product(range(V), repeat=t)]  # states s_t = a_{<t}
STATE = {p: k for k, p in enumerate(PREFIXES)}
NO_CLIP = 1e6


def traj_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(27, H): log pi(a_t | a_{<t}) with pi(. | s) = softmax(logits[s])."""
    logp = torch.log_softmax(logits, dim=-1)
    return torch.stack([torch.stack([logp[STATE[tau[:t]], tau[t]] for t in range(H)]) for tau in TRAJS])


def advantages(logits: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """(27, H): A_t = Q(s_t, a_t) - V(s_t) under pi_theta, by enumeration; depends on a_{1:t} only."""
    with torch.no_grad():
        p_traj = traj_log_probs(logits).sum(-1).exp()  # pi_theta(tau)

        def value(prefix):  # E[R | a_{1:len(prefix)} = prefix]
            idx = [k for k, tau in enumerate(TRAJS) if tau[: len(prefix)] == prefix]
            w = p_traj[idx]
            return (w * reward[idx]).sum() / w.sum()

        return torch.tensor([[value(tau[: t + 1]) - value(tau[:t]) for t in range(H)] for tau in TRAJS])


def estimator(token_losses, theta, behaviour, reward, **kw) -> torch.Tensor:
    """-grad_theta E_{pi_b}[ sum_t loss_t ]: the loss's policy-gradient estimate, in expectation."""
    theta = theta.clone().requires_grad_()
    lp = traj_log_probs(theta)
    with torch.no_grad():
        olp = traj_log_probs(behaviour)
        p_b = olp.sum(-1).exp()
    adv = advantages(theta.detach(), reward)
    mask = torch.ones(len(TRAJS), H, dtype=torch.bool)
    loss_mat, _ = token_losses(olp.float(), lp.float(), adv.float(), mask, **kw)
    (-(p_b[:, None].float() * loss_mat).sum()).backward()
    return theta.grad.double()


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64)
    behaviour = theta + 0.8 * torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64)
    reward = torch.rand(len(TRAJS), generator=g, dtype=torch.float64)
    th = theta.clone().requires_grad_()
    J = (traj_log_probs(th).sum(-1).exp() * reward).sum()
    J.backward()
    return theta, behaviour, reward, th.grad


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_cumulative_ratio_estimator_is_unbiased(problem):
    theta, behaviour, reward, grad_j = problem
    g = estimator(ctpo_token_losses, theta, behaviour, reward, eps_low=NO_CLIP, eps_high=NO_CLIP, power=0.5,
                  dual_clip_c=None)
    assert rel_err(g, grad_j) < 1e-5


def test_full_sequence_ratio_estimator_is_unbiased(problem):
    theta, behaviour, reward, grad_j = problem
    g = estimator(full_seq_token_losses, theta, behaviour, reward, clip_ratio_low=NO_CLIP, clip_ratio_high=NO_CLIP,
                  clip_ratio_c=None)
    assert rel_err(g, grad_j) < 1e-5


def test_token_ratio_and_gspo_estimators_are_biased(problem):
    theta, behaviour, reward, grad_j = problem
    g_tok = estimator(token_ratio_token_losses, theta, behaviour, reward, clip_ratio_low=NO_CLIP,
                      clip_ratio_high=NO_CLIP, clip_ratio_c=None)
    g_gspo = estimator(gspo_token_losses, theta, behaviour, reward, clip_ratio_low=NO_CLIP, clip_ratio_high=NO_CLIP)
    assert rel_err(g_tok, grad_j) > 0.2  # measured ~0.6: the omitted prefix correction is material
    assert rel_err(g_gspo, grad_j) > 0.2  # measured ~0.6: the omitted prefix correction is material


def test_all_estimators_agree_on_policy(problem):
    theta, _, reward, grad_j = problem
    for fn, kw in ((ctpo_token_losses, dict(eps_low=NO_CLIP, eps_high=NO_CLIP, power=0.5, dual_clip_c=None)),
                   (token_ratio_token_losses,
                    dict(clip_ratio_low=NO_CLIP, clip_ratio_high=NO_CLIP, clip_ratio_c=None))):
        assert rel_err(estimator(fn, theta, theta, reward, **kw), grad_j) < 1e-5
