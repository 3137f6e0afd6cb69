"""Forward + backward cost of the policy losses on one (B, T) batch on CPU: ours vs verl's `vanilla`.

    .venv/bin/python benchmarks/bench_losses.py [--batch 64] [--length 8192] [--repeats 9] [--threads 1]

Time: median wall time of `repeats` interleaved runs per loss (one warm-up each), forward + backward from
the per-token log-probs (B, T), fp32. Memory: peak bytes allocated by torch's CPU allocator during one
forward + backward, relative to the start of the call (inputs excluded, the (B, T) gradient included),
read from torch.profiler's allocation records (`profile_memory=True`: every allocation and free with its
size, summed in time order). Reported in units of one (B, T) fp32 tensor. Prints a markdown table; with
--json PATH also writes the figures (atomically).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctpo.config import method_loss  # noqa: E402
from ctpo.io import write_json  # noqa: E402
from ctpo.losses import compute_policy_loss  # noqa: E402


def make_batch(B: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 3
    olp = lp + 0.05 * torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 4, T + 1, (B, 1), generator=g)
    mask = torch.arange(T)[None, :] < lengths
    mask &= torch.rand(B, T, generator=g) > 0.1  # ~10% tool-observation tokens
    adv = torch.randn(B, 1, generator=g).expand(B, T) * mask
    return olp, lp, adv.contiguous(), mask


def candidates():
    """name -> fn(olp, lp, adv, mask) -> loss (scalar)."""
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
    from verl.workers.config import FSDPActorConfig

    ctpo_cfg, grpo_cfg = method_loss("ctpo"), method_loss("grpo")  # configs/methods/{ctpo,grpo}.yaml
    actor = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                            clip_ratio_low=grpo_cfg.clip_ratio_low, clip_ratio_high=grpo_cfg.clip_ratio_high,
                            clip_ratio_c=grpo_cfg.clip_ratio_c)
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from ctpo.verl_plugin import CTPOPolicyLossConfig  # importing registers `ctpo`

    plugin_actor = FSDPActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
        policy_loss=CTPOPolicyLossConfig(loss_mode="ctpo", eps_low=ctpo_cfg.eps_low, eps_high=ctpo_cfg.eps_high,
                                         power=ctpo_cfg.power, dual_clip_c=ctpo_cfg.dual_clip_c))
    plugin_fn = get_policy_loss_fn("ctpo")
    wrapped_fn = get_policy_loss_fn("verl_vanilla")  # verl's vanilla + our clip-fraction metrics (GRPO runs)
    return {
        "verl vanilla": lambda o, l, a, m: compute_policy_loss_vanilla(o, l, a, m, "token-mean", actor)[0],
        "ctpo compute_policy_loss (dual clip)": lambda o, l, a, m: compute_policy_loss(o, l, a, m, ctpo_cfg)[0],
        "ctpo via verl plugin": lambda o, l, a, m: plugin_fn(o, l, a, m, "token-mean", plugin_actor)[0],
        "ours grpo": lambda o, l, a, m: compute_policy_loss(o, l, a, m, grpo_cfg)[0],
        "verl_vanilla via plugin (+ metrics)": lambda o, l, a, m: wrapped_fn(o, l, a, m, "token-mean", actor)[0],
    }


def fwd_bwd(fn, olp, lp, adv, mask) -> None:
    x = lp.clone().requires_grad_()
    fn(olp, x, adv, mask).backward()


def peak_bytes(fn, olp, lp, adv, mask) -> int:
    """Peak allocator bytes during one forward + backward, from the profiler's allocation records."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fwd_bwd(fn, olp, lp, adv, mask)
    sizes = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    olp, lp, adv, mask = make_batch(args.batch, args.length)
    fns = candidates()
    times = {k: [] for k in fns}
    for fn in fns.values():
        fwd_bwd(fn, olp, lp, adv, mask)  # warm-up
    for _ in range(args.repeats):  # interleaved, so load from other processes hits every loss alike
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fwd_bwd(fn, olp, lp, adv, mask)
            times[name].append(time.perf_counter() - t0)
    unit = olp.numel() * 4  # one (B, T) fp32 tensor
    base = "verl vanilla"
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: peak_bytes(fn, olp, lp, adv, mask) / unit for k, fn in fns.items()}
    rows = {k: {"median_s": med[k], "time_ratio_vs_vanilla": med[k] / med[base], "peak_BT_tensors": mem[k],
                "extra_peak_vs_vanilla_BT": mem[k] - mem[base]} for k in fns}
    out = {"batch": args.batch, "length": args.length, "repeats": args.repeats, "threads": args.threads,
           "torch": torch.__version__, "machine": f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores visible", "results": rows}
    print(f"B={args.batch} T={args.length} fp32, {args.repeats} runs, {args.threads} thread(s), torch {torch.__version__}")
    print("| loss | median fwd+bwd (ms) | ratio vs verl vanilla | peak alloc ((B,T) tensors) | extra vs vanilla |")
    print("|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {1e3 * r['median_s']:.1f} | {r['time_ratio_vs_vanilla']:.2f} | {r['peak_BT_tensors']:.1f} | "
              f"{r['extra_peak_vs_vanilla_BT']:+.1f} |")
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
