"""Figure 1's two clip bands of an experiment, from one of two sources (checked with one-line errors):

    diagnostics.bands    explicit: {fixed: [lo, hi], adaptive: {eps_low, eps_high, power}} in the experiment file
    (else) the ablation  evaluation.table3_runs = [CTPO run, its fixed-clip twin]: the adaptive band is the first
                         run's resolved loss (eps_low, eps_high, power), the fixed band the second's fixed_bounds

`experiment_bands` runs at plan time (ctpo.configure.check_experiment, the workflow's parse); the workflow writes
its result to the layout's `bands_config` (results/{exp}/configs/figure1_bands.json, a params-triggered config
rule like the run configs), so editing a band's source reruns the diagnostics and Figure 1. `python -m
ctpo.diagnostics --bands` reads that file back (`read_bands`).
"""
from __future__ import annotations

from pathlib import Path

from ctpo.config import CONFIG_DIR, ConfigError, resolve_run
from ctpo.diagnostics.stream import ClipBands
from ctpo.io import read_json

ADAPTIVE_KNOBS = ("eps_low", "eps_high", "power")


def _checked(fixed, adaptive: dict, where: str) -> dict:
    """{"fixed_bounds": [lo, hi], "adaptive": {eps_low, eps_high, power}} after ClipBands' own checks."""
    try:
        ClipBands(float(fixed[0]), float(fixed[1]), *(float(adaptive[k]) for k in ADAPTIVE_KNOBS))
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise ConfigError(f"{where}: {e}") from None
    return {"fixed_bounds": [float(fixed[0]), float(fixed[1])],
            "adaptive": {k: float(adaptive[k]) for k in ADAPTIVE_KNOBS}}


def experiment_bands(experiment: dict, resolved: dict[tuple[str, int], dict]) -> dict:
    """Figure 1's bands of `experiment` ({"fixed_bounds", "adaptive", "source"}); `resolved` maps (run, seed) to
    resolved run configs (ctpo.configure.resolve_runs). ConfigError (one line naming the key) when the source
    does not give both bands."""
    explicit = experiment["diagnostics"].get("bands")
    if explicit is not None:
        b = explicit if isinstance(explicit, dict) else {}
        if set(b) != {"fixed", "adaptive"} or not isinstance(b["adaptive"], dict) \
                or set(b["adaptive"]) != set(ADAPTIVE_KNOBS):
            raise ConfigError(f"experiment diagnostics.bands: expected {{fixed: [lo, hi], adaptive: {{eps_low, "
                              f"eps_high, power}}}}, got {explicit!r}")
        return {**_checked(b["fixed"], b["adaptive"], "experiment diagnostics.bands"), "source": "diagnostics.bands"}
    pair = list(experiment["evaluation"]["table3_runs"])
    if len(pair) != 2:
        raise ConfigError(f"experiment evaluation.table3_runs: expected [adaptive_run, fixed_run] (Figure 1's bands "
                          f"come from them unless diagnostics.bands gives them), got {pair}")
    seed = int(experiment["seeds"][0])
    losses = []
    for i, run in enumerate(pair):
        if (run, seed) not in resolved:
            raise ConfigError(f"experiment evaluation.table3_runs[{i}]: unknown run '{run}'")
        losses.append(resolved[(run, seed)]["loss"])
    adaptive, fixed = losses
    if any(adaptive.get(k) is None for k in ADAPTIVE_KNOBS):
        raise ConfigError(f"experiment evaluation.table3_runs[0]: run '{pair[0]}' (method {adaptive['method']}) has no "
                          f"position-adaptive band (loss.eps_low, eps_high, power) for Figure 1; list the CTPO run "
                          f"first or give diagnostics.bands")
    if fixed.get("fixed_bounds") is None:
        raise ConfigError(f"experiment evaluation.table3_runs[1]: run '{pair[1]}' (method {fixed['method']}) has no "
                          f"fixed band (loss.fixed_bounds) for Figure 1; list the fixed-clip run second or give "
                          f"diagnostics.bands")
    return {**_checked(fixed["fixed_bounds"], adaptive, f"experiment runs.{pair[0]} / runs.{pair[1]} loss"),
            "source": f"evaluation.table3_runs {pair}"}


def plan_bands(experiment: dict, config_dir: Path = CONFIG_DIR) -> dict:
    """`experiment_bands` outside the workflow (reports, benchmarks, tests): the ablation pair resolved here."""
    seed = int(experiment["seeds"][0])
    pair = [] if experiment["diagnostics"].get("bands") is not None else experiment["evaluation"]["table3_runs"]
    resolved = {(r, seed): resolve_run(experiment, r, seed, config_dir) for r in pair if r in experiment["runs"]}
    return experiment_bands(experiment, resolved)


def clip_bands(bands: dict) -> ClipBands:
    """The ClipBands of an `experiment_bands` result."""
    lo, hi = bands["fixed_bounds"]
    return ClipBands(lo, hi, *(bands["adaptive"][k] for k in ADAPTIVE_KNOBS))


def read_bands(path: str | Path) -> ClipBands:
    """The bands file the workflow wrote (`experiment_bands`' result); ConfigError naming the file otherwise."""
    try:
        d = read_json(path)
        return clip_bands(_checked(d["fixed_bounds"], d["adaptive"], str(path)))
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: expected {{fixed_bounds: [lo, hi], adaptive: {{eps_low, eps_high, power}}}} "
                          f"({type(e).__name__}: {e})") from None
