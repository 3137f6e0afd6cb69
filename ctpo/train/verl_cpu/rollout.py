"""A transformers-generate rollout server for verl 0.9.1 on CPU (`actor_rollout_ref.rollout.name=hf`).

verl's agent loop talks to rollout servers through `RolloutReplicaRegistry` (the replica that launches a
server actor) and the worker-side adapter of `verl.workers.rollout.base._ROLLOUT_REGISTRY` (which pushes
the trainer's weights into it). vLLM needs a GPU; this is the same contract with `ctpo.agent.HFGenerator`
behind it, so the toy runs through verl's real trainer, agent loop and weight sync on a laptop:

  HFRolloutServer   Ray actor `hf_server_{replica}_{node}`: `generate(prompt_ids, sampling_params,
                    request_id) -> TokenOutput(token_ids, log_probs, extra_fields={"global_steps"})`;
                    concurrent requests are batched (same temperature / top_p / stop strings) and each
                    row is cut at its own max_tokens; sleep / wake / kv-cache controls are no-ops.
  HFReplica         launches the server (hybrid mode: beside the training workers, no extra resources).
  HFServerAdapter   worker side: `update_weights` sends the full state dict (rank 0) to the server.
Log-probs are those of the sampled token under softmax(logits / T), what verl's actor computes.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Generator, Optional

import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput

NAME = "hf"
logger = logging.getLogger(__name__)


def server_name(replica_rank: int, node_rank: int = 0) -> str:
    return f"{NAME}_server_{replica_rank}_{node_rank}"


class _Tok:
    """An HF tokenizer behind ctpo.tokenizer's decode interface (HFGenerator's stop-string check)."""

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _model_path(model_config) -> str:
    """`local_path` (HFModelConfig, set after a hub copy) or `path`; the replica passes verl's DictConfig."""
    for key in ("local_path", "path"):
        value = model_config.get(key) if hasattr(model_config, "get") else getattr(model_config, key, None)
        if value:
            return str(value)
    raise ValueError("rollout.name=hf: actor_rollout_ref.model.path is empty")


class HFRolloutServer:
    def __init__(self, config, model_config, replica_rank: int = 0, node_rank: int = 0, **_):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ctpo.agent.generation import HFGenerator

        path = _model_path(model_config)
        torch.set_num_threads(max(1, int(os.environ.get("CTPO_ROLLOUT_THREADS", "1"))))
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        self.model.eval()
        self.tokenizer = _Tok(AutoTokenizer.from_pretrained(path))
        self.generator = HFGenerator(self.model, self.tokenizer)
        self.seed = int(getattr(config, "seed", 0) or 0) * 1_000_003 + replica_rank
        self.calls = 0
        self.global_steps: Optional[int] = None
        self.pending: list = []
        self.lock = asyncio.Lock()

    async def generate(self, prompt_ids, sampling_params: dict, request_id: str, **_kwargs) -> TokenOutput:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((list(prompt_ids), dict(sampling_params), fut))
        async with self.lock:  # one batch at a time; whoever holds the lock serves everything pending
            if not fut.done():
                batch, self.pending = self.pending, []
                await asyncio.to_thread(self._serve, batch)
        return await fut

    def _serve(self, batch) -> None:
        from ctpo.agent.generation import SamplingParams

        groups: dict = {}
        for item in batch:
            sp = item[1]
            key = (float(sp.get("temperature", 1.0)), float(sp.get("top_p", 1.0)), tuple(sp.get("stop") or ()))
            groups.setdefault(key, []).append(item)
        for (temp, top_p, stop), items in groups.items():
            budgets = [int(sp.get("max_tokens") or sp.get("max_new_tokens") or 1) for _, sp, _ in items]
            self.calls += 1
            params = SamplingParams(temperature=temp, top_p=top_p, max_new_tokens=max(budgets),
                                    seed=self.seed + self.calls)
            try:
                outs = self.generator.generate([p for p, _, _ in items], params, list(stop))
            except Exception as e:  # hand the error to every waiting request
                for _, _, fut in items:
                    fut.get_loop().call_soon_threadsafe(fut.set_exception, e)
                continue
            for (_, _, fut), out, budget in zip(items, outs, budgets):
                res = TokenOutput(token_ids=out.token_ids[:budget], log_probs=out.log_probs[:budget],
                                  stop_reason="completed", extra_fields={"global_steps": self.global_steps})
                fut.get_loop().call_soon_threadsafe(fut.set_result, res)

    def update_weights(self, state: dict, global_steps: Optional[int] = None) -> int:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        real_missing = [k for k in missing if k != "lm_head.weight" or not self.model.config.tie_word_embeddings]
        if real_missing or unexpected:
            raise RuntimeError(f"hf rollout: weight update missing {real_missing[:5]}, unexpected {unexpected[:5]}")
        if global_steps is not None:
            self.global_steps = global_steps
        return len(state)

    async def set_global_steps(self, global_steps: int):
        self.global_steps = global_steps

    async def wake_up(self, tags: list[str] | None = None):
        pass

    async def sleep(self):
        pass

    async def clear_kv_cache(self):
        pass

    async def release_kv_cache(self):
        pass

    async def resume_kv_cache(self):
        pass

    async def wait_for_requests_to_drain(self):
        pass

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        return {"aborted_count": 0, "request_ids": []}

    async def resume_generation(self):
        pass

    async def start_profile(self, **kwargs):
        pass

    async def stop_profile(self):
        pass


class HFReplica(RolloutReplica):
    async def launch_servers(self):
        if self.world_size != 1 or self.nnodes != 1:
            raise ValueError(f"rollout.name={NAME}: one process per replica (tensor/data/pipeline parallel 1), "
                             f"got world size {self.world_size}")
        server = ray.remote(HFRolloutServer).options(
            name=server_name(self.replica_rank), num_cpus=0, max_concurrency=self.max_concurrency,
        ).remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"ray://{server_name(self.replica_rank)}"


class HFServerAdapter(BaseRollout):
    """Worker-side rollout of the hybrid engine: weights in, nothing else."""

    def __init__(self, config, model_config, device_mesh, *args, replica_rank: int = -1, **kwargs):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        self.replica_rank = rank if replica_rank == -1 else replica_rank  # one process per replica
        self.server_handle = None

    def _server(self):
        if self.server_handle is None:
            self.server_handle = ray.get_actor(server_name(self.replica_rank))
        return self.server_handle

    async def resume(self, tags: list[str]):
        pass

    async def release(self):
        pass

    @torch.no_grad()
    async def update_weights(self, weights: Generator[tuple[str, torch.Tensor], None, None], global_steps: int = None,
                             wire_format: str = "named_tensors", **kwargs):
        if wire_format != "named_tensors":
            raise ValueError(f"rollout.name={NAME}: wire_format must be named_tensors, got {wire_format!r}")
        state = {}
        for name, tensor in weights:
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            state[name] = tensor.detach().to("cpu", torch.float32).clone()
        await self._server().update_weights.remote(state, global_steps)
