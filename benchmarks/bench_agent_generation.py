"""HFGenerator throughput on the toy policy: generated tokens/s, side by side in one run, of
  (a) HFGenerator (KV cache, finished rows pruned from the batch and cache),
  (b) HFGenerator(prune=False) (KV cache, finished rows kept in the batch),
  (c) a no-cache baseline (full forward over the whole sequence for every new token).
All three sample the same batch with the same seeds and stop strings.

    .venv/bin/python benchmarks/bench_agent_generation.py --batch 16 --new 96 [--out results/bench/agent_generation.json]

Target: (a) / (c) >= 2x; (a) >= (b) when rows finish at different lengths.
"""
from __future__ import annotations

import argparse

import torch

from ctpo.agent import HFGenerator, SamplingParams
from ctpo.agent.generation import FINISH_LENGTH, GenOutput, StopChecker
from ctpo.agent.template import load_template, render_prompt
from ctpo.config import ModelConfig
from ctpo.io import write_json
from ctpo.tokenizer import CharTokenizer
from ctpo.train.toy_model import build_toy_model
from generation_timing import timed_generate, warm_up


class NoCacheGenerator(HFGenerator):
    """Baseline: recompute the full (left-padded) batch at every step, no KV cache."""

    def generate(self, prompts, params, stop):
        gen = torch.Generator().manual_seed(int(params.seed))
        checker = StopChecker(self.tokenizer, stop)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        rows = [list(p) for p in prompts]
        out = [[] for _ in prompts]
        lps = [[] for _ in prompts]
        finish = [None] * len(prompts)
        with torch.no_grad():
            for step in range(params.max_new_tokens):
                L = max(len(r) for r in rows)
                ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])
                attn = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
                pos = (attn.cumsum(-1) - 1).clamp(min=0)
                logits = self.model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -1, :]
                tok, lp = self._sample(logits.float(), params, gen)
                for i, (t, l) in enumerate(zip(tok.tolist(), lp.tolist())):
                    rows[i].append(t)
                    if finish[i] is not None:
                        continue
                    out[i].append(t)
                    lps[i].append(l)
                    finish[i] = checker.finish_reason(out[i], eos, step + 1 == params.max_new_tokens)
                if all(f is not None for f in finish):
                    break
        return [GenOutput(o, l, f or FINISH_LENGTH) for o, l, f in zip(out, lps, finish)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = CharTokenizer()
    model = build_toy_model(ModelConfig(name="toy"), tok, seed=0).eval()  # configs/models/toy.yaml sizes
    prompts = [tok.encode(render_prompt(f"Compute {i * 37 % 101}*{i + 3}.", "toy_tir")) for i in range(args.batch)]
    stop = list(load_template("toy_tir").stop) + ["="]  # "=" makes rows end at different lengths
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new, seed=123)
    warm_up(HFGenerator(model, tok), prompts, stop)
    rows = {}
    for name, g in (("kv_pruned", HFGenerator(model, tok)), ("kv_unpruned", HFGenerator(model, tok, prune=False)),
                    ("no_cache", NoCacheGenerator(model, tok))):
        outs, dt, n = timed_generate(g, prompts, params, stop)
        rows[name] = {"seconds": dt, "tokens": n, "tokens_per_s": n / dt,
                      "lengths": sorted(len(o.token_ids) for o in outs)}
        print(f"{name:12s} {n:5d} tokens in {dt:6.2f} s = {n / dt:7.1f} tok/s")
    same = rows["kv_pruned"]["tokens"] == rows["no_cache"]["tokens"]
    res = {
        "batch": args.batch, "max_new_tokens": args.new, "rows": rows,
        "speedup_pruned_vs_no_cache": rows["kv_pruned"]["tokens_per_s"] / rows["no_cache"]["tokens_per_s"],
        "speedup_pruned_vs_unpruned": rows["kv_pruned"]["tokens_per_s"] / rows["kv_unpruned"]["tokens_per_s"],
        "same_token_count_as_baseline": same,
    }
    print(f"pruned / no-cache = {res['speedup_pruned_vs_no_cache']:.2f}x, "
          f"pruned / unpruned = {res['speedup_pruned_vs_unpruned']:.2f}x")
    if args.out:
        write_json(args.out, res)


if __name__ == "__main__":
    main()
