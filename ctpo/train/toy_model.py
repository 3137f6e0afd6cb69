"""The toy policy: a tiny Qwen3-architecture causal LM built from a transformers `Qwen3Config`
(no hub download) over `ctpo.tokenizer.CharTokenizer`, and the helpers that save / load it in the
checkpoint contract's layout (`<dir>/` = HF `save_pretrained` + the tokenizer file; loaded back by
`ctpo.agent.load_policy`).
"""
from __future__ import annotations

from pathlib import Path

from ctpo.config import ModelConfig


def build_toy_model(cfg: ModelConfig, tokenizer, seed: int):
    """A freshly initialised Qwen3ForCausalLM sized by `cfg` (model.kind must be 'toy')."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if cfg.kind != "toy":
        raise ValueError(f"model.kind must be 'toy' for the local warm start, got '{cfg.kind}'")
    if cfg.hidden_size % cfg.num_attention_heads != 0:
        raise ValueError(
            f"model.hidden_size ({cfg.hidden_size}) must be divisible by model.num_attention_heads "
            f"({cfg.num_attention_heads})"
        )
    if cfg.num_attention_heads % cfg.num_key_value_heads != 0:
        raise ValueError(
            f"model.num_attention_heads ({cfg.num_attention_heads}) must be divisible by "
            f"model.num_key_value_heads ({cfg.num_key_value_heads})"
        )
    qcfg = Qwen3Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qcfg)
    return model.to(dtype=getattr(torch, cfg.dtype))


def save_policy(model, tokenizer, directory: str | Path) -> None:
    """Write `directory/` = HF weights + config + tokenizer, atomically (temp dir, then rename)."""
    from ctpo.io import atomic_dir

    with atomic_dir(directory) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save(tmp)

