"""VLLMGenerator's mapping of vLLM outputs onto GenOutput, with a stand-in `vllm` module (no GPU here):
token-id prompts, stop strings kept, per-row seeds, sampled-token log-probs, finish reasons."""
import os
import sys
import types
from dataclasses import dataclass

import pytest

from ctpo.agent import SamplingParams, VLLMGenerator


@dataclass
class _Logprob:
    logprob: float


class _FakeLLM:
    instances = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []
        _FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=False):
        self.calls.append((prompts, sampling_params))
        canned = [  # (token_ids, finish_reason, stop_reason)
            ([5, 6, 7], "stop", "\n```\n"),  # a stop string
            ([8, 2], "stop", None),  # eos
            ([9, 9, 9, 9], "length", None),
        ]
        outs = []
        for (ids, fr, sr), _ in zip(canned, prompts):
            lps = [{t: _Logprob(-0.1 * t), t + 1: _Logprob(-9.0)} for t in ids]
            comp = types.SimpleNamespace(token_ids=ids, logprobs=lps, finish_reason=fr, stop_reason=sr)
            outs.append(types.SimpleNamespace(outputs=[comp]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM = _FakeLLM
    vllm.SamplingParams = lambda **kw: kw
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: vllm.on_cpu)
    vllm.on_cpu = False  # a CUDA build
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    _FakeLLM.instances.clear()
    return vllm


def test_vllm_outputs_map_to_genoutputs(fake_vllm):
    g = VLLMGenerator("some/model", tp_size=2, dtype="bfloat16", max_model_len=4096, seed=7)
    llm = _FakeLLM.instances[0]
    assert llm.kwargs["tensor_parallel_size"] == 2 and llm.kwargs["logprobs_mode"] == "processed_logprobs"
    outs = g.generate([[1, 2], [3], [4, 4]], SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=64, seed=10),
                      ["\n```\n"])
    assert [o.finish_reason for o in outs] == ["stop", "eos", "length"]
    assert outs[0].token_ids == [5, 6, 7]
    assert outs[0].log_probs == pytest.approx([-0.5, -0.6, -0.7])  # the sampled token's entry, not the other
    prompts, sps = llm.calls[0]
    assert prompts == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}, {"prompt_token_ids": [4, 4]}]
    assert [sp["seed"] for sp in sps] == [10, 11, 12]
    assert sps[0]["stop"] == ["\n```\n"] and sps[0]["include_stop_str_in_output"] is True
    assert sps[0]["max_tokens"] == 64 and sps[0]["logprobs"] == 0 and sps[0]["temperature"] == 0.7


def test_on_cuda_the_engine_keeps_vllms_defaults(fake_vllm, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    VLLMGenerator("some/model")
    assert not {"enable_chunked_prefill", "enforce_eager"} & _FakeLLM.instances[0].kwargs.keys()
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ


def test_on_vllms_cpu_platform_prefills_are_whole_and_the_kv_cache_is_small(fake_vllm, monkeypatch):
    from ctpo.agent import vllm_generator

    fake_vllm.on_cpu = True
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # the caller's setting wins over the default
    VLLMGenerator("some/model", dtype="float32")
    kwargs = _FakeLLM.instances[0].kwargs
    assert kwargs["enable_chunked_prefill"] is False and kwargs["enforce_eager"] is True
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == vllm_generator.CPU_ENV["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_eval_backend_vllm_runs_on_vllms_cpu_platform_and_auto_stays_hf_there(fake_vllm, monkeypatch):
    from ctpo.eval import backend

    monkeypatch.setattr(backend, "cuda_available", lambda: False)
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: object())
    with pytest.raises(ValueError, match="not its CPU build"):
        backend.resolve_backend("vllm")
    fake_vllm.on_cpu = True
    assert backend.resolve_backend("vllm") == "vllm"
    assert backend.resolve_backend("auto") == "hf"  # a CPU machine keeps transformers unless asked
