"""From agent episodes to the padded tensors the loss sees, and the trainer-side log-probs.

Shapes: B = responses, L = longest prompt+response, T = longest response (observations included).
A response token j of row b is predicted by the logits at position `prompt_len[b] - 1 + j`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, L) long, prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, L) long
    logit_index: torch.Tensor  # (B, T) long, position whose logits predict response token j
    response_ids: torch.Tensor  # (B, T) long
    response_mask: torch.Tensor  # (B, T) float32, 1 = model-generated token, 0 = observation / padding
    rollout_log_prob: torch.Tensor  # (B, T) float32, log-probs reported by the generator (0 where unknown)

    def select(self, rows: torch.Tensor | slice) -> "PackedBatch":
        return PackedBatch(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


def pack_episodes(episodes, pad_id: int) -> PackedBatch:
    """Right-pad episodes (ctpo.agent Episode: prompt_ids, response_ids, response_mask,
    response_logprobs) into a PackedBatch."""
    B = len(episodes)
    if B == 0:
        raise ValueError("pack_episodes: no episodes")
    L = max(len(e.prompt_ids) + len(e.response_ids) for e in episodes)
    T = max(max(len(e.response_ids) for e in episodes), 1)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    logit_index = torch.zeros((B, T), dtype=torch.long)
    response_ids = torch.full((B, T), pad_id, dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.float32)
    rollout_lp = torch.zeros((B, T), dtype=torch.float32)
    for b, e in enumerate(episodes):
        p, r = len(e.prompt_ids), len(e.response_ids)
        if len(e.response_mask) != r:
            raise ValueError(f"episode {b}: response_mask has {len(e.response_mask)} entries for {r} response ids")
        input_ids[b, :p] = torch.as_tensor(list(e.prompt_ids), dtype=torch.long)
        input_ids[b, p : p + r] = torch.as_tensor(list(e.response_ids), dtype=torch.long)
        attention_mask[b, : p + r] = 1
        # padding positions point at the last real position; they are masked out anyway
        logit_index[b] = torch.clamp(torch.arange(T) + p - 1, max=p + r - 1)
        response_ids[b, :r] = input_ids[b, p : p + r]
        response_mask[b, :r] = torch.as_tensor(list(e.response_mask), dtype=torch.float32)
        if e.response_logprobs is not None and len(e.response_logprobs) == r:
            rollout_lp[b, :r] = torch.as_tensor(list(e.response_logprobs), dtype=torch.float32)
    return PackedBatch(input_ids, attention_mask, logit_index, response_ids, response_mask, rollout_lp)


def response_log_probs(model, batch: PackedBatch, temperature: float, with_entropy: bool):
    """Log-probs (B, T) of the response tokens under `model` at sampling `temperature` (as verl:
    logits / T), and the per-token entropy (B, T) of that distribution when `with_entropy`."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, L, V)
    V = logits.shape[-1]
    idx = batch.logit_index.unsqueeze(-1).expand(-1, -1, V)  # (B, T, V)
    logits = torch.gather(logits, 1, idx).float() / temperature  # (B, T, V)
    logp_all = torch.log_softmax(logits, dim=-1)
    log_prob = torch.gather(logp_all, 2, batch.response_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # (B, T)
    return log_prob, entropy
