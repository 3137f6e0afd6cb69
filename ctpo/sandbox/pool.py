"""Bounded concurrent execution: `SandboxPool` (reused across batches) and `run_many`.

Every execution is its own sandbox process tree (see runner.py), so a hostile program can only
hurt its own slot; the pool's threads just wait on it. Results come back in input order.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial

from ctpo.sandbox.runner import ExecResult, describe, isolation_mode, run_code


class SandboxPool:
    """At most `concurrency` sandboxes at once; the same limits for every call.

    >>> with SandboxPool(concurrency=4, timeout_s=5.0) as pool:
    ...     [r.stdout for r in pool.run_many(["print(1)", "print(2)"])]
    ['1\\n', '2\\n']
    """

    def __init__(
        self,
        concurrency: int = 8,
        timeout_s: float = 10.0,
        *,
        memory_mb: int = 2048,
        max_output_bytes: int = 1 << 20,
        allow_unisolated: bool = False,
        nproc: int = 256,
        nofile: int = 256,
        fsize_mb: int = 64,
        disk_mb: int = 256,
        isolation: str = "auto",
    ) -> None:
        if not (isinstance(concurrency, int) and concurrency > 0):
            raise ValueError(f"SandboxPool: concurrency must be a positive int, got {concurrency!r}")
        # Fail closed at construction, not halfway through a batch (raises SandboxUnavailable).
        self.mode = isolation_mode(allow_unisolated, isolation)
        self._run = partial(
            run_code, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
            allow_unisolated=allow_unisolated, nproc=nproc, nofile=nofile, fsize_mb=fsize_mb,
            disk_mb=disk_mb, isolation=self.mode,
        )
        self.concurrency = concurrency
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(concurrency, thread_name_prefix="sandbox")

    def describe(self) -> dict:
        """Isolation mode, limit mechanism (cgroup v2 or the namespace fallback) and visible packages."""
        return describe(self.mode)

    def run(self, code: str, timeout_s: float | None = None) -> ExecResult:
        """One execution through the pool (blocks until done). timeout_s overrides the pool's."""
        return self.run_many([code], timeout_s)[0]

    def run_many(self, codes: list[str], timeout_s: float | None = None) -> list[ExecResult]:
        """Execute every program, `concurrency` at a time; result i belongs to codes[i].

        timeout_s: this batch's wall-clock limit per program (None: the pool's)."""
        if not isinstance(codes, (list, tuple)):
            raise TypeError(f"run_many: codes must be a list of str, got {type(codes).__name__}")
        run = self._run if timeout_s is None else partial(self._run, timeout_s=timeout_s)
        return list(self._pool().map(run, codes))

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            raise RuntimeError("SandboxPool is closed")
        return self._executor

    def close(self) -> None:
        """Wait for running executions, then release the threads. Idempotent."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_many(
    codes: list[str],
    concurrency: int = 8,
    timeout_s: float = 10.0,
    *,
    memory_mb: int = 2048,
    max_output_bytes: int = 1 << 20,
    allow_unisolated: bool = False,
    nproc: int = 256,
    nofile: int = 256,
    fsize_mb: int = 64,
    disk_mb: int = 256,
    isolation: str = "auto",
) -> list[ExecResult]:
    """`run_code` over `codes` with at most `concurrency` at once; results in input order."""
    with SandboxPool(
        concurrency, timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
        allow_unisolated=allow_unisolated, nproc=nproc, nofile=nofile, fsize_mb=fsize_mb,
        disk_mb=disk_mb, isolation=isolation,
    ) as pool:
        return pool.run_many(codes)
