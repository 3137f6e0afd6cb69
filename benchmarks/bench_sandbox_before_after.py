"""The sandbox's speed before and after a change, side by side in one run: `bench_sandbox.throughput` (executions/s
of `print(1+1)` through `run_many`, and a bare `python -c` beside it) for two checkouts, in alternating
subprocesses, so machine noise hits both alike.

    git archive main | tar -x -C /tmp/base
    .venv/bin/python benchmarks/bench_sandbox_before_after.py --base /tmp/base [--rounds 3 --n 96 --concurrency 8]

Each round runs one fresh process per tree (in the tree, PYTHONPATH=<tree>, so `ctpo` is that tree's, checked;
same interpreter and packages). Reported per tree: the median over rounds of the sandbox's exec/s and of its overhead ratio
(sandbox time / bare `python -c` time, measured in the same process); and after/before of both.

    .venv/bin/python benchmarks/bench_sandbox_before_after.py --base /tmp/base --fairness [--rounds 2]

CPU fairness instead (issue 21): an honest program's wall time alone (best of 2), then beside a burner
whose 64 children each try setsid() (a scheduler autogroup each, where allowed) and spin (waited for: all
64 running); its status (timeout 20x alone) and slowdown.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_FAIR = r"""
import json, os, signal, threading, time, uuid
from ctpo.sandbox import SandboxLimits, run_code
MARK = "ctpoburn" + uuid.uuid4().hex[:10]
BURNER = ("import os\nfor _ in range(64):\n    if os.fork() == 0:\n        try:\n            os.setsid()\n"
          "        except OSError:\n            pass\n        os.execv('/bin/sh', ['sh', '-c', 'while :; do :; done', %r])\n"
          "while True:\n    try:\n        os.wait()\n    except ChildProcessError:\n        break\n" % MARK)
HONEST = "n = 0\nfor i in range(1500000):\n    n += i\nprint('done')"
def burners():
    found = []
    for e in filter(str.isdigit, os.listdir("/proc")):
        try:
            if MARK.encode() in open(f"/proc/{e}/cmdline", "rb").read().split(b"\0"):
                found.append(int(e))
        except OSError:
            pass
    return found
def wall(t):
    t0 = time.monotonic()
    r = run_code(HONEST, SandboxLimits(timeout_s=t))
    return r.status, time.monotonic() - t0
alone = min(wall(120.0)[1] for _ in range(2))
t = threading.Thread(target=run_code, args=(BURNER, SandboxLimits(timeout_s=600.0)))
t.start()
while len(burners()) < 64 and t.is_alive():
    time.sleep(0.05)
status, beside = wall(20 * alone)
for pid in burners():
    os.kill(pid, signal.SIGKILL)
t.join()
print(json.dumps({"alone_s": alone, "beside_s": beside, "status": status, "slowdown": beside / alone}))
"""
_ONE = ("import json, sys; sys.path.insert(0, sys.argv[1] + '/benchmarks'); import bench_sandbox; "
        "print(json.dumps(bench_sandbox.throughput(int(sys.argv[2]), int(sys.argv[3]))))")


def one(tree: Path, n: int, concurrency: int, fairness: bool = False) -> dict:
    argv = [sys.executable, "-c", _FAIR] if fairness else [sys.executable, "-c", _ONE, str(tree), str(n), str(concurrency)]
    # cwd = the tree: `python -c` puts the working directory first on sys.path, before PYTHONPATH
    out = subprocess.run([*argv[:2], "import ctpo; print(ctpo.__file__)\n" + argv[2], *argv[3:]], capture_output=True,
                         text=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{tree}: {out.stderr.strip().splitlines()[-1:]}")
    lines = out.stdout.strip().splitlines()
    if not lines[0].startswith(str(tree) + "/"):
        raise SystemExit(f"{tree}: imported ctpo from {lines[0]}, not from the tree")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="the checkout before the change")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--fairness", action="store_true", help="the CPU-fairness measurement instead")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(a.rounds):
        for name, tree in (("before", a.base.resolve()), ("after", REPO)):
            runs[name].append(one(tree, a.n, a.concurrency, a.fairness))
            print(name, json.dumps(runs[name][-1]), flush=True)
    if a.fairness:
        return
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("sandbox_exec_per_s", "overhead_ratio")}
           for name, rs in runs.items()}
    res = {**med, "after_over_before_exec_per_s": med["after"]["sandbox_exec_per_s"] / med["before"]["sandbox_exec_per_s"],
           "after_over_before_overhead": med["after"]["overhead_ratio"] / med["before"]["overhead_ratio"],
           "rounds": a.rounds, "n": a.n, "concurrency": a.concurrency, "runs": runs}
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
    if a.out:
        from ctpo.io import write_json

        write_json(a.out, res)


if __name__ == "__main__":
    main()
