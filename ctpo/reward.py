"""Binary math reward: the last complete `\\boxed{...}` checked with math-verify against the ground truth.

    score(solution_str, ground_truth, timeout_s=5.0) -> RewardResult(score, extracted, reason)
    reason: "correct" | "wrong" | "no_answer" (no complete \\boxed{}) | "parse_error" (math-verify
            could not read the answer) | "timeout"

Extraction (plain Python, linear time): only the last `MAX_SCAN_CHARS` characters of the response are
read; one pass matches braces with a stack and the last *complete* `\\boxed{..}` / `\\fbox{..}` wins (a
truncated final `\\boxed{12` does not count). Bold answers (`**7**`, `\\textbf{7}`), inline-math
delimiters (`\\(..\\)`, `$..$`) and a trailing `\\%` inside the box are unwrapped. An answer longer than
`MAX_ANSWER_CHARS` is a parse_error (never handed to sympy).

Strict relations: when the ground truth is a value, an answer written as a relation earns credit only as
an equation chain whose left side names the answer (a variable or expression, not a number) and whose
every other side equals the ground truth: `x = 204`, `x = 2 \\cdot 102 = 204` are correct; `205 = 204`,
`1 = 2 = 3 = 204`, `x = 205 = 204`, `205 \\implies 204`, `205 \\to 204`, `204 \\approx 205` are wrong.
The guard (`ctpo.relations`) reads unicode and macro relations (`205 ＝ 204`, `\\coloneqq`, the `\\neq` family),
braces (`\\boxed{{205 = 204}}`), spacing macros (`205 \\quad = 204`), negation (`\\neg 204`), and checks
math-verify's parse of each value for relations; an answer math-verify reads only a fragment of is a
parse_error. A ground truth that is itself a relation is compared whole by math-verify.

Ground truth: None, NaN or empty is an error of the data (`GroundTruthError`, raised; never a match);
`ctpo.data.problems` rejects such rows at load time.

Time bound: math-verify's own timeout uses `signal.alarm`, which fails silently outside the main thread
(verl#5635; verl calls `compute_score` from executor threads). Its timeouts are switched off and each
check runs in a worker process (`python -m ctpo.reward`). One deadline covers a `score` call from start
to verdict, waiting for a free worker included (a worker's own cold start is not charged: it is not the
answer's doing). The pool grows to the caller's concurrency (one worker per concurrent call, up to
`MAX_WORKERS`), so a slow answer never delays another. A check that overruns gets its worker killed
and replaced and scores 0 with reason "timeout". A worker that dies (a signal from outside, e.g. SIGTERM
to the job) is replaced and the answer regraded; only an answer that kills `REGRADE_ATTEMPTS` fresh
workers in a row is scored (parse_error). Workers run in their own session (terminal / process-group
signals do not reach them) and die with the process that started them (PR_SET_PDEATHSIG, set from a
long-lived spawner thread: the death signal follows the *thread* that forked), even on SIGKILL. They start
with a scrubbed environment (`WORKER_ENV_KEYS` only: no HF_TOKEN, WANDB_API_KEY, ...) and run under rlimits
(address space `WORKER_MEMORY_MB`, `WORKER_NOFILE` files, no processes or threads, no file writes, a CPU
budget per check).
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass

from ctpo.relations import (canonical, hidden_relations, holds_relation, is_relation, names_answer,  # noqa: F401
                            names_quantity, negated, parse_whole, split_relations)
from ctpo.sandbox.spawner import Spawner

REASONS = ("correct", "wrong", "no_answer", "parse_error", "timeout")
MAX_SCAN_CHARS = 1 << 16  # extraction reads at most the last 64 Ki characters of a response
MAX_ANSWER_CHARS = 1024  # a longer boxed answer is not a final answer: parse_error, never parsed
MAX_WORKERS = 32  # upper bound of the worker pool (it grows with the number of concurrent calls)
REGRADE_ATTEMPTS = 3  # fresh workers tried for one answer when workers die under it
_WORKER_START_TIMEOUT_S = 120.0
# A worker's limits (it parses model output with sympy): address space, open files, no child processes or
# threads, no files written, and CPU seconds per check (the check's wall deadline rounded up + 1 s, reset
# before each check; SIGXCPU ends a worker that overruns it, and the pool replaces it). A worker holds
# about 65 MB after importing math-verify and sympy.
WORKER_MEMORY_MB = 1024
WORKER_NOFILE = 64
_DEFAULT_CPU_S = 6  # CPU budget of a request that names none ([pred, gold]): the default 5 s deadline + 1 s
# The environment a worker starts with: these keys only (locale, library and module paths); no host secret
# (HF_TOKEN, WANDB_API_KEY, cloud credentials, ...) reaches the process that parses model output.
WORKER_ENV_KEYS = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ")
_BOX = re.compile(r"\\(?:boxed|fbox)\{")
log = logging.getLogger(__name__)


class GroundTruthError(ValueError):
    """A missing or empty ground truth: an error of the data, never scored."""


@dataclass(frozen=True)
class RewardResult:
    score: float  # 1.0 correct, else 0.0
    extracted: str  # the answer taken from the last \boxed{} ("" when none)
    reason: str  # one of REASONS


def last_boxed(text: str, max_scan: int = MAX_SCAN_CHARS) -> str | None:
    """Content of the last complete \\boxed{...} / \\fbox{...} (balanced braces) within the last
    `max_scan` characters, or None. One pass: O(len) with len <= max_scan."""
    if not isinstance(text, str):
        return None
    if len(text) > max_scan:
        text = text[-max_scan:]
    heads = {m.end() - 1 for m in _BOX.finditer(text)}  # index of each head's opening brace
    if not heads:
        return None
    stack: list[int] = []
    best: tuple[int, int] | None = None
    for m in re.finditer(r"[{}]", text):
        i = m.start()
        if text[i] == "{":
            stack.append(i)
        elif stack:
            j = stack.pop()
            if j in heads and (best is None or j > best[0]):
                best = (j, i)
    return None if best is None else text[best[0] + 1 : best[1]]


def normalize_answer(ans: str) -> str:
    """Unwrap presentation that math-verify misreads inside a box (Math-Verify#76: bold)."""
    a = ans.strip()
    for pat in (r"^\*\*(.*)\*\*$", r"^\\textbf\{(.*)\}$", r"^\\\((.*)\\\)$", r"^\$(.*)\$$", r"^\\\[(.*)\\\]$"):
        m = re.match(pat, a, re.DOTALL)
        if m:
            a = m.group(1).strip()
    a = re.sub(r"\\?%$", "", a).strip()
    return a


def _gold_text(ground_truth) -> str:
    """The ground truth as answer text; GroundTruthError when it is missing or empty."""
    if ground_truth is None or (isinstance(ground_truth, float) and math.isnan(ground_truth)):
        raise GroundTruthError(f"ctpo.reward: ground truth is missing ({ground_truth!r}); fix the data")
    gold = normalize_answer(str(ground_truth))
    g_boxed = last_boxed(gold)  # a ground truth given as \boxed{..} is unwrapped
    gold = normalize_answer(g_boxed) if g_boxed is not None else gold
    if not gold:
        raise GroundTruthError(f"ctpo.reward: ground truth is empty ({ground_truth!r}); fix the data")
    return gold


# ----------------------------------------------------------------------------- worker process


def _verify_one(pred: str, gold: str) -> str:
    """math-verify on the whole answer (used when the ground truth is itself a relation)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = (LatexExtractionConfig(), ExprExtractionConfig())
    g = parse("\\boxed{" + gold + "}", configs, parsing_timeout=None)
    p = parse("\\boxed{" + pred + "}", configs, parsing_timeout=None)
    if not g or not p:
        return "parse_error"
    return "correct" if verify(g, p, timeout_seconds=None) else "wrong"


def _verify_value(pred: str, gold: str) -> str:
    """One value (an answer or a side of its equation chain) against a value ground truth: a hidden
    relation or a parse holding a relation / logical value is wrong (`ctpo.relations`)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if hidden_relations(pred):
        return "wrong"
    p = parse_whole(pred)
    g = parse("\\boxed{" + gold + "}", (LatexExtractionConfig(), ExprExtractionConfig()), parsing_timeout=None)
    if not g or not p:
        return "parse_error"
    if holds_relation(p[0]):
        return "wrong"
    return "correct" if verify(g, p, timeout_seconds=None) else "wrong"


def _verify(pred: str, gold: str) -> str:
    """Runs inside the worker: 'correct' | 'wrong' | 'parse_error' (strict relations, see module doc and
    `ctpo.relations`)."""
    if is_relation(canonical(gold)):
        return _verify_one(pred, gold)  # a relation as ground truth (a set-builder, say): compared whole
    text = canonical(pred)
    if negated(text):
        return "wrong"
    sides, rels = split_relations(text)
    if not rels:
        return _verify_value(text, gold)
    if any(r != "=" for r in rels) or not names_answer(sides[0]) or not all(sides[1:]):
        return "wrong"
    lhs = parse_whole(sides[0])
    if not lhs or not names_quantity(lhs[0]):
        return "wrong"
    verdicts = [_verify_value(side, gold) for side in sides[1:]]
    if "wrong" in verdicts:
        return "wrong"
    return "parse_error" if "parse_error" in verdicts else "correct"


def _check_fn(grader: str):
    """The worker-side check of a grader: 'strict' (this module) or 'release' (ctpo.release_reward)."""
    if grader == "release":
        from ctpo.release_reward import verify_in_worker

        return verify_in_worker
    return _verify


def _die_with_parent(parent: int) -> None:
    """PR_SET_PDEATHSIG(SIGKILL), then exit if the parent is already gone (the race before prctl)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(0)


def _limit_self() -> None:
    """The worker's rlimits, set once its trusted imports are done and before it reads any request: address
    space, open files, processes (0: no fork, no thread), file size (0: writes nothing), no core dumps."""
    import resource

    for res, value in ((resource.RLIMIT_AS, WORKER_MEMORY_MB << 20), (resource.RLIMIT_NOFILE, WORKER_NOFILE),
                       (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))


def _cpu_budget(cpu_s: int) -> None:
    """RLIMIT_CPU (soft) = CPU seconds used so far + cpu_s: the next check's CPU budget."""
    import resource

    used = resource.getrusage(resource.RUSAGE_SELF)
    resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(used.ru_utime + used.ru_stime) + cpu_s, resource.RLIM_INFINITY))


def _serve() -> None:
    """Worker loop (`python -m ctpo.reward`): one JSON request [pred, gold, cpu_s, grader] per stdin line (cpu_s
    and grader optional; grader: see _check_fn), one verdict per line."""
    import json
    import sys
    import warnings

    if os.environ.get("CTPO_REWARD_PARENT"):
        _die_with_parent(int(os.environ["CTPO_REWARD_PARENT"]))
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # math-verify warns that its own timeouts are off: intended
    import math_verify  # noqa: F401  (import before signalling ready)
    import sympy  # noqa: F401
    from sympy.logic import boolalg  # noqa: F401  (everything `ctpo.relations` imports, before the limits)

    import ctpo.release_reward  # noqa: F401  (the release grader's check, before the limits)

    _limit_self()
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pred, gold = request[0], request[1]
        _cpu_budget(int(request[2]) if len(request) > 2 else _DEFAULT_CPU_S)
        grader = request[3] if len(request) > 3 else "strict"
        try:
            verdict = _check_fn(grader)(pred, gold)
        except Exception:  # anything math-verify/sympy raises is an unreadable answer
            verdict = "parse_error"
        out.write(verdict + "\n")
        out.flush()



class _Worker:
    """A `python -m ctpo.reward` subprocess (a plain subprocess, not multiprocessing: no re-import of
    the caller's __main__, and it works inside daemonic / Ray worker processes)."""

    def __init__(self, spawner: Spawner) -> None:
        import subprocess
        import sys
        from pathlib import Path

        env = {k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ}
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["CTPO_REWARD_PARENT"] = str(os.getpid())
        self.proc = spawner.call(lambda: subprocess.Popen(
            [sys.executable, "-m", "ctpo.reward"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1, start_new_session=True,
        ))  # only the fork happens on the spawner thread; waiting for "ready" happens here, in parallel
        try:
            ready = self._readline(_WORKER_START_TIMEOUT_S)
        except EOFError:
            ready = None
        if ready != "ready":
            self.kill()
            raise RuntimeError("ctpo.reward: the math-verify worker process did not start")

    def _readline(self, timeout_s: float) -> str | None:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, timeout_s))
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError("reward worker exited")
        return line.strip()

    def check(self, pred: str, gold: str, timeout_s: float, grader: str = "strict") -> str | None:
        """The verdict of `grader` (see _check_fn), or None when it overran `timeout_s` (the caller then kills this
        worker). Raises EOFError/OSError when the worker is dead."""
        import json

        self.proc.stdin.write(json.dumps([pred, gold, math.ceil(timeout_s) + 1, grader]) + "\n")
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
    """Workers shared by all threads: an idle one is reused, else a new one starts while fewer than
    `max_workers` exist, else the call waits (within its deadline) for one to come back."""

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self.idle: list[_Worker] = []
        self.all: list[_Worker] = []
        self.starting = 0
        self.cond = threading.Condition()
        self.spawner = Spawner("ctpo-reward-spawner")
        self.owner = os.getpid()

    def _acquire(self, deadline: float) -> tuple[_Worker | None, float]:
        """(worker, seconds spent starting it) or (None, 0) when the deadline passed while waiting."""
        with self.cond:
            while not self.idle and len(self.all) + self.starting >= self.max_workers:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, 0.0
                self.cond.wait(left)
            if self.idle:
                return self.idle.pop(), 0.0
            self.starting += 1
        t0 = time.monotonic()
        try:
            w = _Worker(self.spawner)
        finally:
            with self.cond:
                self.starting -= 1
                self.cond.notify()
        with self.cond:
            self.all.append(w)
        return w, time.monotonic() - t0

    def _release(self, w: _Worker, healthy: bool) -> None:
        if not healthy:
            w.kill()
        with self.cond:
            if healthy:
                self.idle.append(w)
            elif w in self.all:
                self.all.remove(w)
            self.cond.notify()

    def check(self, pred: str, gold: str, timeout_s: float, t0: float, grader: str = "strict") -> str | None:
        """Verdict of `grader`, or None on timeout. Deadline: t0 + timeout_s, plus worker cold starts."""
        deadline = t0 + timeout_s
        for _ in range(REGRADE_ATTEMPTS):
            w, start_s = self._acquire(deadline)
            if w is None:
                return None
            deadline += start_s
            try:
                verdict = w.check(pred, gold, deadline - time.monotonic(), grader)
            except (EOFError, OSError, ValueError):  # the worker died: replace it and regrade
                self._release(w, healthy=False)
                log.warning("ctpo.reward: a worker died while checking an answer; regrading on a fresh one")
                deadline = max(deadline, time.monotonic() + timeout_s)
                continue
            self._release(w, healthy=verdict is not None)
            return verdict
        log.warning("ctpo.reward: the answer killed %d fresh workers; scored parse_error", REGRADE_ATTEMPTS)
        return "parse_error"

    def prewarm(self, n: int) -> None:
        """Start workers (in parallel) until at least min(n, max_workers) exist; all are left idle."""
        n = min(n, self.max_workers)
        with self.cond:
            missing = n - len(self.all) - self.starting
            self.starting += max(0, missing)

        def start() -> None:
            try:
                w = _Worker(self.spawner)
            finally:
                with self.cond:
                    self.starting -= 1
            with self.cond:
                self.all.append(w)
                self.idle.append(w)
                self.cond.notify()

        threads = [threading.Thread(target=start) for _ in range(max(0, missing))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def close(self) -> None:
        with self.cond:
            for w in self.all:
                w.kill()
            self.all.clear()
            self.idle.clear()


_POOL: _WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _WorkerPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.owner != os.getpid():  # a forked copy of the caller starts its own
            _POOL = _WorkerPool(MAX_WORKERS)
            atexit.register(_POOL.close)
        return _POOL


# ----------------------------------------------------------------------------- public API


def score(solution_str: str, ground_truth: str, timeout_s: float = 5.0) -> RewardResult:
    """Binary reward of a response against a ground truth; never raises on bad model output.
    Raises GroundTruthError for a missing/empty ground truth (a data error)."""
    t0 = time.monotonic()
    gold = _gold_text(ground_truth)
    boxed = last_boxed(solution_str) if isinstance(solution_str, str) else None
    if boxed is None:
        return RewardResult(0.0, "", "no_answer")
    extracted = normalize_answer(boxed)
    if not extracted or len(extracted) > MAX_ANSWER_CHARS:
        return RewardResult(0.0, extracted[:MAX_ANSWER_CHARS], "parse_error")
    verdict = _pool().check(extracted, gold, timeout_s, t0)
    if verdict is None:
        return RewardResult(0.0, extracted, "timeout")
    return RewardResult(1.0 if verdict == "correct" else 0.0, extracted, verdict)


def prewarm(concurrency: int) -> None:
    """Start reward workers for `concurrency` simultaneous `score` calls ahead of time (optional: the pool
    also grows on demand), so the first batch does not wait for cold starts."""
    _pool().prewarm(concurrency)


def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> dict:
    """verl `reward.custom_reward_function` entry point (path: pkg://ctpo.reward, name: compute_score).
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
