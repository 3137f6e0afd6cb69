"""Reward overhead: answers checked per second by `ctpo.reward.score` (last-boxed extraction + math-verify
in a worker process, thread-safe time bound) vs math-verify called in-process on the main thread with
its own signal-based timeouts (the unsafe-in-threads baseline), same inputs, side by side in one run.

    .venv/bin/python benchmarks/bench_reward.py --n 300 [--out results/bench/reward.json]

Target: in-process checks/s / ctpo checks/s <= 2 (the IPC round trip must not dominate).
"""
from __future__ import annotations

import argparse
import time

from ctpo.io import write_json
from ctpo.reward import last_boxed, normalize_answer, score

PAIRS = [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{007}", "7"), ("\\boxed{(1,2]}", "(1,2]"),
         ("\\boxed{10\\text{ cm}}", "10"), ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"), ("\\boxed{41}", "42")]


def in_process(solution: str, truth: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = (LatexExtractionConfig(), ExprExtractionConfig())
    g = parse("\\boxed{" + truth + "}", configs)
    p = parse("\\boxed{" + normalize_answer(last_boxed(solution)) + "}", configs)
    return bool(g and p and verify(g, p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    items = [PAIRS[i % len(PAIRS)] for i in range(args.n)]
    score(*items[0]), in_process(*items[0])  # warm-up: worker start, imports
    res = {}
    for name, fn in (("ctpo_worker", lambda s, t: score(s, t).score == 1.0), ("in_process", in_process)):
        t0 = time.perf_counter()
        verdicts = [fn(s, t) for s, t in items]
        dt = time.perf_counter() - t0
        res[name] = {"seconds": dt, "checks_per_s": args.n / dt, "correct": sum(verdicts)}
        print(f"{name:12s} {args.n} checks in {dt:6.2f} s = {args.n / dt:7.1f} checks/s ({sum(verdicts)} correct)")
    res["ratio_in_process_over_worker"] = res["in_process"]["checks_per_s"] / res["ctpo_worker"]["checks_per_s"]
    print(f"in-process / worker = {res['ratio_in_process_over_worker']:.2f}x")
    if args.out:
        write_json(args.out, res)


if __name__ == "__main__":
    main()
