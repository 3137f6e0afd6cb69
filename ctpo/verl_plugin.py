"""verl 0.9.1 adapter: registers `ctpo`, `ctpo_fixed`, `full_seq`, `verl_vanilla`, `verl_gspo` as verl policy losses.

Importing this module (verl does so for `actor_rollout_ref.model.external_lib=ctpo.verl_plugin`, and Hydra
does so when it instantiates `CTPOPolicyLossConfig`) adds these names to verl's `POLICY_LOSS_REGISTRY`
with verl's exact `PolicyLossFn` signature. `vanilla` (GRPO) and `gspo` stay verl's own; the GRPO and GSPO
runs use `verl_vanilla` / `verl_gspo`, which call verl's own `vanilla` / `gspo` unchanged for the loss and
its gradient and add the `ctpo/*` metrics, so every method reports one clip fraction (below).

Hyperparameters. verl's config dataclasses are frozen and `PolicyLossConfig` has no CTPO fields, so the
CTPO knobs live on a `PolicyLossConfig` subclass, selected by overriding the node's `_target_`:

    actor_rollout_ref.actor.policy_loss._target_=ctpo.verl_plugin.CTPOPolicyLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=ctpo
    +actor_rollout_ref.actor.policy_loss.eps_low=0.025   (eps_high, power, fixed_bounds, dual_clip_c,
                                                         fixed_dual_clip alike)

`verl_overrides(loss_cfg)` produces these strings from our `LossConfig`. The token/sequence-ratio clip
range (`clip_ratio_low/high/c`) stays on verl's actor config, as for `vanilla`.

Per-token losses come from `ctpo.losses`; rollout IS weights multiply them and verl's own `agg_loss`
aggregates with `config.global_batch_info`, exactly as verl's built-in losses do. Metrics: verl's
`actor/pg_clipfrac` (clipped branch active), `actor/pg_clipfrac_lower` (dual clip active), `actor/ppo_kl`,
plus the `ctpo/*` names of `ctpo.schema` (verl logs them as `actor/ctpo/*`) and per-micro-batch token sums
`ctpo/sum/*` from which `ctpo.train.verl_metrics` recovers exact step statistics; the std and max of a
micro-batch are not logged as such (verl would average them over micro-batches), see verl_metrics.
Figure 2 plots `ctpo/clip_frac`, the paper's definition (the
fraction of model tokens whose method-specific ratio is outside its clip range), for every method;
`ctpo/clip_frac_active` is verl's `pg_clipfrac` quantity (clip active: A > 0 above, A < 0 below) and stays
a separate metric.

Rollout dumps for the diagnostics: each call hands its inputs to `ctpo.diagnostics.verl_dumps.record` (a no-op
unless the launcher set CTPO_DUMP_DIR; see that module for the step counting).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from verl.trainer.ppo import core_algos
from verl.workers.config import PolicyLossConfig

from ctpo import schema
from ctpo.config import LossConfig
from ctpo.losses import policy_token_losses
from ctpo.diagnostics import verl_dumps
from ctpo.metric_sums import NOT_AVERAGEABLE, loss_metric_sums

REGISTERED = ("ctpo", "ctpo_fixed", "full_seq", "verl_vanilla", "verl_gspo")
# our registered name -> (verl's own loss it wraps, our method whose metrics it adds)
VERL_WRAPPED = {"verl_vanilla": ("vanilla", "grpo"), "verl_gspo": ("gspo", "gspo")}
_PREFIX = "actor_rollout_ref.actor"


@dataclass
class CTPOPolicyLossConfig(PolicyLossConfig):
    """verl's PolicyLossConfig plus the CTPO knobs (meanings and defaults: ctpo.config.LossConfig)."""

    eps_low: float = LossConfig.eps_low
    eps_high: float = LossConfig.eps_high
    power: float = LossConfig.power
    fixed_bounds: Optional[list[float]] = LossConfig.fixed_bounds
    dual_clip_c: Optional[float] = LossConfig.dual_clip_c
    fixed_dual_clip: Optional[float] = LossConfig.fixed_dual_clip


def _loss_config(method: str, loss_agg_mode: str, config: Any) -> LossConfig:
    """Our LossConfig from verl's actor config (ActorConfig dataclass)."""
    if config is None:
        raise ValueError(f"loss_mode={method}: verl passed no actor config")
    pl = config.policy_loss
    ratio = dict(clip_ratio_low=config.clip_ratio_low, clip_ratio_high=config.clip_ratio_high,
                 clip_ratio_c=config.clip_ratio_c)
    if method not in ("ctpo", "ctpo_fixed"):
        return LossConfig(method=method, loss_agg_mode=loss_agg_mode, **ratio)
    if not isinstance(pl, CTPOPolicyLossConfig):
        raise ValueError(
            f"{_PREFIX}.policy_loss._target_: loss_mode={method} needs "
            f"ctpo.verl_plugin.CTPOPolicyLossConfig (got {type(pl).__name__}); see ctpo.verl_plugin.verl_overrides"
        )
    fixed = None if pl.fixed_bounds is None else [float(x) for x in pl.fixed_bounds]
    if (method == "ctpo") != (fixed is None):
        raise ValueError(f"{_PREFIX}.policy_loss.fixed_bounds: must be null for loss_mode=ctpo and [lo, hi] for "
                         f"ctpo_fixed, got {fixed} with loss_mode={method}")
    return LossConfig(method=method, loss_agg_mode=loss_agg_mode, eps_low=pl.eps_low, eps_high=pl.eps_high,
                      power=pl.power, fixed_bounds=fixed, dual_clip_c=pl.dual_clip_c,
                      fixed_dual_clip=pl.fixed_dual_clip, **ratio)


def _verl_loss(method: str):
    def loss_fn(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Optional[Any] = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = _loss_config(method, loss_agg_mode, config)
        verl_dumps.record(old_log_prob, log_prob, response_mask, advantages)  # no-op unless CTPO_DUMP_DIR is set
        loss_mat, metrics = policy_token_losses(old_log_prob, log_prob, advantages, response_mask, cfg)
        if rollout_is_weights is not None:
            loss_mat = loss_mat * rollout_is_weights
        loss = core_algos.agg_loss(loss_mat=loss_mat, loss_mask=response_mask, loss_agg_mode=loss_agg_mode,
                                   **config.global_batch_info)
        out = {
            "actor/pg_clipfrac": metrics[schema.CLIP_FRAC_LOW] + metrics[schema.CLIP_FRAC_HIGH],
            "actor/pg_clipfrac_lower": metrics[schema.DUAL_CLIP_FRAC],
            "actor/ppo_kl": -metrics[schema.LOG_RATIO_MEAN],
        }
        out.update({k: v for k, v in metrics.items() if k not in NOT_AVERAGEABLE})
        out[schema.LOG_RATIO_ABS_MAX_LB] = metrics[schema.LOG_RATIO_ABS_MAX]  # verl averages it: a lower bound
        out.update(loss_metric_sums(metrics, response_mask))  # exact step statistics (verl_metrics)
        return loss, out

    loss_fn.__name__ = loss_fn.__qualname__ = f"ctpo_policy_loss_{method}"
    loss_fn.__doc__ = f"verl PolicyLossFn for loss_mode={method} (ctpo.losses.policy_token_losses + verl agg_loss)."
    return loss_fn


def _verl_wrapped(name: str):
    """verl's own loss (`vanilla` / `gspo`) for value and gradient, plus our `ctpo/*` metrics on the same inputs."""
    verl_name, method = VERL_WRAPPED[name]
    verl_fn = core_algos.POLICY_LOSS_REGISTRY[verl_name]

    def loss_fn(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Optional[Any] = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = _loss_config(method, loss_agg_mode, config)  # no rollout dump: Figure 1 diagnoses CTPO's rollouts
        loss, out = verl_fn(old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
                            response_mask=response_mask, loss_agg_mode=loss_agg_mode, config=config,
                            rollout_is_weights=rollout_is_weights)
        with torch.no_grad():
            _, metrics = policy_token_losses(old_log_prob.detach(), log_prob.detach(), advantages, response_mask, cfg)
        return loss, {**out, **metrics}

    loss_fn.__name__ = loss_fn.__qualname__ = f"ctpo_policy_loss_{name}"
    loss_fn.__doc__ = (f"verl PolicyLossFn for loss_mode={name}: verl's own `{verl_name}` (loss and gradient "
                       f"unchanged) plus ctpo/* metrics of method {method}.")
    return loss_fn


def register() -> None:
    """Register our losses; a name held by another module's function is an error, ours is replaced (re-import)."""
    registry = core_algos.POLICY_LOSS_REGISTRY
    for name in REGISTERED:
        owner = getattr(registry[name], "__module__", "?") if name in registry else __name__
        if owner != __name__:
            raise RuntimeError(f"verl POLICY_LOSS_REGISTRY: '{name}' is already registered by {owner}."
                               f"{getattr(registry[name], '__qualname__', '?')}")
        fn = _verl_wrapped(name) if name in VERL_WRAPPED else _verl_loss(name)
        core_algos.register_policy_loss(name)(fn)  # replaces our own entry on re-import


def _fmt(x: Any) -> str:
    if x is None:
        return "null"
    if isinstance(x, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in x) + "]"
    return repr(float(x)) if isinstance(x, float) else str(x)


def verl_overrides(loss_cfg: LossConfig) -> list[str]:
    """Hydra override strings (for verl's `ppo_trainer` config) that select and parameterise `loss_cfg.method`."""
    m = loss_cfg.method
    agg = [f"{_PREFIX}.loss_agg_mode={loss_cfg.loss_agg_mode}"]
    ratio = [f"{_PREFIX}.clip_ratio_low={_fmt(loss_cfg.clip_ratio_low)}",
             f"{_PREFIX}.clip_ratio_high={_fmt(loss_cfg.clip_ratio_high)}"]
    if m in ("grpo", "full_seq"):
        if loss_cfg.clip_ratio_c is None:
            raise ValueError(f"loss.clip_ratio_c: verl's {m} loss always applies the PPO dual clip; set it "
                             "(verl's default is 3.0)")
        ratio.append(f"{_PREFIX}.clip_ratio_c={_fmt(loss_cfg.clip_ratio_c)}")
    lib = ["actor_rollout_ref.model.external_lib=ctpo.verl_plugin"]
    if m == "grpo":  # verl's vanilla, plus the ctpo/* metrics (one clip-fraction definition for Figure 2)
        return [*lib, f"{_PREFIX}.policy_loss.loss_mode=verl_vanilla", *ratio, *agg]
    if m == "gspo":
        return [*lib, f"{_PREFIX}.policy_loss.loss_mode=verl_gspo", *ratio, *agg]
    if m == "full_seq":
        return [*lib, f"{_PREFIX}.policy_loss.loss_mode=full_seq", *ratio, *agg]
    if m in ("ctpo", "ctpo_fixed"):
        if m == "ctpo_fixed" and not loss_cfg.fixed_bounds:
            raise ValueError("loss.fixed_bounds: method ctpo_fixed needs [lo, hi]")
        fixed = loss_cfg.fixed_bounds if m == "ctpo_fixed" else None
        pl = f"{_PREFIX}.policy_loss"
        return [
            *lib,
            f"{pl}._target_={__name__}.{CTPOPolicyLossConfig.__name__}",
            f"{pl}.loss_mode={m}",
            f"+{pl}.eps_low={_fmt(loss_cfg.eps_low)}",
            f"+{pl}.eps_high={_fmt(loss_cfg.eps_high)}",
            f"+{pl}.power={_fmt(loss_cfg.power)}",
            f"+{pl}.fixed_bounds={_fmt(fixed)}",
            f"+{pl}.dual_clip_c={_fmt(loss_cfg.dual_clip_c)}",
            f"+{pl}.fixed_dual_clip={_fmt(loss_cfg.fixed_dual_clip)}",
            *agg,
        ]
    raise ValueError(f"loss.method: expected one of grpo, gspo, ctpo, ctpo_fixed, full_seq, got '{m}'")


register()
