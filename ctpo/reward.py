"""Binary math reward: the last complete `\\boxed{...}` checked with math-verify against the ground truth.

    score(solution_str, ground_truth, timeout_s=5.0) -> RewardResult(score, extracted, reason)
    reason: "correct" | "wrong" | "no_answer" (no complete \\boxed{}) | "parse_error" (math-verify
            could not read the answer or the ground truth) | "timeout"

Extraction (done here, in plain Python): the last *complete* `\\boxed{..}` / `\\fbox{..}` (balanced
braces) wins; a truncated final `\\boxed{12` does not count. Bold answers (`**7**`, `\\textbf{7}`),
inline-math delimiters (`\\(..\\)`, `$..$`) and a trailing `\\%` inside the box are unwrapped.

Time bound: math-verify's own timeout uses `signal.alarm`, which fails silently outside the main
thread (verl#5635; verl calls `compute_score` from executor threads). Its timeouts are switched off
and each check runs in a long-lived worker process instead; a check that overruns `timeout_s` gets
its worker killed and replaced, and scores 0 with reason "timeout". Safe from any thread.
"""
from __future__ import annotations

import atexit
import queue
import re
import threading
from dataclasses import dataclass

REASONS = ("correct", "wrong", "no_answer", "parse_error", "timeout")
_BOX_HEADS = ("\\boxed{", "\\fbox{")
_WORKER_START_TIMEOUT_S = 120.0
N_WORKERS = 2


@dataclass(frozen=True)
class RewardResult:
    score: float  # 1.0 correct, else 0.0
    extracted: str  # the answer taken from the last \boxed{} ("" when none)
    reason: str  # one of REASONS


def last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} / \\fbox{...} (balanced braces), or None."""
    if not isinstance(text, str):
        return None
    found = None
    starts = sorted(m.end() for head in _BOX_HEADS for m in re.finditer(re.escape(head), text))
    for start in starts:
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[start : i - 1]
    return found


def normalize_answer(ans: str) -> str:
    """Unwrap presentation that math-verify misreads inside a box (Math-Verify#76: bold)."""
    a = ans.strip()
    for pat in (r"^\*\*(.*)\*\*$", r"^\\textbf\{(.*)\}$", r"^\\\((.*)\\\)$", r"^\$(.*)\$$", r"^\\\[(.*)\\\]$"):
        m = re.match(pat, a, re.DOTALL)
        if m:
            a = m.group(1).strip()
    a = re.sub(r"\\?%$", "", a).strip()
    return a


# ----------------------------------------------------------------------------- worker process


def _verify(pred: str, gold: str) -> str:
    """Runs inside the worker: 'correct' | 'wrong' | 'parse_error'. math-verify timeouts are off."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = (LatexExtractionConfig(), ExprExtractionConfig())
    g = parse("\\boxed{" + gold + "}", configs, parsing_timeout=None)
    p = parse("\\boxed{" + pred + "}", configs, parsing_timeout=None)
    if not g or not p:
        return "parse_error"
    return "correct" if verify(g, p, timeout_seconds=None) else "wrong"


def _serve() -> None:
    """Worker loop (`python -m ctpo.reward`): one JSON request per stdin line, one verdict per line."""
    import json
    import logging
    import sys
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # math-verify warns that its own timeouts are off: intended
    import math_verify  # noqa: F401  (import before signalling ready)

    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        pred, gold = json.loads(line)
        try:
            verdict = _verify(pred, gold)
        except Exception:  # anything math-verify/sympy raises is an unreadable answer
            verdict = "parse_error"
        out.write(verdict + "\n")
        out.flush()


class _Worker:
    """A `python -m ctpo.reward` subprocess (a plain subprocess, not multiprocessing: no re-import of
    the caller's __main__, and it works inside daemonic / Ray worker processes)."""

    def __init__(self) -> None:
        import os
        import subprocess
        import sys
        from pathlib import Path

        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctpo.reward"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1,
        )
        if self._readline(_WORKER_START_TIMEOUT_S) != "ready":
            self.kill()
            raise RuntimeError("ctpo.reward: the math-verify worker process did not start")

    def _readline(self, timeout_s: float) -> str | None:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError("reward worker exited")
        return line.strip()

    def check(self, pred: str, gold: str, timeout_s: float) -> str | None:
        """The verdict, or None when it overran `timeout_s` (the caller then kills this worker)."""
        import json

        self.proc.stdin.write(json.dumps([pred, gold]) + "\n")
        self.proc.stdin.flush()
        return self._readline(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class _WorkerPool:
    """Up to N_WORKERS workers, started on demand, shared by all threads."""

    def __init__(self, size: int) -> None:
        self.idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self.slots = threading.Semaphore(size)
        self.all: list[_Worker] = []
        self.lock = threading.Lock()

    def check(self, pred: str, gold: str, timeout_s: float) -> str | None:
        with self.slots:
            try:
                w = self.idle.get_nowait()
            except queue.Empty:
                w = _Worker()
                with self.lock:
                    self.all.append(w)
            try:
                verdict = w.check(pred, gold, timeout_s)
            except (EOFError, OSError, ValueError):
                verdict = "dead"
            if verdict is None or verdict == "dead":
                w.kill()
                with self.lock:
                    self.all.remove(w)
                return None if verdict is None else "parse_error"
            self.idle.put(w)
            return verdict

    def close(self) -> None:
        with self.lock:
            for w in self.all:
                w.kill()
            self.all.clear()


_POOL: _WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _WorkerPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _WorkerPool(N_WORKERS)
            atexit.register(_POOL.close)
        return _POOL


# ----------------------------------------------------------------------------- public API


def score(solution_str: str, ground_truth: str, timeout_s: float = 5.0) -> RewardResult:
    """Binary reward of a response against a ground truth; never raises on bad model output."""
    boxed = last_boxed(solution_str) if isinstance(solution_str, str) else None
    if boxed is None:
        return RewardResult(0.0, "", "no_answer")
    extracted = normalize_answer(boxed)
    if not extracted:
        return RewardResult(0.0, "", "parse_error")
    gold = normalize_answer(str(ground_truth))
    g_boxed = last_boxed(gold)  # a ground truth given as \boxed{..} is unwrapped
    gold = normalize_answer(g_boxed) if g_boxed is not None else gold
    if not gold:
        return RewardResult(0.0, extracted, "parse_error")
    verdict = _pool().check(extracted, gold, timeout_s)
    if verdict is None:
        return RewardResult(0.0, extracted, "timeout")
    return RewardResult(1.0 if verdict == "correct" else 0.0, extracted, verdict)


def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> dict:
    """verl `reward.custom_reward_function` entry point (path: ctpo/reward.py, name: compute_score).
    Returns verl's dict form: `score` plus numeric extras averaged into the reward metrics."""
    r = score(solution_str, ground_truth)
    return {
        "score": r.score,
        "acc": r.score,
        "extraction_failed": float(r.reason in ("no_answer", "parse_error")),
        "timeout": float(r.reason == "timeout"),
    }


def extraction_failure_rate(results: list[RewardResult]) -> float:
    """Fraction of results whose answer could not be extracted or read (no_answer or parse_error)."""
    if not results:
        return 0.0
    return sum(r.reason in ("no_answer", "parse_error") for r in results) / len(results)


if __name__ == "__main__":
    _serve()
