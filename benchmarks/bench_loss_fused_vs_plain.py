"""Does the policy loss's implementation matter next to the model's log-softmax? The old fused CTPO loss (a
hand-derived gradient attached by a custom autograd node, buffers reused in place; `ctpo/losses.py` at
`--old-ref`) against today's plain-autograd CTPO loss, side by side in one process (issue 23, item 2).

    .venv/bin/python benchmarks/bench_loss_fused_vs_plain.py [--length 8192] [--vocab 151936] [--repeats 5]

One training micro-batch at the paper's shape: one response of `length` tokens (the release trains one response
per micro-batch) and Qwen3's vocabulary (`vocab`). A step is what the actor does around the loss:
  1. forward: log_prob (1, T) = log_softmax(logits)[token] from bf16 logits (T, V), in chunks of `chunk` rows;
  2. the CTPO loss (configs/methods/ctpo.yaml) forward + backward to d loss / d log_prob;
  3. backward through the log-softmax into the logits, chunk by chunk (each chunk's log-softmax recomputed with
     autograd, as activation checkpointing does: the full (T, V) graph would not fit a shared laptop).
Time: median wall time of `repeats` interleaved steps per loss (one warm-up each), and the loss's own
forward + backward time within the step. Memory: peak bytes allocated by torch's CPU allocator during one
step (torch.profiler allocation records, as benchmarks/bench_losses.py), and the loss alone on the same
inputs. Prints a markdown table; with --json PATH also writes the figures (atomically).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_losses import peak_bytes  # noqa: E402
from ctpo.config import method_loss  # noqa: E402
from ctpo.io import write_json  # noqa: E402
from ctpo.losses import compute_policy_loss  # noqa: E402

OLD_REF = "8bf8571"  # the last commit whose ctpo/losses.py has the fused loss (_AttachGrad, _surrogate)


def old_losses(ref: str):
    """ctpo/losses.py at git `ref`, imported as its own module (it imports today's ctpo.methods / ctpo.config)."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:ctpo/losses.py"], check=True,
                         capture_output=True, text=True).stdout
    if "_AttachGrad" not in src:
        raise SystemExit(f"--old-ref {ref}: its ctpo/losses.py has no fused loss (_AttachGrad)")
    spec = importlib.util.spec_from_loader("ctpo_losses_fused", loader=None)
    mod = importlib.util.module_from_spec(spec)
    exec(compile(src, f"{ref}:ctpo/losses.py", "exec"), mod.__dict__)
    return mod


def make_inputs(T: int, V: int, seed: int = 0):
    """bf16 logits (T, V), sampled tokens (T,), old log-probs near the current ones, advantages, mask (1, T)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.empty(T, V, dtype=torch.bfloat16)
    for s in range(0, T, 256):  # drawn in fp32 chunks: a (T, V) fp32 draw would be 5 GB at the paper's shape
        logits[s:s + 256] = torch.randn(min(256, T - s), V, generator=g) * 2
    tokens = torch.randint(0, V, (T,), generator=g)
    with torch.no_grad():
        lp = log_probs(logits, tokens, chunk=1024)
    olp = lp + 0.05 * torch.randn(1, T, generator=g)
    mask = torch.rand(1, T, generator=g) > 0.1  # ~10% tool-observation tokens
    adv = torch.full((1, T), 0.7) * mask
    return logits, tokens, olp, adv, mask


def log_probs(logits, tokens, chunk: int):
    """(1, T) fp32 log-probs of `tokens` under log_softmax(logits) (computed in fp32 per chunk)."""
    out = [torch.log_softmax(logits[s:s + chunk].float(), dim=-1).gather(-1, tokens[s:s + chunk, None])[:, 0]
           for s in range(0, logits.shape[0], chunk)]
    return torch.cat(out)[None]


def step(loss_fn, logits, tokens, olp, adv, mask, chunk: int) -> float:
    """One actor micro-batch step (module docstring); returns the loss's own forward + backward seconds."""
    x = logits.detach().requires_grad_()
    with torch.no_grad():
        lp = log_probs(x, tokens, chunk)
    lp.requires_grad_()
    t0 = time.perf_counter()
    loss = loss_fn(olp, lp, adv, mask)
    loss.backward()
    t_loss = time.perf_counter() - t0
    for s in range(0, x.shape[0], chunk):  # backward through the log-softmax, chunk by chunk
        part = log_probs(x[s:s + chunk], tokens[s:s + chunk], chunk)
        part.backward(lp.grad[:, s:s + chunk])
    return t_loss


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151936)  # Qwen3's vocabulary
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--old-ref", default=OLD_REF)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    old = old_losses(args.old_ref)
    cfg = method_loss("ctpo")
    knobs = dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, power=cfg.power, dual_clip_c=cfg.dual_clip_c)
    fns = {
        "fused (old)": lambda o, lp, a, m: old.ctpo_loss(o, lp, a, m, **knobs, loss_agg_mode=cfg.loss_agg_mode)[0],
        "plain autograd (now)": lambda o, lp, a, m: compute_policy_loss(o, lp, a, m, cfg)[0],
    }
    logits, tokens, olp, adv, mask = make_inputs(args.length, args.vocab)
    # the two compute the same loss and gradient on these inputs
    grads = {}
    for name, fn in fns.items():
        x = olp.clone().add_(0.01).requires_grad_()
        fn(olp, x, adv, mask).backward()
        grads[name] = x.grad
    max_grad_diff = float((grads["fused (old)"] - grads["plain autograd (now)"]).abs().max())
    step_s = {k: [] for k in fns}
    loss_s = {k: [] for k in fns}
    for fn in fns.values():
        step(fn, logits, tokens, olp, adv, mask, args.chunk)  # warm-up
    for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
        for name, fn in fns.items():
            t0 = time.perf_counter()
            loss_s[name].append(step(fn, logits, tokens, olp, adv, mask, args.chunk))
            step_s[name].append(time.perf_counter() - t0)
    step_peak = {k: peak_bytes(lambda o, lp, a, m, fn=fn: _StepAsLoss(fn, logits, tokens, args.chunk)(o, a, m),
                               olp, olp, adv, mask) for k, fn in fns.items()}
    loss_peak = {k: peak_bytes(fn, olp, olp, adv, mask) for k, fn in fns.items()}
    base = "fused (old)"
    rows = {}
    for k in fns:
        med_step, med_loss = statistics.median(step_s[k]), statistics.median(loss_s[k])
        rows[k] = {"step_median_s": med_step, "loss_median_s": med_loss, "loss_share_of_step": med_loss / med_step,
                   "step_time_vs_fused": med_step / statistics.median(step_s[base]),
                   "loss_time_vs_fused": med_loss / statistics.median(loss_s[base]),
                   "step_peak_bytes": step_peak[k], "step_peak_vs_fused": step_peak[k] / step_peak[base],
                   "loss_peak_bytes": loss_peak[k], "loss_peak_vs_fused": loss_peak[k] / loss_peak[base]}
    out = {"length": args.length, "vocab": args.vocab, "chunk": args.chunk, "repeats": args.repeats,
           "threads": args.threads, "old_ref": args.old_ref, "max_abs_grad_diff": max_grad_diff,
           "torch": torch.__version__, "machine": f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores visible, load average {os.getloadavg()[0]:.1f}", "results": rows}
    print(f"T={args.length} V={args.vocab} bf16 logits, {args.repeats} interleaved steps, {args.threads} thread(s), "
          f"torch {torch.__version__}; max |grad difference| {max_grad_diff:.2g}")
    print("| CTPO loss | step median (s) | loss fwd+bwd (ms) | loss share of step | step time vs fused | "
          "step peak (MiB) | step peak vs fused | loss peak (KiB) | loss peak vs fused |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['step_median_s']:.2f} | {1e3 * r['loss_median_s']:.2f} | {100 * r['loss_share_of_step']:.4f}% "
              f"| {r['step_time_vs_fused']:.3f} | {r['step_peak_bytes'] / 2**20:.0f} | {r['step_peak_vs_fused']:.4f} "
              f"| {r['loss_peak_bytes'] / 2**10:.0f} | {r['loss_peak_vs_fused']:.2f} |")
    if args.json:
        write_json(args.json, out)
    return out


class _StepAsLoss:
    """A whole step in `peak_bytes`' (olp, lp, adv, mask) -> loss shape: returns a zero scalar whose backward
    is a no-op (the step has done its own backward)."""

    def __init__(self, fn, logits, tokens, chunk):
        self.fn, self.logits, self.tokens, self.chunk = fn, logits, tokens, chunk

    def __call__(self, olp, adv, mask):
        step(self.fn, self.logits, self.tokens, olp, adv, mask, self.chunk)
        return torch.zeros((), requires_grad=True)


if __name__ == "__main__":
    main()
