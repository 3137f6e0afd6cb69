"""The method registry and the loss knobs: one entry per policy-loss method, one declaration per knob.

A knob (`Knob`, in `KNOBS`) is a `loss.*` key a method's loss reads. It is declared here once, with its type,
whether null means "off", where it sits in verl's actor config and the check of its value; the rest is derived
from that declaration: `ctpo.config.LossConfig`'s fields, `ctpo.verl_plugin.CTPOPolicyLossConfig`'s fields and
`ACTOR_KNOBS`, the keys a method file may set (LossConfig is a structured config: another key fails naming
the file) and their validation (`check_loss`). Its values live in the method files,
`configs/methods/<name>.yaml`, and nowhere else.

A method (`Method`) says what a method *is*: its token-loss function and the knobs it reads. Readers:

    ctpo.config               validate_run_config: `check_loss` (known method, its knobs set, no foreign knob)
    ctpo.losses               compute_policy_loss: calls `token_losses(...)` with the method's knobs as keywords
    ctpo.verl_plugin          registers `verl_loss_mode` in verl's POLICY_LOSS_REGISTRY (wrapping `verl_wraps`),
                              builds the verl overrides and reads the knobs back from verl's config
    ctpo.reports.load         `display_name` in every table and figure
    ctpo.tracking             the W&B config holds `method`, `loss_agg_mode` and the method's `knobs` only

Adding a method: write its token-loss function (pure, `(old_log_prob, log_prob, advantages, response_mask, *,
knob, ...) -> (loss (B, T), metrics)`, its keyword arguments the method's knobs), `register(Method(...))`
below, and its method file. A knob no method had before: one `Knob(...)` in `KNOBS`.

No torch and no ctpo import here (reports and config read this module): token-loss functions are named
as "module:function" and imported on first use.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Union

COMMON_KEYS = ("method", "loss_agg_mode")  # loss.* keys every method has
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")  # loss.loss_agg_mode (verl's agg_loss)


@dataclass(frozen=True)
class Knob:
    """One loss knob. Its value is not here: it is in the method files of the methods that read it."""

    name: str  # the loss.* key, the token-loss keyword argument, the verl config field
    type: Any  # float | List[float]: the typed field (nullable) of LossConfig and CTPOPolicyLossConfig
    doc: str
    optional: bool = False  # null is a value (the term it sets is off); otherwise a method reading it needs one
    verl: str = "policy_loss"  # "actor": a field verl's ActorConfig has itself; "policy_loss": on our node
    expected: Optional[str] = None  # what a value must be, when `valid` says it is not
    valid: Optional[Callable[[Any], bool]] = None  # check of a set (non-null) value


def _bounds_ok(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and 0 < v[0] < 1 < v[1]


KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("clip_ratio_low", float, "token / sequence ratio clipped to [1 - low, 1 + high] (GRPO, GSPO, full_seq)",
         verl="actor"),
    Knob("clip_ratio_high", float, "the upper clip of that range", verl="actor"),
    Knob("clip_ratio_c", float, "PPO dual clip for A < 0: loss <= -A c (verl's clip_ratio_c); null = off",
         optional=True, verl="actor", expected="> 1 (verl's dual clip asserts it)", valid=lambda v: v > 1),
    Knob("eps_low", float, "CTPO (Sec. 3.3): log rho_cum clipped to [-eps_low t^power, eps_high t^power]"),
    Knob("eps_high", float, "the upper log-space bound's base"),
    Knob("power", float, "the bounds' exponent p (0.5: sqrt(t))"),
    Knob("dual_clip_c", float, "CTPO log-space dual clip: loss of A < 0 tokens <= -A exp(c t^power); null = off",
         optional=True),
    Knob("fixed_bounds", List[float], "ctpo_fixed: rho_cum clipped to [lo, hi] at every position",
         expected="[lo, hi] with 0 < lo < 1 < hi", valid=_bounds_ok),
    Knob("fixed_dual_clip", float, "ctpo_fixed: loss of A < 0 tokens <= -A c at every position (c >= hi); "
         "null = off", optional=True),
)}


@dataclass(frozen=True)
class Method:
    """One policy-loss method. Knob values are not here: they are in configs/methods/<name>.yaml."""

    name: str  # loss.method, and the method file's name
    display: str  # the name tables and figures print
    token_losses: Union[str, Callable]  # "module:function" or the function: per-token loss (B, T) and metrics
    knobs: tuple[str, ...]  # the loss.* keys (KNOBS) it reads = its token-loss function's keyword arguments
    verl_loss_mode: Optional[str] = None  # its name in verl's POLICY_LOSS_REGISTRY (None: `name`)
    verl_wraps: Optional[str] = None  # verl's own loss that gives value and gradient (we add the ctpo/* metrics)
    check: Optional[Callable[[Mapping], None]] = None  # checks across its knobs; ValueError naming the key

    def __post_init__(self) -> None:
        unknown = [k for k in self.knobs if k not in KNOBS]
        if unknown:
            raise ValueError(f"method {self.name}: knobs {unknown} are not declared in ctpo.methods.KNOBS")

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
    own checks, a knob's value check (`Knob.valid`), and a knob of another method set (it would be silently
    ignored). With `allow_none`, method null
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
        v, knob = loss.get(k), KNOBS[k]
        if v is None and not knob.optional:
            raise ValueError(f"loss.{k}: method {method.name} needs a value (configs/methods/{method.name}.yaml), "
                             "got null")
        if v is not None and knob.valid is not None and not knob.valid(v):
            raise ValueError(f"loss.{k}: expected {knob.expected}, got {v!r}")
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
    """Table 3's ablation is fixed at every position for both advantage signs: the position-scaled dual_clip_c
    is off, and the constant dual clip (if any) is no tighter than the upper bound (a cap below hi would zero
    A < 0 gradients inside the band). fixed_bounds itself is checked by its Knob."""
    fb, cap = loss.get("fixed_bounds"), loss.get("fixed_dual_clip")
    if loss.get("dual_clip_c") is not None:
        raise ValueError(f"loss.dual_clip_c: method ctpo_fixed must not scale its dual clip with position "
                         f"(got {loss['dual_clip_c']}); use loss.fixed_dual_clip, a constant ratio cap >= "
                         "fixed_bounds[1]")
    if cap is not None and cap < fb[1]:
        raise ValueError(f"loss.fixed_dual_clip: {cap} is tighter than the upper bound fixed_bounds[1] = {fb[1]}; "
                         "expected >= it")


_RATIO = ("clip_ratio_low", "clip_ratio_high")
register(Method("grpo", "GRPO", "ctpo.losses:token_ratio_token_losses", (*_RATIO, "clip_ratio_c"),
                verl_loss_mode="verl_vanilla", verl_wraps="vanilla"))
register(Method("gspo", "GSPO", "ctpo.losses:gspo_token_losses", _RATIO, verl_loss_mode="verl_gspo",
                verl_wraps="gspo"))
register(Method("ctpo", "CTPO", "ctpo.losses:ctpo_token_losses", ("eps_low", "eps_high", "power", "dual_clip_c")))
register(Method("ctpo_fixed", "CTPO (fixed clip)", "ctpo.losses:ctpo_fixed_token_losses",
                ("fixed_bounds", "fixed_dual_clip"), check=_check_fixed_ablation))
register(Method("full_seq", "Full-seq ratio", "ctpo.losses:full_seq_token_losses", (*_RATIO, "clip_ratio_c")))
