"""Registers the `cpu` platform, verl's FSDP engines for device `cpu` and the `hf` rollout in verl 0.9.1's
registries (see the package docstring). Imported by verl in every process (`VERL_USE_EXTERNAL_MODULES`)."""
from __future__ import annotations

from ctpo.train.verl_cpu import check_verl_version

ROLLOUT_NAME = "hf"  # ctpo.train.verl_cpu.rollout.NAME


def register() -> None:
    check_verl_version()
    from ctpo.train.verl_cpu import platform as _platform  # noqa: F401  (registers `cpu`, before any device query)

    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    engines = EngineRegistry._engines
    for model_type, cls in (("language_model", FSDPEngineWithLMHead), ("value_model", FSDPEngineWithValueHead)):
        for backend in ("fsdp", "fsdp2"):
            engines.setdefault(model_type, {}).setdefault(backend, {})["cpu"] = cls
    _register_rollout()
    _gloo_process_groups()


def _load_hf_replica():
    from ctpo.train.verl_cpu.rollout import HFReplica

    return HFReplica


def _register_rollout() -> None:
    """Lazily (a name and a loader): ctpo.train.verl_cpu.rollout imports verl, which imports this module."""
    from verl.workers.rollout import base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_hf_replica)
    base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = "ctpo.train.verl_cpu.rollout.HFServerAdapter"


def _gloo_process_groups() -> None:
    """verl builds the backend string `cpu:gloo,{device}:{backend}`; with device `cpu` that names cpu twice,
    which torch rejects. The cpu platform's workers get plain `gloo` (engine_workers calls the function it
    imported by name, so that reference is replaced too)."""
    import verl.utils.distributed as dist
    import verl.workers.engine_workers as ew

    original = getattr(dist.initialize_global_process_group_ray, "__wrapped__", dist.initialize_global_process_group_ray)

    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return original(timeout_second=timeout_second, backend=backend or "gloo")

    initialize_global_process_group_ray.__wrapped__ = original
    dist.initialize_global_process_group_ray = initialize_global_process_group_ray
    ew.initialize_global_process_group_ray = initialize_global_process_group_ray


register()
