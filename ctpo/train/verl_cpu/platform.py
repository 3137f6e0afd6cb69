"""verl's device abstraction for a CPU-only machine (`VERL_PLATFORM=cpu`), registered in verl 0.9.1's
`PlatformRegistry`: torch.cpu as the device module, memory calls as no-ops, one logical "GPU" Ray resource
per training process (Ray's placement groups ask for "GPU"), `gloo` as the process-group backend."""
from __future__ import annotations

from contextlib import contextmanager
from types import ModuleType
from typing import Any, Optional

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

NAME = "cpu"


class _CPUDevice(ModuleType):
    """torch.cpu plus the few torch.cuda-style calls verl makes on the device module."""

    def __init__(self):
        super().__init__("ctpo_cpu_device")
        self.__dict__.update({k: getattr(torch.cpu, k) for k in dir(torch.cpu) if not k.startswith("__")})

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def get_device_name(*_a) -> str:
        return "CPU"  # verl's flops table has no entry: MFU is reported as 0

    @staticmethod
    def ipc_collect() -> None:
        pass

    @staticmethod
    def current_device():
        return torch.device("cpu")  # verl passes it to .to(device=...): an int would mean an accelerator

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(_index) -> None:
        pass

    @staticmethod
    def synchronize(_index=None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def memory_allocated(*_a, **_k) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    @staticmethod
    def mem_get_info(*_a, **_k) -> tuple[int, int]:
        import psutil

        vm = psutil.virtual_memory()
        return vm.available, vm.total

    @staticmethod
    def reset_peak_memory_stats(*_a, **_k) -> None:
        pass

    @staticmethod
    def get_rng_state(*_a, **_k):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *_a, **_k) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def current_stream(*_a, **_k):
        return torch.cpu.current_stream()

    @staticmethod
    def Stream(*_a, **_k):  # noqa: N802
        return torch.cpu.Stream()

    @staticmethod
    def stream(s=None):
        return torch.cpu.stream(s)


DEVICE = _CPUDevice()


@PlatformRegistry.register(platform=NAME)
class PlatformCPU(PlatformBase):
    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return DEVICE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        return False  # never auto-detected: only an explicit VERL_PLATFORM=cpu selects it

    def current_device(self):
        return torch.device("cpu")  # verl passes it to .to(device=...): an int would mean an accelerator

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: Optional[int] = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CTPO_CPU_VISIBLE_DEVICES"  # nothing to hide on a CPU; verl only sets / reads it

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"  # verl's placement groups ask for "GPU"; ray.init(resources/num_gpus) provides them

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def rollout_env_vars(self) -> dict[str, str]:
        return {}

    def get_collective_module(self) -> Any:
        return None

    def cudart(self) -> Any:
        return None
