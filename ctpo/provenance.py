"""Provenance recorded next to every run and result: code version, config hash, packages, hardware."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
import sys
from pathlib import Path

from ctpo.config import REPO_ROOT, canonical_json, config_hash

PACKAGES = ("ctpo", "torch", "transformers", "verl", "vllm", "numpy", "pandas", "math-verify", "wandb", "snakemake")


def git_state(repo: Path = REPO_ROOT) -> dict:
    """{'commit': sha or None, 'dirty': bool or None} without failing outside a git checkout."""
    def _git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions(names=PACKAGES) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> dict:
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
    }
    if "torch" in sys.modules:  # never import torch just for this (reports stay torch-free)
        torch = sys.modules["torch"]
        info["cuda_available"] = bool(torch.cuda.is_available())
        if info["cuda_available"]:
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def provenance(cfg: dict | None = None) -> dict:
    """Everything needed to tell two results apart. `cfg` is a resolved (plain) config dict."""
    from ctpo.sandbox import describe as sandbox_mechanism

    try:
        sandbox = sandbox_mechanism()  # which isolation/limit mechanism confines tool code on this host
    except Exception as e:  # recorded, never fatal: the sandbox itself fails closed when it is used
        sandbox = {"unavailable": f"{type(e).__name__}: {e}"}
    rec = {"git": git_state(), "packages": package_versions(), "hardware": hardware(), "argv": sys.argv,
           "sandbox": sandbox}
    if cfg is not None:
        rec["config"] = cfg
        rec["config_hash"] = config_hash(cfg)
        rec["config_json"] = canonical_json(cfg)
    return rec
