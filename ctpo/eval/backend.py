"""Generation backends for evaluation and what identifies them in provenance.

`hf`: transformers on CPU (or one GPU) through `ctpo.agent.HFGenerator`; `vllm`: `ctpo.agent`'s
VLLMGenerator (imported lazily) on CUDA, or on vLLM's CPU platform (the vLLM test environment, `make
venv-vllm`). `auto` picks vllm when CUDA and vllm are both available (the toy; a CPU machine keeps hf);
the paper's evaluation asks for `vllm` (`ctpo.configure.eval_backend`) and fails in one line without it, never
falling back to HF generate inside a GPU job.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import os
import sys
from pathlib import Path

from ctpo.io import sha256_file

BACKENDS = ("auto", "hf", "vllm")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_backend(requested: str) -> str:
    """'hf' or 'vllm' for a requested backend; asking for vllm where it cannot run is an error."""
    if requested not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got '{requested}'")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if requested == "auto":
        return "vllm" if has_vllm and cuda_available() else "hf"
    if requested == "vllm" and not has_vllm:
        raise ValueError(f"--backend vllm: the vllm package is not installed in {sys.executable} (the GPU "
                         f"environment: pip install '.[gpu]'); not falling back to HF generate")
    if requested == "vllm" and not cuda_available() and not vllm_cpu_platform():
        import torch

        raise ValueError(f"--backend vllm: no CUDA device is visible (torch {torch.__version__}, CUDA build "
                         f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}) "
                         f"and the installed vllm is not its CPU build; not falling back to HF generate")
    return requested


def vllm_cpu_platform() -> bool:
    from ctpo.agent.vllm_generator import cpu_platform

    return cpu_platform()


def backend_version(backend: str) -> str | None:
    """Version of the package that generates: transformers (hf) or vllm."""
    try:
        return md.version("vllm" if backend == "vllm" else "transformers")
    except md.PackageNotFoundError:
        return None


def weights_sha256(checkpoint: str | Path) -> str | None:
    """sha256 over the weight files of a local checkpoint directory (name and content of each, sorted);
    None for a hub id or a directory without weight files."""
    p = Path(checkpoint)
    if not p.is_dir():
        return None
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(p).as_posix()}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def build_generator(backend: str, checkpoint: str, cfg):
    """(generator, tokenizer) for `checkpoint` (local policy dir or hub id). cfg: RunConfig."""
    if backend == "vllm":
        from ctpo.agent import VLLMGenerator
        from ctpo.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(checkpoint)
        generator = VLLMGenerator(
            checkpoint,
            tp_size=cfg.eval.tp_size,
            dtype=cfg.model.dtype,
            max_model_len=cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens,
            seed=cfg.seed,
        )
        return generator, tokenizer
    from ctpo.agent import HFGenerator, load_policy

    device = "cuda" if cuda_available() else "cpu"
    model, tokenizer = load_policy(checkpoint, device=device, dtype=cfg.model.dtype)
    return HFGenerator(model, tokenizer, device=device), tokenizer
