"""The method registry: one entry per policy-loss method, read by everything that depends on the method.

An entry (`Method`) says what a method *is*; its default knob values live in its method file,
`configs/methods/<name>.yaml`, and nowhere else. Readers:

    ctpo.config               validate_run_config: `check_loss` (known method, its knobs set, no foreign knob)
    ctpo.losses               policy_token_losses: calls `token_losses(...)` with the method's knobs as keywords
    ctpo.verl_plugin          registers `verl_loss_mode` in verl's POLICY_LOSS_REGISTRY (wrapping `verl_wraps`),
                              builds the verl overrides and reads the knobs back from verl's config
    ctpo.reports.load         `display_name` in every table and figure
    ctpo.tracking             the W&B config holds `method`, `loss_agg_mode` and the method's `knobs` only

Adding a method: write its token-loss function (pure, `(old_log_prob, log_prob, advantages, response_mask, *,
knob, ...) -> (loss (B, T), metrics)`, knobs keyword-only without defaults), `register(Method(...))` below,
and its method file. A knob no method had before also needs its typed field in `ctpo.config.LossConfig`
(and, if it is to reach verl's policy_loss node, in `ctpo.verl_plugin.CTPOPolicyLossConfig`).

No torch and no ctpo import here (reports and config read this module): token-loss functions are named
as "module:function" and imported on first use.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

COMMON_KEYS = ("method", "loss_agg_mode")  # loss.* keys every method has
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")  # loss.loss_agg_mode (ctpo.losses.agg_loss)


@dataclass(frozen=True)
class Method:
    """One policy-loss method. Knob values are not here: they are in configs/methods/<name>.yaml."""

    name: str  # loss.method, and the method file's name
    display: str  # the name tables and figures print
    token_losses: Union[str, Callable]  # "module:function" or the function: per-token loss (B, T) and metrics
    knobs: tuple[str, ...]  # the loss.* keys it reads = its token-loss function's keyword arguments
    optional: tuple[str, ...] = ()  # knobs that may be null (off); the others must be set
    verl_loss_mode: Optional[str] = None  # its name in verl's POLICY_LOSS_REGISTRY (None: `name`)
    verl_wraps: Optional[str] = None  # verl's own loss that gives value and gradient (we add the ctpo/* metrics)
    check: Optional[Callable[[Mapping], None]] = None  # checks across its knobs; ValueError naming the key

    def __post_init__(self) -> None:
        if not set(self.optional) <= set(self.knobs):
            raise ValueError(f"method {self.name}: optional {self.optional} must be among its knobs {self.knobs}")

    @property
    def loss_mode(self) -> str:
        """The verl loss_mode that runs this method."""
        return self.verl_loss_mode or self.name

    def loss_fn(self) -> Callable:
        """The token-loss function (imported on first use)."""
        if callable(self.token_losses):
            return self.token_losses
        module, _, attr = self.token_losses.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method`; a name already registered is an error (unregister it first)."""
    if method.name in _REGISTRY:
        raise ValueError(f"method '{method.name}' is already registered")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Method:
    """The registered method; ValueError naming loss.method otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"loss.method: expected one of {', '.join(names())}, got '{name}'")
    return _REGISTRY[name]


def all_methods() -> tuple[Method, ...]:
    return tuple(_REGISTRY.values())


def display_name(name: str) -> str:
    """The name reports print (the raw name for a method this checkout does not know)."""
    return _REGISTRY[name].display if name in _REGISTRY else name


def loss_keys(name: str) -> tuple[str, ...]:
    """The loss.* keys that apply to method `name` (what the W&B config logs); method and aggregation only for a
    method this checkout does not know."""
    return (*COMMON_KEYS, *_REGISTRY[name].knobs) if name in _REGISTRY else COMMON_KEYS


def knob_users(key: str) -> tuple[str, ...]:
    return tuple(m.name for m in _REGISTRY.values() if key in m.knobs)


def _as_mapping(loss: Any) -> Mapping:
    return loss if isinstance(loss, Mapping) else {f.name: getattr(loss, f.name) for f in dataclasses.fields(loss)}


def check_loss(loss: Any, allow_none: bool = False) -> Optional[Method]:
    """The loss config (a mapping or `ctpo.config.LossConfig`) against its method's entry; returns the entry.

    ValueError naming the key: an unknown method or aggregation, a knob the method needs left null, the method's
    own checks, and a knob of another method set (it would be silently ignored). With `allow_none`, method null
    with every key null is a config that trains no policy loss (the toy SFT warm start's); returns None."""
    loss = _as_mapping(loss)
    if allow_none and loss.get("method") is None:
        stray = [k for k, v in loss.items() if v is not None]
        if stray:
            raise ValueError(f"loss.{stray[0]}: set while loss.method is null (no policy loss); leave it null")
        return None
    method = get(loss.get("method"))
    if loss.get("loss_agg_mode") not in AGG_MODES:
        raise ValueError(f"loss.loss_agg_mode: expected one of {', '.join(AGG_MODES)}, "
                         f"got '{loss.get('loss_agg_mode')}'")
    for k in method.knobs:
        if k not in loss:
            raise ValueError(f"loss.{k}: method {method.name} reads it but the loss config has no such key "
                             "(add the typed field to ctpo.config.LossConfig)")
        if loss[k] is None and k not in method.optional:
            raise ValueError(f"loss.{k}: method {method.name} needs a value (configs/methods/{method.name}.yaml), "
                             "got null")
    if method.check is not None:
        method.check(loss)
    for k, v in loss.items():
        if k not in COMMON_KEYS and k not in method.knobs and v is not None:
            users = knob_users(k)
            raise ValueError(f"loss.{k}: only for method {', '.join(users) or '(none)'}, got {v!r} with method "
                             f"'{method.name}' (which reads {', '.join(method.knobs)}); leave it null")
    return method


# ----------------------------------------------------------------------------- the methods


def _check_fixed_ablation(loss: Mapping) -> None:
    """Table 3's ablation is fixed at every position for both advantage signs: fixed_bounds is [lo, hi] with
    0 < lo < 1 < hi, the position-scaled dual_clip_c is off, and the constant dual clip (if any) is no tighter
    than the upper bound (a cap below hi would zero A < 0 gradients inside the band)."""
    fb, cap = loss.get("fixed_bounds"), loss.get("fixed_dual_clip")
    if not fb or len(fb) != 2 or not 0 < fb[0] < 1 < fb[1]:
        raise ValueError(f"loss.fixed_bounds: method ctpo_fixed needs [lo, hi] with 0 < lo < 1 < hi, got {fb}")
    if loss.get("dual_clip_c") is not None:
        raise ValueError(f"loss.dual_clip_c: method ctpo_fixed must not scale its dual clip with position "
                         f"(got {loss['dual_clip_c']}); use loss.fixed_dual_clip, a constant ratio cap >= "
                         "fixed_bounds[1]")
    if cap is not None and cap < fb[1]:
        raise ValueError(f"loss.fixed_dual_clip: {cap} is tighter than the upper bound fixed_bounds[1] = {fb[1]}; "
                         "expected >= it")


_RATIO = ("clip_ratio_low", "clip_ratio_high")
register(Method("grpo", "GRPO", "ctpo.losses:token_ratio_token_losses", (*_RATIO, "clip_ratio_c"),
                optional=("clip_ratio_c",), verl_loss_mode="verl_vanilla", verl_wraps="vanilla"))
register(Method("gspo", "GSPO", "ctpo.losses:gspo_token_losses", _RATIO, verl_loss_mode="verl_gspo",
                verl_wraps="gspo"))
register(Method("ctpo", "CTPO", "ctpo.losses:ctpo_token_losses", ("eps_low", "eps_high", "power", "dual_clip_c"),
                optional=("dual_clip_c",)))
register(Method("ctpo_fixed", "CTPO (fixed clip)", "ctpo.losses:ctpo_fixed_token_losses",
                ("fixed_bounds", "fixed_dual_clip"), optional=("fixed_dual_clip",),
                check=_check_fixed_ablation))
register(Method("full_seq", "Full-seq ratio", "ctpo.losses:full_seq_token_losses", (*_RATIO, "clip_ratio_c"),
                optional=("clip_ratio_c",)))
