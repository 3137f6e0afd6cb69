"""Load a policy for generation: an HF directory saved by the trainer (checkpoint contract) or a hub id."""
from __future__ import annotations


def load_policy(path_or_id: str, device: str = "cpu", dtype: str = "float32"):
    """(model in eval mode on `device`, ctpo tokenizer). dtype: "float32" | "bfloat16" | "float16"."""
    import torch
    from transformers import AutoModelForCausalLM

    from ctpo.tokenizer import load_tokenizer

    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise ValueError(f"load_policy: dtype must name a torch dtype (e.g. float32, bfloat16), got '{dtype}'")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path_or_id), dtype=getattr(torch, dtype))
    except OSError as e:
        raise FileNotFoundError(f"{path_or_id}: not a loadable policy ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), load_tokenizer(path_or_id)
