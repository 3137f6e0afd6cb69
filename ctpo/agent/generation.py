"""Generators: token ids in, sampled token ids + their log-probs out, batched.

`HFGenerator` samples from a transformers causal LM on CPU (the toy) with a KV cache. Log-probs are
those of the sampled token under the temperature-scaled distribution `softmax(logits / T)` before
top-p truncation, i.e. what a trainer computes from `logits / T` (greedy, T = 0: `softmax(logits)`).
`VLLMGenerator` (GPU) lives in `ctpo.agent.vllm_generator` and imports vllm lazily.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

FINISH_STOP, FINISH_EOS, FINISH_LENGTH = "stop", "eos", "length"


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None  # seeds a torch.Generator (HF) / the per-request seed (vLLM)


@dataclass
class GenOutput:
    token_ids: list[int]  # exactly the sampled ids, the stop / eos token included
    log_probs: list[float]  # one per token id
    finish_reason: str  # "stop" (a stop string) | "eos" | "length"


class Generator(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams, stop: list[str]) -> list[GenOutput]:
        """One continuation per prompt. Generation of a row ends after the token that completes a stop
        string (kept), after the eos token (kept), or at `params.max_new_tokens`."""
        ...


class StopChecker:
    """Per-row stop-string detection on the decoded tail of the generated ids (window sized so a stop
    string spanning several tokens is still seen)."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.window = max((len(s) for s in self.stop), default=0) + 2

    def hit(self, generated: list[int]) -> bool:
        if not self.stop:
            return False
        tail = self.tokenizer.decode(generated[-self.window :])
        return any(s in tail for s in self.stop)

    def finish_reason(self, generated: list[int], eos: int, last_step: bool) -> str | None:
        """Why a row ends after its newest token `generated[-1]`: eos, a stop string, the token budget; else None."""
        if generated[-1] == eos:
            return FINISH_EOS
        if self.hit(generated):
            return FINISH_STOP
        return FINISH_LENGTH if last_step else None


class HFGenerator:
    """Batched sampling from a transformers causal LM with a KV cache (left-padded batch).

    model: a `transformers` causal LM (e.g. the toy Qwen3); tokenizer: `ctpo.tokenizer` interface."""

    def __init__(self, model, tokenizer, device: str = "cpu", prune: bool = True) -> None:
        """prune: drop finished rows from the batch and KV cache (False keeps computing them; for the
        benchmark's side-by-side comparison only)."""
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.prune = prune

    def generate(self, prompts: list[list[int]], params: SamplingParams, stop: list[str]) -> list[GenOutput]:
        import torch

        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("HFGenerator.generate: every prompt needs at least one token")
        if params.max_new_tokens <= 0:
            return [GenOutput([], [], FINISH_LENGTH) for _ in prompts]
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(int(params.seed))
        checker = StopChecker(self.tokenizer, stop)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        B, L = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((B, L), pad, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            input_ids[i, L - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[i, L - len(p) :] = 1
        input_ids, attn = input_ids.to(self.device), attn.to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, L)
        out_ids: list[list[int]] = [[] for _ in range(B)]
        out_lp: list[list[float]] = [[] for _ in range(B)]
        finish: list[str | None] = [None] * B
        active = list(range(B))  # original row of each batch position; finished rows are pruned
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True)
                past, logits = out.past_key_values, out.logits[:, -1, :]  # (b, V)
                next_pos = pos[:, -1:] + 1  # (b, 1)
                for step in range(params.max_new_tokens):
                    tok, lp = self._sample(logits.float(), params, gen)  # (b,), (b,)
                    for j, (t, l) in enumerate(zip(tok.tolist(), lp.tolist())):
                        i = active[j]
                        if finish[i] is not None:  # only when not pruning
                            continue
                        out_ids[i].append(t)
                        out_lp[i].append(l)
                        finish[i] = checker.finish_reason(out_ids[i], eos, step + 1 == params.max_new_tokens)
                    keep = [j for j, i in enumerate(active) if finish[i] is None]
                    if not keep:
                        break
                    if len(keep) < len(active) and self.prune:  # drop finished rows from the batch and cache
                        idx = torch.tensor(keep, device=tok.device)
                        past.batch_select_indices(idx)
                        tok, attn, next_pos = tok[idx], attn[idx], next_pos[idx]
                        active = [active[j] for j in keep]
                    b = len(active) if self.prune else B
                    attn = torch.cat([attn, torch.ones((b, 1), dtype=attn.dtype, device=attn.device)], dim=1)
                    out = self.model(
                        input_ids=tok.view(b, 1), attention_mask=attn, position_ids=next_pos,
                        past_key_values=past, use_cache=True,
                    )
                    past, logits = out.past_key_values, out.logits[:, -1, :]
                    next_pos = next_pos + 1
        finally:
            self.model.train(was_training)
        return [GenOutput(out_ids[i], out_lp[i], finish[i] or FINISH_LENGTH) for i in range(B)]

    @staticmethod
    def _sample(logits, params: SamplingParams, gen):
        """logits (B, V) -> sampled ids (B,), log-probs (B,) under softmax(logits / T) (T = 0: greedy)."""
        import torch

        if params.temperature <= 0:
            logp = torch.log_softmax(logits, dim=-1)
            tok = logp.argmax(dim=-1)
            return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
        logp = torch.log_softmax(logits / params.temperature, dim=-1)  # (B, V)
        probs = logp.exp()
        if params.top_p < 1.0:
            sp, idx = probs.sort(dim=-1, descending=True)
            keep = (sp.cumsum(-1) - sp) < params.top_p  # smallest prefix with mass >= top_p (>= 1 kept)
            sp = sp * keep
            filtered = torch.zeros_like(probs).scatter(-1, idx, sp)
            probs = filtered / filtered.sum(-1, keepdim=True)
        tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
