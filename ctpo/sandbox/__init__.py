"""Hardened sandbox for model-written Python: namespaces, its own minimal root filesystem, no network,
per-sandbox limits (cgroup v2 when delegated, else namespace limits), rlimits.

    from ctpo.sandbox import SandboxLimits, SandboxPool, run_code, run_many
    r = run_code("print(1 + 1)", SandboxLimits(timeout_s=10.0))   # ExecResult(stdout='2\\n', status='ok', ...)
    pool = SandboxPool.for_rollout(cfg.rollout)                     # a run's sandbox_concurrency / _timeout_s

Statuses: ok | error | timeout | memory | infra (infra = the sandbox failed; never the model's fault).
Fails closed: `SandboxUnavailable` when isolation is impossible, unless allow_unisolated=True.
`describe()` says which mechanism confines sandboxes here (recorded in every run's provenance).
"""
from ctpo.sandbox.limits import SandboxLimits
from ctpo.sandbox.pool import SandboxPool, run_many
from ctpo.sandbox.rootfs import SANDBOX_PACKAGES
from ctpo.sandbox.runner import ExecResult, SandboxUnavailable, describe, isolation_mode, run_code

__all__ = ["ExecResult", "SANDBOX_PACKAGES", "SandboxLimits", "SandboxPool", "SandboxUnavailable", "describe",
           "isolation_mode", "run_code", "run_many"]
