"""Generation throughput on the toy, vLLM's CPU build against HFGenerator, side by side in one run (the vLLM
test environment only: `make venv-vllm`; not part of `make bench`, which runs in the main venv).

    .venv-vllm/bin/python benchmarks/vllm_vs_hf.py --batch 16 --new 128 [--repeats 3] [--out F.json]

The toy for vLLM (configs/models/toy_vllm.yaml: hidden 64, 2 layers, 2 heads, head_dim 32), freshly
initialised and saved once; both generators sample the same prompts at T = 1 with no stop string, so each
row runs to `--new` tokens or to eos. One torch / OpenMP thread each (the suite's rule), vLLM with a 1 GiB
KV cache (ctpo.agent.vllm_generator.CPU_ENV), fp32 on both. vLLM's engine start is timed on its own; the
rates are the best of `--repeats` generate calls after one warm-up call each.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ctpo.agent import HFGenerator, SamplingParams, VLLMGenerator  # noqa: E402
from ctpo.agent.template import render_prompt  # noqa: E402
from ctpo.config import REPO_ROOT, ModelConfig  # noqa: E402
from ctpo.io import write_json  # noqa: E402
from ctpo.tokenizer import CharTokenizer  # noqa: E402
from ctpo.train.toy_model import build_toy_model, save_policy  # noqa: E402
from generation_timing import timed_generate, warm_up  # noqa: E402


def rate(generator, prompts, params, repeats: int) -> tuple[float, int, float]:
    """(best tokens/s, tokens of that call, its seconds) over `repeats` calls after one warm-up call."""
    warm_up(generator, prompts, [])
    best = (0.0, 0, 0.0)
    for r in range(repeats):
        _, dt, n = timed_generate(generator, prompts, SamplingParams(params.temperature, params.top_p,
                                                                     params.max_new_tokens,
                                                                     seed=params.seed + 1000 * r), [])
        best = max(best, (n / dt, n, dt))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = CharTokenizer()
    mcfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(REPO_ROOT / "configs/models/toy_vllm.yaml"))
    model = build_toy_model(OmegaConf.to_object(mcfg), tok, seed=0).eval()
    prompts = [tok.encode(render_prompt(f"Compute {i * 37 % 101}*{i + 3}.", "toy_tir")) for i in range(args.batch)]
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new, seed=123)
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy"
        save_policy(model, tok, policy)
        hf = rate(HFGenerator(model, tok), prompts, params, args.repeats)
        t0 = time.perf_counter()
        vllm = VLLMGenerator(str(policy), dtype="float32", max_model_len=mcfg.context_length, seed=0)
        start_s = time.perf_counter() - t0
        vl = rate(vllm, prompts, params, args.repeats)
    rows = {"hf": {"tokens_per_s": hf[0], "tokens": hf[1], "seconds": hf[2]},
            "vllm": {"tokens_per_s": vl[0], "tokens": vl[1], "seconds": vl[2], "engine_start_s": start_s}}
    for name, r in rows.items():
        print(f"{name:5s} {r['tokens']:5d} tokens in {r['seconds']:6.2f} s = {r['tokens_per_s']:8.1f} tok/s")
    res = {"batch": args.batch, "max_new_tokens": args.new, "rows": rows,
           "vllm_over_hf": vl[0] / hf[0], "load_average": os.getloadavg()}
    print(f"vLLM engine start {start_s:.1f} s; vLLM / HF = {res['vllm_over_hf']:.2f}x; "
          f"load average {' '.join(f'{x:.1f}' for x in res['load_average'])}")
    if args.out:
        write_json(args.out, res)


if __name__ == "__main__":
    main()
