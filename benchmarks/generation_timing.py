"""Timing of generator calls, shared by the generation benchmarks (bench_agent_generation.py, vllm_vs_hf.py).

Not a benchmark itself (`run_all.py` runs `bench_*.py` only); imported from beside the scripts.
"""
from __future__ import annotations

import time

from ctpo.agent import SamplingParams


def warm_up(generator, prompts, stop) -> None:
    """One short call (2 prompts, 8 tokens) so that one-time costs stay out of the timed calls."""
    generator.generate(prompts[:2], SamplingParams(max_new_tokens=8, seed=0), stop)


def timed_generate(generator, prompts, params, stop) -> tuple[list, float, int]:
    """(outputs, seconds, generated tokens) of one `generator.generate(prompts, params, stop)` call."""
    t0 = time.perf_counter()
    outs = generator.generate(prompts, params, stop)
    dt = time.perf_counter() - t0
    return outs, dt, sum(len(o.token_ids) for o in outs)
