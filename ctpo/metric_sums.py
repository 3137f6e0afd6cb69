"""Token sums of the loss metrics: what `ctpo.verl_plugin` logs per micro-batch so that
`ctpo.train.verl_metrics.exact_token_stats` can recover a step's exact token statistics from verl's
micro-batch means (the reason is in verl_metrics' docstring).

A neutral module: the plugin runs inside verl's workers and the launcher (ctpo.train) imports the plugin,
so the plugin may not import ctpo.train (tests/test_import_arrows.py). No torch import: the functions
take the tensors they are given.
"""
from __future__ import annotations

from ctpo import schema

SUM_PREFIX = "ctpo/sum/"
SUM_TOKENS = SUM_PREFIX + "tokens"  # model tokens of the micro-batch
SUM_LOG_RHO_CUM_SQ = SUM_PREFIX + "log_rho_cum_sq"  # sum over model tokens of log_rho_cum^2
# per-token means over model tokens (ctpo.losses: each is a count or sum / #model tokens)
TOKEN_MEAN_KEYS = (schema.CLIP_FRAC, schema.CLIP_FRAC_LOW, schema.CLIP_FRAC_HIGH, schema.CLIP_FRAC_ACTIVE,
                   schema.DUAL_CLIP_FRAC, schema.LOG_RATIO_MEAN, schema.LOG_RHO_CUM_MEAN)
# per-micro-batch values whose micro-batch mean would be misnamed: not logged as such (verl_metrics' doc)
NOT_AVERAGEABLE = (schema.LOG_RHO_CUM_STD, schema.LOG_RATIO_ABS_MAX)


def sum_key(key: str) -> str:
    """`ctpo/clip_frac` -> `ctpo/sum/clip_frac` (no 'min'/'max' in any: verl reduces such names by min/max)."""
    return SUM_PREFIX + key.split("/", 1)[1]


def loss_metric_sums(metrics: dict, response_mask) -> dict:
    """One micro-batch's loss metrics (ctpo.losses, 0-d tensors) as token sums; verl averages each over
    micro-batches, and `exact_token_stats` divides them back. response_mask: (B, T) model tokens."""
    tokens = response_mask.sum().float()
    n = tokens.clamp(min=1)  # ctpo.losses divides by the clamped count (0 / 1 = 0 for an empty micro-batch)
    out = {sum_key(k): metrics[k].detach().float() * n for k in TOKEN_MEAN_KEYS if k in metrics}
    mean, std = metrics[schema.LOG_RHO_CUM_MEAN].detach().float(), metrics[schema.LOG_RHO_CUM_STD].detach().float()
    out[SUM_LOG_RHO_CUM_SQ] = (std.square() + mean.square()) * n  # E[x^2] = Var + mean^2 within the micro-batch
    out[SUM_TOKENS] = tokens
    return out
