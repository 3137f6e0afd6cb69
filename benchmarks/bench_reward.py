"""Reward overhead: answers checked per second by `ctpo.reward.score` (last-boxed extraction + math-verify
in a worker process, thread-safe time bound) vs math-verify called in-process on the main thread with
its own signal-based timeouts (the unsafe-in-threads baseline), same inputs, side by side in one run.

    .venv/bin/python benchmarks/bench_reward.py --n 300 [--out results/bench/reward.json]

Target: in-process checks/s / ctpo checks/s <= 2 (the IPC round trip must not dominate).

    .venv/bin/python benchmarks/bench_reward.py --integrity [--sizes-kb 16,32,1024]

--integrity (issue 12): seconds of `score` on degenerate outputs of each size (repeated `\\boxed{`,
unclosed braces before a final box), and the per-call latency of 16 concurrent `score` calls from 16
threads, 8 of them pathological answers (a power tower sympy tries to evaluate), timeout_s=5, once on a
cold pool and once warm.
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


SLOW = "\\boxed{9^{9^{9^{9^{9}}}}}"


def degenerate(size: int) -> dict[str, str]:
    return {"repeated_boxed_open": "\\boxed{" * (size // 7),
            "open_braces_then_box": "{" * (size - 10) + "\\boxed{7}",
            "nested_boxes": "\\boxed{" * (size // 14) + "}" * (size // 14)}


def integrity(sizes_kb: list[int]) -> dict:
    import threading

    from ctpo import reward

    out: dict = {"degenerate_s": {}}
    score("\\boxed{1}", "1")  # warm-up: one worker
    for kb in sizes_kb:
        for name, text in degenerate(kb << 10).items():
            t0 = time.perf_counter()
            r = score(text, "7")
            dt = time.perf_counter() - t0
            out["degenerate_s"][f"{name}_{kb}KB"] = dt
            print(f"degenerate {name:22s} {kb:5d} KB: {dt:8.3f} s ({r.reason})")
    for phase in ("cold", "warm"):
        if phase == "cold" and getattr(reward, "_POOL", None) is not None:
            reward._POOL.close()
            reward._POOL = None
        if phase == "warm" and hasattr(reward, "prewarm"):
            reward.prewarm(16)
        lat: dict[int, tuple[str, float]] = {}
        start = threading.Barrier(16)

        def call(i: int) -> None:
            start.wait()
            t0 = time.perf_counter()
            r = score(SLOW, "1") if i % 2 else score(f"\\boxed{{{i}}}", str(i))
            lat[i] = (r.reason, time.perf_counter() - t0)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        fast = sorted(lat[i][1] for i in range(0, 16, 2))
        slow = sorted(lat[i][1] for i in range(1, 16, 2))
        reasons = sorted({lat[i][0] for i in range(16)})
        out[f"concurrent_{phase}"] = {"fast_s": fast, "slow_s": slow, "reasons": reasons}
        print(f"16 concurrent ({phase}): 8 fast  min/median/max {fast[0]:.2f}/{fast[4]:.2f}/{fast[-1]:.2f} s; "
              f"8 slow min/median/max {slow[0]:.2f}/{slow[4]:.2f}/{slow[-1]:.2f} s; reasons {reasons}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", default="")
    ap.add_argument("--integrity", action="store_true", help="degenerate-output time and concurrent latency")
    ap.add_argument("--sizes-kb", default="16,32,1024")
    args = ap.parse_args()
    if args.integrity:
        res = integrity([int(x) for x in args.sizes_kb.split(",")])
        if args.out:
            write_json(args.out, res)
        return
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
