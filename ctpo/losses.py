"""Importance-ratio policy losses (paper Sec. 2-3): CTPO and the GRPO / GSPO / full-sequence baselines.

All functions are pure and work on per-token tensors of shape (B, T): B responses, T response positions.
`response_mask` (B, T) is 1 (or True) for model-generated tokens and 0 for padding and tool-observation
tokens. Inputs may be bf16 / fp16; everything is computed in fp32.

How gradients are built. Each loss is a per-token surrogate whose *value* is the clipped objective and
whose *gradient* with respect to `log_prob[i, t]` flows through the current token only, exactly as the
released CTPO code does with `S.detach() + log_prob - log_prob.detach()`. For every method the per-token
loss is

    loss_t = max(-A_t * w_t, -A_t * clip(w_t))         (PPO / GRPO clipped surrogate, sign flipped)
    loss_t = min(loss_t, -A_t * cap_t)   if A_t < 0    (dual clip, optional)

with w_t the method's importance weight (token ratio r_t, GSPO's s_i, CTPO's rho_cum_t, the full
sequence ratio). Its derivative is d loss_t / d log_prob_t = -A_t * w_t when the unclipped branch is the
one taken and 0 otherwise. We compute the value and that derivative in closed form under `no_grad` and
attach the derivative with a one-tensor autograd node (`_attach_grad`), which saves memory and time over
differentiating the whole expression; the tests check it against autograd of the textbook expressions
and of verl's own losses.

One clip-fraction definition for every method (paper Fig. 2: "the fraction of tokens whose
method-specific IS ratio exceeds the corresponding clipping threshold"), over model tokens:

    CLIP_FRAC      = #{w_t outside [lo_t, hi_t]}            / #model tokens
    CLIP_FRAC_LOW  = #{w_t < lo_t and A_t < 0}              / #model tokens   (clip active, no gradient)
    CLIP_FRAC_HIGH = #{w_t > hi_t and A_t > 0}              / #model tokens   (clip active, no gradient)
    CLIP_FRAC_ACTIVE = LOW + HIGH   (verl's `pg_clipfrac`: the clipped branch is the one taken)

so CLIP_FRAC >= CLIP_FRAC_ACTIVE; the rest are out-of-range tokens where the min() keeps the unclipped term.
Figure 2 plots CLIP_FRAC for every method, on both backends; CLIP_FRAC_ACTIVE is kept as its own metric.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ctpo import methods, schema
from ctpo.config import LossConfig
from ctpo.methods import AGG_MODES

LOG_RATIO_CLAMP = 20.0  # per-token |log r_t| clamp (verl, released CTPO)
LOG_WEIGHT_CAP = 10.0  # cumulative / sequence log-weight capped before exp (released CTPO, verl GSPO)

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- helpers


class _AttachGrad(torch.autograd.Function):
    """Returns `value` (B, T); the backward pass gives d out / d log_prob = grad_coef (elementwise)."""

    @staticmethod
    def forward(ctx, log_prob: Tensor, value: Tensor, grad_coef: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(grad_coef)
        ctx.lp_dtype = log_prob.dtype
        return value

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        (grad_coef,) = ctx.saved_tensors
        return (grad_out * grad_coef).to(ctx.lp_dtype), None, None


def _attach_grad(log_prob: Tensor, value: Tensor, grad_coef: Tensor) -> Tensor:
    if log_prob.requires_grad and torch.is_grad_enabled():
        return _AttachGrad.apply(log_prob, value, grad_coef)
    return value


def _check_shapes(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor) -> None:
    shape = log_prob.shape
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob: expected shape (B, T), got {tuple(shape)}")
    for name, x in (("old_log_prob", old_log_prob), ("advantages", advantages), ("response_mask", response_mask)):
        if x.shape != shape:
            raise ValueError(f"{name}: expected shape {tuple(shape)} like log_prob, got {tuple(x.shape)}")


def _masked_log_ratio(log_prob: Tensor, old_log_prob: Tensor, mask: Tensor, clamp: bool = True) -> Tensor:
    """log r_t = log pi_theta - log pi_old over model tokens, 0 elsewhere; (B, T) fp32, detached."""
    lr = log_prob.detach().float() - old_log_prob.detach().float()
    if clamp:
        lr = lr.clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.where(mask, lr, 0.0)


def _count(x: Tensor, dim: Optional[int] = None) -> Tensor:
    """Number of True entries (bool.sum() would first widen the whole tensor to int64)."""
    return torch.count_nonzero(x) if dim is None else torch.count_nonzero(x, dim=dim)


def _neg_mul(buf: Tensor, adv: Tensor) -> Tensor:
    """-adv * buf, written into `buf` when it is a full (B, T) buffer owned by the caller."""
    return buf.mul_(adv).neg_() if buf.shape == adv.shape else (adv * buf).neg_()


def _surrogate(adv: Tensor, w: Tensor, w_clip: Tensor, mask: Tensor, grad_ok: Optional[Tensor],
               dual_cap: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Clipped surrogate value and its derivative wrt log_prob_t; (B, T) fp32, 0 where masked.

    adv, mask: (B, T). w: importance weight, w_clip: the clipped weight, grad_ok: bool, where d w / d log_prob_t
    = w (False where a clamp on the log weight cut the gradient); each (B, T) or (B, 1) for sequence weights.
    dual_cap: weight cap c for A < 0 tokens, (B, T) or 0-d, or None. `w_clip` and a (B, T) `dual_cap` are
    overwritten (callers pass buffers they own; this keeps the peak memory low).
    Returns (value, grad, capped): capped (B, T) bool marks tokens where the dual clip binds (None if off).
    """
    loss1 = torch.mul(adv, w).neg_()  # -A * w
    loss = _neg_mul(w_clip, adv)  # -A * clip(w)
    torch.maximum(loss1, loss, out=loss)  # max(-A w, -A clip(w))
    unclipped = loss == loss1  # gradient flows through -A * w
    capped = None
    if dual_cap is not None:
        cap = _neg_mul(dual_cap, adv).masked_fill_(adv >= 0, math.inf)  # -A * c, binding only for A < 0
        capped = loss > cap
        torch.minimum(loss, cap, out=loss)  # min(., -A c)
        del cap
        unclipped &= ~capped
    unclipped &= mask
    if grad_ok is not None:
        unclipped &= grad_ok
    grad = loss1.masked_fill_(~unclipped, 0.0)  # d loss_t / d log_prob_t = -A_t * w_t (Prop. 1 term), else 0
    return loss.masked_fill_(~mask, 0.0), grad, capped


def _ratio_stats(mask: Tensor, log_r: Tensor, log_rho_cum: Tensor, n: Tensor) -> dict:
    """Log-ratio statistics over model tokens (0-d fp32). log_r (B, T) is 0 where masked; log_rho_cum (B, T)."""
    abs_max = log_r.abs().max() if log_r.numel() else torch.zeros((), device=log_r.device)
    cum = torch.where(mask, log_rho_cum, 0.0)  # cumsum carries values onto masked slots
    mean_cum = cum.sum() / n
    var_cum = cum.sub_(mean_cum).masked_fill_(~mask, 0.0).square_().sum() / n
    return {
        schema.LOG_RATIO_MEAN: log_r.sum() / n,
        schema.LOG_RATIO_ABS_MAX: abs_max,
        schema.LOG_RHO_CUM_MEAN: mean_cum,
        schema.LOG_RHO_CUM_STD: var_cum.sqrt(),
    }


def _clip_stats(adv: Tensor, mask: Tensor, below: Tensor, above: Tensor, capped: Optional[Tensor], n: Tensor) -> dict:
    """Clip fractions (module docstring) and the dual-clip fraction. below / above: bool, weight outside its
    bounds, (B, T) or (B, 1); capped: (B, T) bool or None."""
    below = below & mask
    above = above & mask
    low, high = _count(below & (adv < 0)) / n, _count(above & (adv > 0)) / n
    return {
        schema.CLIP_FRAC: _count(below | above) / n,
        schema.CLIP_FRAC_LOW: low,
        schema.CLIP_FRAC_HIGH: high,
        schema.CLIP_FRAC_ACTIVE: low + high,
        schema.DUAL_CLIP_FRAC: torch.zeros((), device=n.device) if capped is None else _count(capped & mask) / n,
    }


# ----------------------------------------------------------------------------- aggregation


def agg_loss(loss_mat: Tensor, mask: Tensor, mode: str, batch_num_tokens: Optional[Union[Tensor, float]] = None,
             global_batch_size: Optional[Union[Tensor, float]] = None) -> Tensor:
    """Reduce a per-token loss (B, T) to a scalar.

    token-mean:          sum_{i,t} m l / N_tokens        (N_tokens = batch_num_tokens or mask.sum())
    seq-mean-token-mean: sum_i [sum_t m l / sum_t m] / N_seqs   (N_seqs = global_batch_size or #non-empty rows)
    seq-mean-token-sum:  sum_i [sum_t m l] / N_seqs
    Passing the global token / sequence count of a mini-batch makes micro-batch accumulation exact (verl's
    global_batch_info). Empty batches give 0, not NaN.
    """
    mask = mask.bool()
    masked = torch.where(mask, loss_mat, 0.0)
    if mode == "token-mean":
        denom = _count(mask).clamp(min=1) if batch_num_tokens is None else batch_num_tokens
        return masked.sum() / denom
    if mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode: expected one of {AGG_MODES}, got '{mode}'")
    tokens = _count(mask, dim=-1)  # (B,)
    seq = masked.sum(dim=-1)  # (B,) token-sum
    if mode == "seq-mean-token-mean":
        seq = seq / tokens.clamp(min=1)
    denom = (tokens > 0).sum().clamp(min=1) if global_batch_size is None else global_batch_size
    return seq.sum() / denom


# ----------------------------------------------------------------------------- CTPO (Sec. 3)


def cumulative_log_ratio(log_prob: Tensor, old_log_prob: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """log rho_cum_t = sum_{t' <= t, model tokens} clamp(log pi_theta - log pi_old, -20, 20)   (Sec. 3.1).

    Args: log_prob, old_log_prob (B, T); response_mask (B, T), 1 = model token.
    Returns: log_rho_cum (B, T) fp32 (differentiable in log_prob; 0 before the first model token and carried
    unchanged over tool tokens), t (B, T) fp32, the 1-based count of model tokens up to and including this
    one (0 where masked). Tool tokens neither add to the sum nor count as positions.
    """
    mask = response_mask.bool()
    lr = (log_prob.float() - old_log_prob.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    lr = torch.where(mask, lr, 0.0)  # tool / padding tokens add nothing
    log_rho_cum = torch.cumsum(lr, dim=-1)  # log prod_{t'<=t} r_t'
    t = torch.where(mask, torch.cumsum(mask.float(), dim=-1), 0.0)  # position among model tokens
    return log_rho_cum, t


def _cumulative_token_losses(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                             bounds) -> tuple[Tensor, dict]:
    """Per-token loss (B, T) and metrics with weight rho_cum_t (CTPO and its fixed-band ablation).

    bounds(mask) -> (lo, hi, cap): log-space clip bounds of rho_cum (floats or (B, T) fp32 tensors the caller
    hands over) and the dual-clip cap of A < 0 tokens ((B, T), 0-d or None); called once the log ratios are freed.
    """
    _check_shapes(old_log_prob, log_prob, advantages, response_mask)
    mask = response_mask.bool()
    with torch.no_grad():
        adv = advantages.float()
        n = _count(mask).clamp(min=1).float()  # model tokens
        log_r = _masked_log_ratio(log_prob, old_log_prob, mask)  # log r_t, clamped to [-20, 20]
        s = torch.cumsum(log_r, dim=-1)  # S_t = log rho_cum_t = sum_{t'<=t} log r_t'   (value only)
        metrics = _ratio_stats(mask, log_r, s, n)
        del log_r
        grad_ok = s <= LOG_WEIGHT_CAP  # exp(min(S, 10)): no gradient above the cap
        log_w = s.clamp_(max=LOG_WEIGHT_CAP)  # released: log ratio capped at 10 before exp
        lo, hi, cap = bounds(mask)
        log_w_clip = torch.clamp(log_w, lo, hi)
        del lo, hi
        below, above = log_w < log_w_clip, log_w > log_w_clip
        # rho_cum = exp(log_w), clip(rho_cum) = exp(log_w_clip), both computed in place
        value, grad, capped = _surrogate(adv, log_w.exp_(), log_w_clip.exp_(), mask, grad_ok, cap)
        metrics.update(_clip_stats(adv, mask, below, above, capped, n))
    return _attach_grad(log_prob, value, grad), metrics


def ctpo_token_losses(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, *,
                      eps_low: float, eps_high: float, power: float,
                      dual_clip_c: Optional[float]) -> tuple[Tensor, dict]:
    """Per-token CTPO loss (B, T) and metrics; see `ctpo_loss`."""

    def bounds(mask: Tensor):  # position-adaptive: log rho_cum in [-eps_low t^p, eps_high t^p]   (Sec. 3.3)
        t_p = torch.cumsum(mask, dim=-1, dtype=torch.float32).pow_(power)  # t^p, t = 1-based model-token index
        cap = None if dual_clip_c is None else torch.mul(t_p, dual_clip_c).exp_()  # loss(A<0) <= -A exp(c t^p)
        hi = t_p * eps_high
        return t_p.mul_(-eps_low), hi, cap

    return _cumulative_token_losses(old_log_prob, log_prob, advantages, response_mask, bounds)


def ctpo_fixed_token_losses(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, *,
                            fixed_bounds: Sequence[float],
                            fixed_dual_clip: Optional[float]) -> tuple[Tensor, dict]:
    """Per-token loss (B, T) of Table 3's ablation: rho_cum clipped to fixed_bounds [lo, hi] at every position;
    for A < 0 the token loss is capped at -A fixed_dual_clip (a constant, no position scaling; None = off)."""
    lo, hi = math.log(fixed_bounds[0]), math.log(fixed_bounds[1])

    def bounds(mask: Tensor):
        cap = None if fixed_dual_clip is None else torch.tensor(float(fixed_dual_clip), device=mask.device)
        return lo, hi, cap

    return _cumulative_token_losses(old_log_prob, log_prob, advantages, response_mask, bounds)


def ctpo_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, *,
              eps_low: float, eps_high: float, power: float, dual_clip_c: Optional[float], loss_agg_mode: str,
              batch_num_tokens=None, global_batch_size=None) -> tuple[Tensor, dict]:
    """CTPO loss (paper Eq. J_CTPO, Sec. 3.3), negated for minimisation.

        loss = agg_t  max(-A_t rho_cum_t, -A_t clip(rho_cum_t, e^{-eps_low t^p}, e^{eps_high t^p}))

    Args:
        old_log_prob, log_prob, advantages, response_mask: (B, T); advantages broadcast per token as in verl.
        eps_low, eps_high, power: position-adaptive log-space bounds [-eps_low t^p, eps_high t^p].
        dual_clip_c: for A < 0 the token loss is capped at -A exp(c t^p) (the release's dual clip); None = off.
        loss_agg_mode, batch_num_tokens, global_batch_size: see `agg_loss`.
    Values: configs/methods/ctpo.yaml. Returns: scalar loss; metrics dict (schema names -> 0-d tensors).
    Gradient: d loss / d log_prob_t = -A_t rho_cum_t / N where the unclipped branch is taken, else 0
    (Proposition 1's estimator); rho_cum's value is capped at e^10.
    """
    loss_mat, metrics = ctpo_token_losses(old_log_prob, log_prob, advantages, response_mask, eps_low=eps_low,
                                          eps_high=eps_high, power=power, dual_clip_c=dual_clip_c)
    return agg_loss(loss_mat, response_mask, loss_agg_mode, batch_num_tokens, global_batch_size), metrics


def ctpo_fixed_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, *,
                    fixed_bounds: Sequence[float], fixed_dual_clip: Optional[float], loss_agg_mode: str,
                    batch_num_tokens=None, global_batch_size=None) -> tuple[Tensor, dict]:
    """Table 3's fixed-clip ablation: `ctpo_loss` with rho_cum clipped to [lo, hi] = fixed_bounds at every
    position and a constant dual clip -A fixed_dual_clip for A < 0 (configs/methods/ctpo_fixed.yaml)."""
    loss_mat, metrics = ctpo_fixed_token_losses(old_log_prob, log_prob, advantages, response_mask,
                                                fixed_bounds=fixed_bounds, fixed_dual_clip=fixed_dual_clip)
    return agg_loss(loss_mat, response_mask, loss_agg_mode, batch_num_tokens, global_batch_size), metrics


# ----------------------------------------------------------------------------- baselines (Sec. 2)


def token_ratio_token_losses(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, *,
                             clip_ratio_low: float, clip_ratio_high: float,
                             clip_ratio_c: Optional[float]) -> tuple[Tensor, dict]:
    """Per-token PPO / GRPO loss (B, T): max(-A r_t, -A clip(r_t, 1-eps_low, 1+eps_high)), dual clip -A c."""
    _check_shapes(old_log_prob, log_prob, advantages, response_mask)
    mask = response_mask.bool()
    with torch.no_grad():
        adv = advantages.float()
        n = _count(mask).clamp(min=1).float()
        raw = log_prob.detach().float() - old_log_prob.detach().float()  # log r_t
        grad_ok = raw.abs() <= LOG_RATIO_CLAMP  # clamp(., -20, 20) passes gradient inside only
        log_r = raw.clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).masked_fill_(~mask, 0.0)
        metrics = _ratio_stats(mask, log_r, torch.cumsum(log_r, dim=-1), n)
        r = log_r.exp_()  # r_t = pi_theta / pi_old
        r_clip = r.clamp(1 - clip_ratio_low, 1 + clip_ratio_high)
        below, above = r < r_clip, r > r_clip
        cap = None if clip_ratio_c is None else torch.tensor(float(clip_ratio_c), device=r.device)
        value, grad, capped = _surrogate(adv, r, r_clip, mask, grad_ok, cap)
        metrics.update(_clip_stats(adv, mask, below, above, capped, n))
    return _attach_grad(log_prob, value, grad), metrics


def token_ratio_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, *,
                     clip_ratio_low: float, clip_ratio_high: float, clip_ratio_c: Optional[float],
                     loss_agg_mode: str, batch_num_tokens=None, global_batch_size=None) -> tuple[Tensor, dict]:
    """GRPO / PPO token-ratio loss (paper Eq. J_GRPO); with clip_ratio_c = 3 it equals verl's `vanilla`."""
    loss_mat, metrics = token_ratio_token_losses(old_log_prob, log_prob, advantages, response_mask,
                                                 clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
                                                 clip_ratio_c=clip_ratio_c)
    return agg_loss(loss_mat, response_mask, loss_agg_mode, batch_num_tokens, global_batch_size), metrics


def gspo_token_losses(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, *,
                      clip_ratio_low: float, clip_ratio_high: float) -> tuple[Tensor, dict]:
    """Per-token GSPO loss (B, T) in its token-gradient form s_{i,t} = sg[s_i] pi_t / sg[pi_t].

    s_i = exp(mean_{model tokens} log r_t) (length-normalised sequence ratio, GSPO Eq. 7), capped at e^10;
    value max(-A s_i, -A clip(s_i, 1-eps_low, 1+eps_high)) on every model token of row i; gradient
    -A s_i per token, so seq-mean-token-mean aggregation gives GSPO's gradient s_i A_i / |y_i| sum_t grad log pi_t.
    Per-token log ratios are not clamped before the mean (as verl's `gspo`).
    """
    _check_shapes(old_log_prob, log_prob, advantages, response_mask)
    mask = response_mask.bool()
    with torch.no_grad():
        adv = advantages.float()
        n = _count(mask).clamp(min=1).float()
        log_r = _masked_log_ratio(log_prob, old_log_prob, mask, clamp=False)
        metrics = _ratio_stats(mask, log_r, torch.cumsum(log_r, dim=-1), n)
        lengths = _count(mask, dim=-1).clamp(min=1)[:, None]  # |y_i|, (B, 1)
        log_s = log_r.sum(dim=-1, keepdim=True) / lengths  # (1/|y_i|) sum_t log r_t, (B, 1)
        del log_r
        s = log_s.clamp(max=LOG_WEIGHT_CAP).exp()  # s_i, (B, 1)
        s_clip = s.clamp(1 - clip_ratio_low, 1 + clip_ratio_high)
        below, above = s < s_clip, s > s_clip
        value, grad, capped = _surrogate(adv, s, s_clip, mask, log_s <= LOG_WEIGHT_CAP, None)
        metrics.update(_clip_stats(adv, mask, below, above, capped, n))
    return _attach_grad(log_prob, value, grad), metrics


def gspo_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, *,
              clip_ratio_low: float, clip_ratio_high: float, loss_agg_mode: str, batch_num_tokens=None,
              global_batch_size=None) -> tuple[Tensor, dict]:
    """GSPO loss (paper Eq. J_GSPO); equals verl's `gspo` on the same tensors and aggregation."""
    loss_mat, metrics = gspo_token_losses(old_log_prob, log_prob, advantages, response_mask,
                                          clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high)
    return agg_loss(loss_mat, response_mask, loss_agg_mode, batch_num_tokens, global_batch_size), metrics


def full_seq_token_losses(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, *,
                          clip_ratio_low: float, clip_ratio_high: float,
                          clip_ratio_c: Optional[float]) -> tuple[Tensor, dict]:
    """Per-token full-sequence-ratio loss (B, T): weight rho_seq = prod_{model t} r_t on every token of a row.

    Clip [1-eps_low, 1+eps_high] in ratio space, PPO dual clip -A c for A < 0 (optional); value capped at e^10;
    gradient -A rho_seq through the current token (the unbiased, high-variance estimator of Table 1).
    """
    _check_shapes(old_log_prob, log_prob, advantages, response_mask)
    mask = response_mask.bool()
    with torch.no_grad():
        adv = advantages.float()
        n = _count(mask).clamp(min=1).float()
        log_r = _masked_log_ratio(log_prob, old_log_prob, mask)
        metrics = _ratio_stats(mask, log_r, torch.cumsum(log_r, dim=-1), n)
        log_seq = log_r.sum(dim=-1, keepdim=True)  # log rho_seq = sum_t log r_t, (B, 1)
        del log_r
        w = log_seq.clamp(max=LOG_WEIGHT_CAP).exp()  # (B, 1)
        w_clip = w.clamp(1 - clip_ratio_low, 1 + clip_ratio_high)
        below, above = w < w_clip, w > w_clip
        cap = None if clip_ratio_c is None else torch.tensor(float(clip_ratio_c), device=w.device)
        value, grad, capped = _surrogate(adv, w, w_clip, mask, log_seq <= LOG_WEIGHT_CAP, cap)
        metrics.update(_clip_stats(adv, mask, below, above, capped, n))
    return _attach_grad(log_prob, value, grad), metrics


def full_seq_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, *,
                  clip_ratio_low: float, clip_ratio_high: float, clip_ratio_c: Optional[float], loss_agg_mode: str,
                  batch_num_tokens=None, global_batch_size=None) -> tuple[Tensor, dict]:
    """Full-sequence ratio loss (rho_seq = prod_t r_t, Sec. 2.2 / Table 1)."""
    loss_mat, metrics = full_seq_token_losses(old_log_prob, log_prob, advantages, response_mask,
                                              clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
                                              clip_ratio_c=clip_ratio_c)
    return agg_loss(loss_mat, response_mask, loss_agg_mode, batch_num_tokens, global_batch_size), metrics


# ----------------------------------------------------------------------------- advantages and dispatch


def group_advantages(rewards: Tensor, groups: Union[int, Tensor, Sequence], response_mask: Tensor,
                     norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO advantages A_i = (R_i - mean_group R) / (std_group R + eps), broadcast to model tokens.

    Args:
        rewards: (B,) scalar reward per response.
        groups: group size G (rows i*G .. i*G+G-1 share a prompt) or (B,) group ids of any hashable kind.
        response_mask: (B, T).
        norm_by_std: divide by the group's (unbiased) std; False = mean-centred only (Dr. GRPO).
    Returns: (B, T) fp32, A_i on model tokens and 0 elsewhere. A group of one response gets A = R (as verl:
    mean 0, std 1).
    """
    r = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1).cpu()
    b = r.shape[0]
    if response_mask.dim() != 2 or response_mask.shape[0] != b:
        raise ValueError(f"response_mask: expected shape ({b}, T) for {b} rewards, got {tuple(response_mask.shape)}")
    if isinstance(groups, int):
        if groups < 1 or b % groups != 0:
            raise ValueError(f"groups: group size {groups} must be >= 1 and divide the batch size {b}")
        ids = torch.arange(b) // groups
    else:
        labels = groups.tolist() if isinstance(groups, Tensor) else list(groups)
        if len(labels) != b:
            raise ValueError(f"groups: expected {b} group ids, got {len(labels)}")
        index = {}
        ids = torch.tensor([index.setdefault(g, len(index)) for g in labels], dtype=torch.long)
    n_groups = int(ids.max()) + 1 if b else 0
    count = torch.zeros(n_groups).index_add_(0, ids, torch.ones(b))
    mean = torch.zeros(n_groups).index_add_(0, ids, r) / count
    sq = torch.zeros(n_groups).index_add_(0, ids, (r - mean[ids]).square())
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    single = count == 1
    mean = torch.where(single, 0.0, mean)
    std = torch.where(single, 1.0, std)
    adv = r - mean[ids]
    if norm_by_std:
        adv = adv / (std[ids] + eps)
    return adv.to(response_mask.device)[:, None] * response_mask.float()


def compute_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                        cfg: LossConfig, rollout_is_weights: Optional[Tensor] = None, batch_num_tokens=None,
                        global_batch_size=None) -> tuple[Tensor, dict]:
    """Policy loss for `cfg.method` (a method of `ctpo.methods`), aggregated by cfg.loss_agg_mode.

    rollout_is_weights (B, T), optional, multiplies the per-token loss (rollout-vs-trainer correction, as verl).
    Returns (scalar loss, metrics with schema names).
    """
    loss_mat, metrics = policy_token_losses(old_log_prob, log_prob, advantages, response_mask, cfg)
    if rollout_is_weights is not None:
        loss_mat = loss_mat * rollout_is_weights.float()
    loss = agg_loss(loss_mat, response_mask, cfg.loss_agg_mode, batch_num_tokens, global_batch_size)
    return loss, metrics


def policy_token_losses(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                        cfg: LossConfig) -> tuple[Tensor, dict]:
    """Per-token loss (B, T) and metrics for `cfg.method` (shared by `compute_policy_loss` and the verl plugin):
    the method's token-loss function with its knobs from `cfg` (ctpo.methods; ValueError naming a bad key)."""
    method = methods.check_loss(cfg)
    knobs = {k: getattr(cfg, k) for k in method.knobs}
    return method.loss_fn()(old_log_prob, log_prob, advantages, response_mask, **knobs)
