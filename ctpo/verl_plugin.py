"""verl 0.9.1 adapter: registers every method of `ctpo.methods` as a verl policy loss.

Importing this module (verl does so for `actor_rollout_ref.model.external_lib=ctpo.verl_plugin`, and Hydra
does so when it instantiates `CTPOPolicyLossConfig`) adds each method's `loss_mode` (`ctpo`, `ctpo_fixed`,
`full_seq`, `verl_vanilla`, `verl_gspo`) to verl's `POLICY_LOSS_REGISTRY` with verl's exact `PolicyLossFn`
signature. `vanilla` (GRPO) and `gspo` stay verl's own; a method with `verl_wraps` (GRPO: `verl_vanilla`,
GSPO: `verl_gspo`) calls verl's own loss unchanged for the loss and its gradient and adds the `ctpo/*`
metrics, so every method reports one clip fraction (below).

Hyperparameters. A method's knobs that verl's actor config has (`ACTOR_KNOBS`: the ratio clip range and
dual clip, as for `vanilla`) are set there; the others live on a `PolicyLossConfig` subclass (verl's config
dataclasses are frozen and have no such fields), selected by overriding the node's `_target_`. Both are
derived from `ctpo.methods.KNOBS` (each knob's `verl` says where it sits):

    actor_rollout_ref.actor.policy_loss._target_=ctpo.verl_plugin.CTPOPolicyLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=ctpo
    +actor_rollout_ref.actor.policy_loss.eps_low=<configs/methods/ctpo.yaml: eps_low>   (each knob alike)

`verl_overrides(loss_cfg)` produces these strings from our `LossConfig`; `_loss_config` reads them back.

Losses come from `ctpo.losses.compute_policy_loss`: rollout IS weights multiply the per-token loss and verl's
own `agg_loss` aggregates with `config.global_batch_info`, exactly as verl's built-in losses do. Metrics: verl's
`actor/pg_clipfrac` (clipped branch active), `actor/pg_clipfrac_lower` (dual clip active), `actor/ppo_kl`,
plus the `ctpo/*` names of `ctpo.schema` (verl logs them as `actor/ctpo/*`) and per-micro-batch token sums
`ctpo/sum/*` from which `ctpo.train.verl_metrics` recovers exact step statistics; the std and max of a
micro-batch are not logged as such (verl would average them over micro-batches), see verl_metrics.
Figure 2 plots `ctpo/clip_frac_active`, verl's and the
release's `pg_clipfrac` quantity (clip active: A > 0 above, A < 0 below), as its clip fraction, and
`ctpo/clip_frac` (the method-specific ratio outside its clip range, either sign) beside it, for every method.

Rollout dumps for the diagnostics: each call hands its inputs to `ctpo.diagnostics.verl_dumps.record` (a no-op
unless the launcher set CTPO_DUMP_DIR; see that module for the step counting).
"""
from __future__ import annotations

from dataclasses import field, make_dataclass
from typing import Any, Optional

import torch
from verl.trainer.ppo import core_algos
from verl.workers.config import PolicyLossConfig

from ctpo import methods, schema
from ctpo.config import LossConfig
from ctpo.diagnostics import verl_dumps
from ctpo.losses import compute_policy_loss
from ctpo.metric_sums import NOT_AVERAGEABLE, loss_metric_sums

ACTOR_KNOBS = tuple(k.name for k in methods.KNOBS.values() if k.verl == "actor")  # knobs verl's ActorConfig holds
_NODE_KNOBS = tuple(k.name for k in methods.KNOBS.values() if k.verl == "policy_loss")  # on CTPOPolicyLossConfig
_PREFIX = "actor_rollout_ref.actor"
_LOSS_MODES: dict[str, methods.Method] = {}  # verl loss_mode -> our method, filled by register()

# verl's PolicyLossConfig plus the knobs of our methods that verl's actor config lacks (declared in
# ctpo.methods.KNOBS; values: configs/methods/). Null = not set; a method's own checks apply.
CTPOPolicyLossConfig = make_dataclass(
    "CTPOPolicyLossConfig", [(k, Optional[methods.KNOBS[k].type], field(default=None)) for k in _NODE_KNOBS],
    bases=(PolicyLossConfig,))
CTPOPolicyLossConfig.__module__ = __name__


def _node_knobs(method: methods.Method) -> tuple[str, ...]:
    """The method's knobs that sit on the policy_loss node."""
    return tuple(k for k in method.knobs if k in _NODE_KNOBS)


def _plain(x: Any) -> Any:
    """A knob value off verl's config as a plain Python value (lists come as ListConfig / tuples)."""
    if x is None or isinstance(x, (str, int, float)):
        return x
    return [float(v) for v in x]


def _loss_config(loss_mode: str, loss_agg_mode: str, config: Any) -> LossConfig:
    """Our LossConfig from verl's actor config (ActorConfig dataclass), checked as ctpo.methods.check_loss."""
    if config is None:
        raise ValueError(f"loss_mode={loss_mode}: verl passed no actor config")
    method = _LOSS_MODES[loss_mode]
    pl = config.policy_loss
    if _node_knobs(method) and not isinstance(pl, CTPOPolicyLossConfig):
        raise ValueError(
            f"{_PREFIX}.policy_loss._target_: loss_mode={loss_mode} needs "
            f"ctpo.verl_plugin.CTPOPolicyLossConfig (got {type(pl).__name__}); see ctpo.verl_plugin.verl_overrides"
        )
    node = {k: _plain(getattr(pl, k)) for k in _NODE_KNOBS} if isinstance(pl, CTPOPolicyLossConfig) else {}
    actor = {k: getattr(config, k) for k in method.knobs if k in ACTOR_KNOBS}
    cfg = LossConfig(method=method.name, loss_agg_mode=loss_agg_mode, **node, **actor)
    try:
        methods.check_loss(cfg)
    except ValueError as e:
        raise ValueError(f"{_PREFIX}.policy_loss (loss_mode={loss_mode}): {e}") from None
    return cfg


def _logged_metrics(metrics: dict, response_mask: torch.Tensor) -> dict:
    """The `ctpo/*` metrics of one micro-batch as verl may average them over micro-batches: the means, the
    max as a lower bound, and the token sums from which ctpo.train.verl_metrics recovers exact step values."""
    out = {k: v for k, v in metrics.items() if k not in NOT_AVERAGEABLE}
    out[schema.LOG_RATIO_ABS_MAX_LB] = metrics[schema.LOG_RATIO_ABS_MAX]  # verl averages it: a lower bound
    out.update(loss_metric_sums(metrics, response_mask))  # exact step statistics (verl_metrics)
    return out


def _verl_loss(loss_mode: str):
    """Our method's loss (ctpo.losses) under verl's `loss_mode`."""

    def loss_fn(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Optional[Any] = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = _loss_config(loss_mode, loss_agg_mode, config)
        verl_dumps.record(old_log_prob, log_prob, response_mask, advantages)  # no-op unless CTPO_DUMP_DIR is set
        loss, metrics = compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cfg,
                                            rollout_is_weights=rollout_is_weights, **config.global_batch_info)
        out = {
            "actor/pg_clipfrac": metrics[schema.CLIP_FRAC_LOW] + metrics[schema.CLIP_FRAC_HIGH],
            "actor/pg_clipfrac_lower": metrics[schema.DUAL_CLIP_FRAC],
            "actor/ppo_kl": -metrics[schema.LOG_RATIO_MEAN],
        }
        return loss, {**out, **_logged_metrics(metrics, response_mask)}

    loss_fn.__name__ = loss_fn.__qualname__ = f"ctpo_policy_loss_{loss_mode}"
    loss_fn.__doc__ = f"verl PolicyLossFn for loss_mode={loss_mode} (ctpo.losses.compute_policy_loss, verl agg_loss)."
    return loss_fn


def _verl_wrapped(name: str):
    """verl's own loss (`vanilla` / `gspo`) for value and gradient, plus our `ctpo/*` metrics on the same inputs."""
    method = _LOSS_MODES[name].name
    verl_name = _LOSS_MODES[name].verl_wraps
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
        cfg = _loss_config(name, loss_agg_mode, config)  # no rollout dump: Figure 1 diagnoses CTPO's rollouts
        loss, out = verl_fn(old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
                            response_mask=response_mask, loss_agg_mode=loss_agg_mode, config=config,
                            rollout_is_weights=rollout_is_weights)
        with torch.no_grad():
            _, metrics = compute_policy_loss(old_log_prob.detach(), log_prob.detach(), advantages, response_mask, cfg)
            logged = _logged_metrics(metrics, response_mask)  # as for our own losses: exact step statistics
        return loss, {**out, **logged}

    loss_fn.__name__ = loss_fn.__qualname__ = f"ctpo_policy_loss_{name}"
    loss_fn.__doc__ = (f"verl PolicyLossFn for loss_mode={name}: verl's own `{verl_name}` (loss and gradient "
                       f"unchanged) plus ctpo/* metrics of method {method}.")
    return loss_fn


def register() -> None:
    """Register every method's loss_mode; a name held by another module's function is an error, ours is replaced
    (re-import)."""
    registry = core_algos.POLICY_LOSS_REGISTRY
    _LOSS_MODES.clear()
    _LOSS_MODES.update({m.loss_mode: m for m in methods.all_methods()})
    for name, method in _LOSS_MODES.items():
        owner = getattr(registry[name], "__module__", "?") if name in registry else __name__
        if owner != __name__:
            raise RuntimeError(f"verl POLICY_LOSS_REGISTRY: '{name}' is already registered by {owner}."
                               f"{getattr(registry[name], '__qualname__', '?')}")
        fn = _verl_wrapped(name) if method.verl_wraps else _verl_loss(name)
        core_algos.register_policy_loss(name)(fn)  # replaces our own entry on re-import


def _fmt(x: Any) -> str:
    if x is None:
        return "null"
    if isinstance(x, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in x) + "]"
    return repr(float(x)) if isinstance(x, float) else str(x)


def verl_overrides(loss_cfg: LossConfig) -> list[str]:
    """Hydra override strings (for verl's `ppo_trainer` config) that select and parameterise `loss_cfg.method`."""
    method = methods.check_loss(loss_cfg)
    pl = f"{_PREFIX}.policy_loss"
    node = _node_knobs(method)
    out = [f"actor_rollout_ref.model.external_lib={__name__}"]  # every verl worker imports this module: the losses register
    if node:
        out.append(f"{pl}._target_={__name__}.{CTPOPolicyLossConfig.__name__}")
    out.append(f"{pl}.loss_mode={method.loss_mode}")
    for k in method.knobs:
        v = getattr(loss_cfg, k)
        if k in node:
            out.append(f"+{pl}.{k}={_fmt(v)}")
        elif v is None:  # verl's actor config has a number there, never "off"
            raise ValueError(f"loss.{k}: verl's {method.verl_wraps or method.loss_mode} loss always applies it "
                             f"(verl's actor config has no null {k}); set it in configs/methods/{method.name}.yaml")
        else:
            out.append(f"{_PREFIX}.{k}={_fmt(v)}")
    return [*out, f"{_PREFIX}.loss_agg_mode={loss_cfg.loss_agg_mode}"]


register()
