"""Hardened sandbox for model-written Python: namespaces, read-only filesystem, no network, rlimits.

    from ctpo.sandbox import run_code, run_many, SandboxPool
    r = run_code("print(1 + 1)", timeout_s=10.0)   # ExecResult(stdout='2\\n', status='ok', ...)

Statuses: ok | error | timeout | memory | infra (infra = the sandbox failed; never the model's fault).
Fails closed: `SandboxUnavailable` when isolation is impossible, unless allow_unisolated=True.
"""
from ctpo.sandbox.pool import SandboxPool, run_many
from ctpo.sandbox.runner import ExecResult, SandboxUnavailable, isolation_mode, run_code

__all__ = ["ExecResult", "SandboxPool", "SandboxUnavailable", "isolation_mode", "run_code", "run_many"]
