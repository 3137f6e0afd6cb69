"""Bounded concurrent execution: `SandboxPool` (reused across batches) and `run_many`.

Every execution is its own sandbox process tree (see runner.py), so a hostile program can only
hurt its own slot; the pool's threads just wait on it. Results come back in input order.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial

from ctpo.sandbox.limits import SandboxLimits
from ctpo.sandbox.runner import ExecResult, describe, isolation_mode, run_code


class SandboxPool:
    """At most `concurrency` sandboxes at once; the same `limits` for every call (a batch may change the timeout).

    >>> with SandboxPool(concurrency=4, limits=SandboxLimits(timeout_s=5.0)) as pool:
    ...     [r.stdout for r in pool.run_many(["print(1)", "print(2)"])]
    ['1\\n', '2\\n']
    """

    def __init__(self, concurrency: int = 8, limits: SandboxLimits = SandboxLimits(), *,
                 allow_unisolated: bool = False, isolation: str = "auto") -> None:
        if not (isinstance(concurrency, int) and concurrency > 0):
            raise ValueError(f"SandboxPool: concurrency must be a positive int, got {concurrency!r}")
        if not isinstance(limits, SandboxLimits):
            raise TypeError(f"SandboxPool: limits must be a SandboxLimits, got {type(limits).__name__}")
        # Fail closed at construction, not halfway through a batch (raises SandboxUnavailable).
        self.mode = isolation_mode(allow_unisolated, isolation)
        self.limits = limits
        self._run = partial(run_code, allow_unisolated=allow_unisolated, isolation=self.mode)
        self.concurrency = concurrency
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(concurrency, thread_name_prefix="sandbox")

    @classmethod
    def for_rollout(cls, rollout) -> SandboxPool:
        """The pool a run's `rollout` section (ctpo.config.RolloutConfig) asks for: `sandbox_concurrency`
        sandboxes at once, each with `sandbox_timeout_s` (the other limits: SandboxLimits' defaults)."""
        return cls(rollout.sandbox_concurrency, SandboxLimits(timeout_s=rollout.sandbox_timeout_s))

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
        run = partial(self._run, limits=self.limits.with_timeout(timeout_s))
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


def run_many(codes: list[str], concurrency: int = 8, limits: SandboxLimits = SandboxLimits(), *,
             allow_unisolated: bool = False, isolation: str = "auto") -> list[ExecResult]:
    """`run_code` over `codes` with at most `concurrency` at once; results in input order."""
    with SandboxPool(concurrency, limits, allow_unisolated=allow_unisolated, isolation=isolation) as pool:
        return pool.run_many(codes)
