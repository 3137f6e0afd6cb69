"""Importance-ratio policy losses (paper Sec. 2-3): CTPO and the GRPO / GSPO / full-sequence baselines.

Every function is pure (tensors in, tensors out) and works on per-token tensors of shape (B, T): B responses,
T response positions. `response_mask` (B, T) is 1 (or True) for model-generated tokens and 0 for padding and
tool-observation tokens. Inputs may be bf16 / fp16; everything is computed in fp32.

Entry point: `compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cfg)` runs `cfg.method`'s
token loss (`ctpo.methods`) and aggregates it with verl's `agg_loss`. The CTPO ratio is `cumulative_log_ratio`.

Gradients are plain autograd, written as the authors' release and verl's `gspo` write them: a weight w_t whose
value is the method's ratio and whose gradient flows through the current token only,

    log w_t = sg[log w_t] + (log_prob_t - sg[log_prob_t])        (sg = stop-gradient, `.detach()`)

so d w_t / d log_prob_t = w_t, and the clipped surrogate's gradient is -A_t w_t where the unclipped branch is
taken, 0 otherwise (Proposition 1's estimator for CTPO). For GRPO w_t = r_t is its own per-token ratio.

Equations are cited by their order among the paper's display equations in Sec. 2-3 (the stored text,
/work/shared/paper, has lost the printed numbers, so these are counted, not copied): (3) J_GRPO, (4) r_{i,t},
(6) rho_seq, (7) rho_GSPO, (8) J_GSPO, (9) rho_cum, (10) Proposition 1, (18) eps(t) = eps t^p,
(19) the trust region [e^{-eps_low(t)}, e^{eps_high(t)}], (20) J_CTPO.

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
from typing import Optional, Sequence

import torch

from ctpo import methods, schema
from ctpo.config import LossConfig

LOG_RATIO_CLAMP = 20.0  # per-token |log r_t| clamp (verl, released CTPO)
LOG_WEIGHT_CAP = 10.0  # cumulative / sequence log-weight capped before exp (released CTPO, verl GSPO)

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- the ratios


def cumulative_log_ratio(log_prob: Tensor, old_log_prob: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """log rho_cum_t = sum_{t' <= t, model tokens} clamp(log pi_theta - log pi_old, -20, 20)   (Sec. 3.1, Eq. 9).

    Args: log_prob, old_log_prob (B, T); response_mask (B, T), 1 = model token.
    Returns: log_rho_cum (B, T) fp32 (differentiable in log_prob; 0 before the first model token and carried
    unchanged over tool tokens), t (B, T) fp32, the 1-based count of model tokens up to and including this
    one (0 where masked). Tool tokens neither add to the sum nor count as positions.
    """
    mask = response_mask.bool()
    lr = (log_prob.float() - old_log_prob.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # log r_t, Eq. 4
    lr = torch.where(mask, lr, 0.0)  # tool / padding tokens add nothing
    log_rho_cum = torch.cumsum(lr, dim=-1)  # log prod_{t'<=t} r_t'                                    Eq. 9
    t = torch.where(mask, torch.cumsum(mask.float(), dim=-1), 0.0)  # position among model tokens
    return log_rho_cum, t


def _current_token_grad(log_w: Tensor, log_prob: Tensor) -> Tensor:
    """sg[log_w] + (log_prob - sg[log_prob]): log_w's value, gradient 1 wrt the current token's log-prob only.
    log_w (B, T) or (B, 1); log_prob (B, T) fp32. The parenthesis is exactly 0, so the value is log_w's bit for bit."""
    return log_w.detach() + (log_prob - log_prob.detach())


# ----------------------------------------------------------------------------- the clipped surrogate


def _clipped_surrogate(adv: Tensor, w: Tensor, w_clip: Tensor, cap: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-token loss max(-A w, -A clip(w)), then min(., -A cap) where A < 0 (dual clip; None = off).

    As verl's `vanilla`: adv (B, T); w, w_clip (B, T) or (B, 1); cap (B, T), 0-d or None.
    Returns (loss (B, T), capped (B, T) bool: the dual clip binds)."""
    loss1 = -adv * w  # -A w                                                               Eq. 3 / 8 / 20
    loss2 = -adv * w_clip  # -A clip(w)
    loss = torch.maximum(loss1, loss2)  # -min(A w, A clip(w))
    if cap is None:
        return loss, torch.zeros_like(loss, dtype=torch.bool)
    loss3 = -adv * cap  # dual clip: the loss of an A < 0 token is at most -A cap
    capped = (adv < 0) & (loss > loss3)
    return torch.where(adv < 0, torch.minimum(loss, loss3), loss), capped


def _count(x: Tensor, dim: Optional[int] = None) -> Tensor:
    """Number of True entries (bool.sum() would first widen the whole tensor to int64)."""
    return torch.count_nonzero(x) if dim is None else torch.count_nonzero(x, dim=dim)


def _metrics(mask: Tensor, adv: Tensor, log_prob: Tensor, old_log_prob: Tensor, w: Tensor, w_clip: Tensor,
             capped: Tensor) -> dict:
    """The loss metrics (schema names -> 0-d fp32): log-ratio statistics over model tokens and the clip
    fractions of the module docstring. mask, adv, log_prob, old_log_prob, capped (B, T); w, w_clip (B, T) or
    (B, 1), the weight and its clipped value (out of band where they differ)."""
    with torch.no_grad():
        n = _count(mask).clamp(min=1).float()
        log_rho_cum, _ = cumulative_log_ratio(log_prob, old_log_prob, mask)
        log_r = torch.diff(log_rho_cum, dim=-1, prepend=torch.zeros_like(log_rho_cum[:, :1]))  # clamped, 0 if masked
        cum = torch.where(mask, log_rho_cum, 0.0)  # cumsum carries values onto masked slots
        mean_cum = cum.sum() / n
        below, above = (w < w_clip) & mask, (w > w_clip) & mask
        low, high = _count(below & (adv < 0)) / n, _count(above & (adv > 0)) / n
        return {
            schema.LOG_RATIO_MEAN: log_r.sum() / n,
            schema.LOG_RATIO_ABS_MAX: log_r.abs().max() if log_r.numel() else torch.zeros((), device=n.device),
            schema.LOG_RHO_CUM_MEAN: mean_cum,
            schema.LOG_RHO_CUM_STD: (torch.where(mask, cum - mean_cum, 0.0).square().sum() / n).sqrt(),
            schema.CLIP_FRAC: _count(below | above) / n,
            schema.CLIP_FRAC_LOW: low,
            schema.CLIP_FRAC_HIGH: high,
            schema.CLIP_FRAC_ACTIVE: low + high,
            schema.DUAL_CLIP_FRAC: _count(capped & mask) / n,
        }


def _check_shapes(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor) -> None:
    shape = log_prob.shape
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob: expected shape (B, T), got {tuple(shape)}")
    for name, x in (("old_log_prob", old_log_prob), ("advantages", advantages), ("response_mask", response_mask)):
        if x.shape != shape:
            raise ValueError(f"{name}: expected shape {tuple(shape)} like log_prob, got {tuple(x.shape)}")


def _finish(mask: Tensor, adv: Tensor, log_prob: Tensor, old_log_prob: Tensor, w: Tensor, w_clip: Tensor,
            cap: Optional[Tensor]) -> tuple[Tensor, dict]:
    """The clipped surrogate (B, T), 0 on masked tokens, and its metrics."""
    loss, capped = _clipped_surrogate(adv, w, w_clip, cap)
    return torch.where(mask, loss, 0.0), _metrics(mask, adv, log_prob, old_log_prob, w, w_clip, capped)


# ----------------------------------------------------------------------------- CTPO (Sec. 3)


def ctpo_token_losses(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, *,
                      eps_low: float, eps_high: float, power: float,
                      dual_clip_c: Optional[float]) -> tuple[Tensor, dict]:
    """Per-token CTPO loss (B, T) and metrics (paper Eq. 20, negated for minimisation):

        loss_t = max(-A_t rho_cum_t, -A_t clip(rho_cum_t, e^{-eps_low t^p}, e^{eps_high t^p}))
        loss_t = min(loss_t, -A_t e^{dual_clip_c t^p})   for A_t < 0   (the release's dual clip; None = off)

    Inputs (B, T); advantages broadcast per token as in verl. rho_cum's value is capped at e^10 (the release).
    Gradient: d loss_t / d log_prob_t = -A_t rho_cum_t where the unclipped branch is taken, else 0 (Prop. 1).
    Values: configs/methods/ctpo.yaml.
    """
    _check_shapes(old_log_prob, log_prob, advantages, response_mask)
    mask, lp, adv = response_mask.bool(), log_prob.float(), advantages.float()
    log_rho_cum, t = cumulative_log_ratio(lp.detach(), old_log_prob, mask)  # Eq. 9
    log_w = _current_token_grad(log_rho_cum, lp).clamp(max=LOG_WEIGHT_CAP)  # sg[log rho_cum] + lp - sg[lp], Eq. 10
    t_p = t.pow(power)  # t^p
    log_w_clip = torch.clamp(log_w, -eps_low * t_p, eps_high * t_p)  # log-space [-eps_low(t), eps_high(t)], Eq. 18-19
    cap = None if dual_clip_c is None else torch.exp(dual_clip_c * t_p)
    return _finish(mask, adv, lp, old_log_prob, torch.exp(log_w), torch.exp(log_w_clip), cap)


def ctpo_fixed_token_losses(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, *,
                            fixed_bounds: Sequence[float],
                            fixed_dual_clip: Optional[float]) -> tuple[Tensor, dict]:
    """Per-token loss (B, T) of Table 3's ablation: CTPO with rho_cum clipped to fixed_bounds [lo, hi] at every
    position (Eq. 20 with a constant trust region); for A < 0 the token loss is capped at -A fixed_dual_clip
    (a constant, no position scaling; None = off). Values: configs/methods/ctpo_fixed.yaml."""
    _check_shapes(old_log_prob, log_prob, advantages, response_mask)
    mask, lp, adv = response_mask.bool(), log_prob.float(), advantages.float()
    log_rho_cum, _ = cumulative_log_ratio(lp.detach(), old_log_prob, mask)  # Eq. 9
    log_w = _current_token_grad(log_rho_cum, lp).clamp(max=LOG_WEIGHT_CAP)  # Eq. 10
    log_w_clip = torch.clamp(log_w, math.log(fixed_bounds[0]), math.log(fixed_bounds[1]))  # rho_cum in [lo, hi]
    cap = None if fixed_dual_clip is None else torch.tensor(float(fixed_dual_clip), device=lp.device)
    return _finish(mask, adv, lp, old_log_prob, torch.exp(log_w), torch.exp(log_w_clip), cap)


# ----------------------------------------------------------------------------- baselines (Sec. 2)


def token_ratio_token_losses(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, *,
                             clip_ratio_low: float, clip_ratio_high: float,
                             clip_ratio_c: Optional[float]) -> tuple[Tensor, dict]:
    """Per-token PPO / GRPO loss (B, T) (Eq. 3): max(-A r_t, -A clip(r_t, 1-eps_low, 1+eps_high)), then the dual
    clip min(., -A c) for A < 0 (None = off). With clip_ratio_c set it is verl's `vanilla` token loss."""
    _check_shapes(old_log_prob, log_prob, advantages, response_mask)
    mask, lp, adv = response_mask.bool(), log_prob.float(), advantages.float()
    r = torch.exp((lp - old_log_prob.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # r_t, Eq. 4
    cap = None if clip_ratio_c is None else torch.tensor(float(clip_ratio_c), device=lp.device)
    return _finish(mask, adv, lp, old_log_prob, r, r.clamp(1 - clip_ratio_low, 1 + clip_ratio_high), cap)


def gspo_token_losses(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, *,
                      clip_ratio_low: float, clip_ratio_high: float) -> tuple[Tensor, dict]:
    """Per-token GSPO loss (B, T) in its token-gradient form s_{i,t} = sg[s_i] pi_t / sg[pi_t] (as verl's `gspo`).

    s_i = exp(mean_{model tokens} log r_t) (Eq. 7), capped at e^10; value max(-A s_i, -A clip(s_i, 1-eps_low,
    1+eps_high)) (Eq. 8) on every model token of row i; gradient -A s_i per token, so seq-mean-token-mean
    aggregation gives GSPO's gradient. Per-token log ratios are not clamped before the mean (as verl's `gspo`).
    """
    _check_shapes(old_log_prob, log_prob, advantages, response_mask)
    mask, lp, adv = response_mask.bool(), log_prob.float(), advantages.float()
    log_r = torch.where(mask, lp.detach() - old_log_prob.float(), 0.0)  # log r_t, (B, T)
    log_s = log_r.sum(-1, keepdim=True) / _count(mask, dim=-1).clamp(min=1)[:, None]  # log s_i, (B, 1), Eq. 7
    s = torch.exp(_current_token_grad(log_s, lp).clamp(max=LOG_WEIGHT_CAP))  # s_{i,t}, (B, T)
    return _finish(mask, adv, lp, old_log_prob, s, s.clamp(1 - clip_ratio_low, 1 + clip_ratio_high), None)


def full_seq_token_losses(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, *,
                          clip_ratio_low: float, clip_ratio_high: float,
                          clip_ratio_c: Optional[float]) -> tuple[Tensor, dict]:
    """Per-token full-sequence-ratio loss (B, T): weight rho_seq = prod_{model t} r_t (Eq. 6) on every token of a
    row, clipped to [1-eps_low, 1+eps_high], PPO dual clip -A c for A < 0 (None = off); value capped at e^10;
    gradient -A rho_seq through the current token (the unbiased, high-variance estimator of Table 1)."""
    _check_shapes(old_log_prob, log_prob, advantages, response_mask)
    mask, lp, adv = response_mask.bool(), log_prob.float(), advantages.float()
    log_rho_cum, _ = cumulative_log_ratio(lp.detach(), old_log_prob, mask)
    log_seq = log_rho_cum[:, -1:]  # log rho_seq = log rho_cum at the last position, (B, 1), Eq. 6
    w = torch.exp(_current_token_grad(log_seq, lp).clamp(max=LOG_WEIGHT_CAP))  # (B, T)
    cap = None if clip_ratio_c is None else torch.tensor(float(clip_ratio_c), device=lp.device)
    return _finish(mask, adv, lp, old_log_prob, w, w.clamp(1 - clip_ratio_low, 1 + clip_ratio_high), cap)


# ----------------------------------------------------------------------------- the entry point


def compute_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                        cfg: LossConfig, rollout_is_weights: Optional[Tensor] = None,
                        **global_batch_info) -> tuple[Tensor, dict]:
    """Policy loss of `cfg.method` (a method of `ctpo.methods`, its knobs from `cfg`), aggregated by
    cfg.loss_agg_mode with verl's `agg_loss`.

    old_log_prob, log_prob, advantages, response_mask: (B, T). rollout_is_weights (B, T), optional, multiplies
    the per-token loss (rollout-vs-trainer correction, as verl's losses). global_batch_info: verl's `agg_loss`
    keywords (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor), as verl's ActorConfig carries
    them. Where verl would divide by a zero count (an empty micro-batch: 0 / 0 = NaN), batch_num_tokens and
    global_batch_size default to the micro-batch's counts clamped at 1, so an empty batch gives loss 0.
    Returns (scalar loss, metrics: schema names -> 0-d tensors). ValueError naming a bad loss key or shape.
    """
    from verl.trainer.ppo.core_algos import agg_loss

    method = methods.check_loss(cfg)
    loss_mat, metrics = method.loss_fn()(old_log_prob, log_prob, advantages, response_mask,
                                         **{k: getattr(cfg, k) for k in method.knobs})
    if rollout_is_weights is not None:
        loss_mat = loss_mat * rollout_is_weights.float()
    mask = response_mask.bool()
    info = {"batch_num_tokens": _count(mask).clamp(min=1),
            "global_batch_size": _count(_count(mask, dim=-1)).clamp(min=1),
            **{k: v for k, v in global_batch_info.items() if v is not None}}
    return agg_loss(loss_mat=loss_mat, loss_mask=mask, loss_agg_mode=cfg.loss_agg_mode, **info), metrics
