"""`SandboxLimits`: what one sandbox may use. The defaults live here and nowhere else; `run_code`,
`run_many` and `SandboxPool` take one `limits` value and pass it through."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one execution; every field must be > 0 (ValueError naming the field otherwise).

    timeout_s: wall clock; CPU time is limited to `cpu_s` = ceil(timeout_s) + 1 s.
    memory_mb: address space per process, and all of the sandbox's processes together (a cgroup's memory.max
      of memory_mb + disk_mb + the shm size; without one, their summed proportional set size).
    max_output_bytes: cap per stream (excess is read and dropped; `ExecResult.truncated` is set).
    sandbox_fds: open descriptors of all the sandbox's processes together (pipes and sockets hold kernel
      buffers; nofile alone is per process); enforced with memory_mb's budget where no cgroup is delegated.
    cpus: CPUs one sandbox may use (cgroup cpu.max, where a delegated cgroup offers the cpu controller).
    nproc / nofile / fsize_mb: rlimits. RLIMIT_NPROC counts per uid: in root mode each concurrent sandbox
      has a uid of its own (runner.SLOT_UID_BASE + slot); in userns mode the count is per user namespace.
    disk_mb: size of the private tmpfs work dir (in memory).
    """

    timeout_s: float = 10.0
    memory_mb: int = 2048
    max_output_bytes: int = 1 << 20
    nproc: int = 256
    nofile: int = 256
    fsize_mb: int = 64
    disk_mb: int = 256
    sandbox_fds: int = 1024
    cpus: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"SandboxLimits: {f.name} must be > 0, got {value!r}")
        object.__setattr__(self, "timeout_s", float(self.timeout_s))

    @property
    def cpu_s(self) -> int:
        """RLIMIT_CPU: the wall clock rounded up, plus one second."""
        return math.ceil(self.timeout_s) + 1

    def with_timeout(self, timeout_s: float | None) -> SandboxLimits:
        """These limits with another wall clock (None: unchanged)."""
        return self if timeout_s is None else replace(self, timeout_s=timeout_s)
