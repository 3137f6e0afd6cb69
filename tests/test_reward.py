"""ctpo.reward: extraction of the last \\boxed{}, math-verify verdicts (golden table written by hand),
time bound in a worker process (also from non-main threads), verl's compute_score signature."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hang import HANG_S

from ctpo import reward
from ctpo.reward import (GroundTruthError, RewardResult, compute_score, extraction_failure_rate, last_boxed,
                         names_answer, score, split_relations)

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]

# (solution, ground truth, expected reason, expected extracted answer or None = don't check)
GOLDEN = [
    ("The answer is \\boxed{42}.", "42", "correct", "42"),
    ("\\boxed{41}", "42", "wrong", "41"),
    ("no box here, the answer is 42", "42", "no_answer", ""),
    ("", "42", "no_answer", ""),
    ("First \\boxed{3}, then corrected: \\boxed{5}", "5", "correct", "5"),  # several boxed: last wins
    ("First \\boxed{5}, then \\boxed{3}", "5", "wrong", "3"),
    ("\\boxed{7} ... so the final answer is \\boxed{12", "7", "correct", "7"),  # truncated last box ignored
    ("the final answer is \\boxed{12", "12", "no_answer", ""),  # truncated output
    ("\\boxed{**7**}", "7", "correct", "7"),  # bold inside the box (Math-Verify#76)
    ("The answer is **7**", "7", "no_answer", ""),  # bold alone is not a boxed answer
    ("\\boxed{\\textbf{7}}", "7", "correct", "7"),
    ("\\(\\boxed{7}\\)", "7", "correct", "7"),
    ("\\boxed{\\(7\\)}", "7", "correct", "7"),
    ("\\boxed{\\frac{1}{2}}", "0.5", "correct", None),  # fraction vs decimal
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", "correct", None),  # \dfrac vs \frac
    ("\\boxed{0.75}", "\\frac{3}{4}", "correct", None),
    ("\\boxed{\\frac{1}{3}}", "0.333", "wrong", None),  # a rounded decimal is not the fraction
    ("\\boxed{007}", "7", "correct", "007"),  # leading zeros (AIME style)
    ("\\boxed{070}", "70", "correct", None),
    ("\\boxed{-3}", "-3", "correct", "-3"),  # negative numbers
    ("\\boxed{3}", "-3", "wrong", None),
    ("\\boxed{10\\text{ cm}}", "10", "correct", None),  # units
    ("\\boxed{30^\\circ}", "30", "correct", None),
    ("\\boxed{50\\%}", "50", "correct", None),  # percent sign dropped
    ("\\boxed{(1,2]}", "(1,2]", "correct", None),  # intervals
    ("\\boxed{[1,2]}", "(1,2)", "wrong", None),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", "correct", None),  # sets, order-free
    ("\\boxed{x=5}", "5", "correct", None),
    ("\\boxed{1,000}", "1000", "correct", None),
    ("\\boxed{}", "5", "parse_error", ""),  # empty box
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", "correct", None),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", "correct", "\\frac{\\sqrt{2}}{2}"),  # nested braces
    ("\\fbox{9}", "9", "correct", "9"),
    ("\\boxed{5}", "\\boxed{5}", "correct", "5"),  # ground truth given boxed
    ("\\boxed{3.0}", "3", "correct", None),
    ("\\boxed{2^{10}}", "1024", "correct", None),
    ("```python\nfinal_answer(12)\n```\nCode execution result: \\boxed{12}\n", "12", "correct", "12"),
]


@pytest.mark.parametrize("solution,truth,reason,extracted", GOLDEN)
def test_golden_verdicts(solution, truth, reason, extracted):
    r = score(solution, truth)
    assert r.reason == reason, (solution, truth, r)
    assert r.score == (1.0 if reason == "correct" else 0.0)
    if extracted is not None:
        assert r.extracted == extracted


def test_golden_table_is_large_and_mixed():
    assert len(GOLDEN) >= 30
    assert {g[2] for g in GOLDEN} >= {"correct", "wrong", "no_answer", "parse_error"}


def test_last_boxed_balances_nested_braces():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{a{b}") is None
    assert last_boxed(None) is None


@pytest.mark.parametrize("bad", [None, 123, b"\\boxed{1}"])
def test_malformed_solutions_score_zero_without_raising(bad):
    r = score(bad, "1")
    assert r == RewardResult(0.0, "", "no_answer")


def test_timeout_bounds_a_pathological_check_and_recovers():
    # sympy tries to evaluate the power tower; the worker is killed after timeout_s
    r = score("\\boxed{9^{9^{9^{9^{9}}}}}", "1", timeout_s=1.0)
    assert (r.score, r.reason) == (0.0, "timeout")
    assert score("\\boxed{2}", "2").reason == "correct"  # a fresh worker took over


def test_scoring_from_non_main_threads():
    out = {}

    def work(i):
        out[i] = score(f"\\boxed{{{i}}}", str(i)), score("\\boxed{9^{9^{9^{9^{9}}}}}", "1", timeout_s=0.5)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(out) == [0, 1, 2]
    for ok, slow in out.values():
        assert ok.reason == "correct" and slow.reason == "timeout"


def test_verl_compute_score_signature_and_dict():
    res = compute_score("math", "so \\boxed{\\frac{1}{2}}", "0.5", extra_info={"index": 0})
    assert res == {"score": 1.0, "acc": 1.0, "extraction_failed": 0.0, "timeout": 0.0}
    res = compute_score(data_source="math", solution_str="nothing", ground_truth="1")
    assert res["score"] == 0.0 and res["extraction_failed"] == 1.0


def test_extraction_failure_rate_counts_no_answer_and_parse_error():
    rs = [RewardResult(1.0, "1", "correct"), RewardResult(0.0, "", "no_answer"),
          RewardResult(0.0, "", "parse_error"), RewardResult(0.0, "2", "wrong")]
    assert extraction_failure_rate(rs) == 0.5
    assert extraction_failure_rate([]) == 0.0


# A model searching for shortcuts: relations and chains that end in (or mention) the gold, 204.
GAMING = [
    ("\\boxed{205 = 204}", "204", "wrong"),
    ("\\boxed{1 = 2 = 3 = 204}", "204", "wrong"),
    ("\\boxed{205 \\implies 204}", "204", "wrong"),
    ("\\boxed{205 \\to 204}", "204", "wrong"),
    ("\\boxed{204 \\approx 205}", "204", "wrong"),
    ("\\boxed{205 \\Rightarrow 204}", "204", "wrong"),
    ("\\boxed{204 \\neq 205}", "204", "wrong"),
    ("\\boxed{205 \\le 204}", "204", "wrong"),
    ("\\boxed{204 < 205}", "204", "wrong"),
    ("\\boxed{x = 205 = 204}", "204", "wrong"),  # a named chain must be right at every step
    ("\\boxed{x \\approx 204}", "204", "wrong"),  # only equations name an exact answer
    ("\\boxed{\\frac{1}{2} = 204}", "204", "wrong"),  # a numeric left side names nothing
    ("\\boxed{x = }", "204", "wrong"),
    ("\\boxed{204, 205, 206}", "204", "wrong"),  # a list of guesses
    ("\\boxed{None}", "204", "wrong"),
    ("\\boxed{x = 204}", "204", "correct"),  # a variable on the left names the answer
    ("\\boxed{x = 2 \\cdot 102 = 204}", "204", "correct"),
    ("\\boxed{f(3) = 204}", "204", "correct"),
    ("\\boxed{m + n = 204}", "204", "correct"),
    ("\\boxed{y = 2x + 1}", "y = 2x + 1", "correct"),  # a relation as ground truth is compared whole
    ("\\boxed{x > 2}", "x > 2", "correct"),
]


@pytest.mark.parametrize("solution,truth,reason", GAMING)
def test_gaming_relations_and_chains_earn_no_credit(solution, truth, reason):
    r = score(solution, truth)
    assert (r.reason, r.score) == (reason, 1.0 if reason == "correct" else 0.0), r


def test_split_relations_and_names_answer():
    assert split_relations("x = 2 \\cdot 102 = 204") == (["x", "2 \\cdot 102", "204"], ["=", "="])
    assert split_relations("a \\le b \\left(c\\right)") == (["a", "b \\left(c\\right)"], ["\\le"])
    assert split_relations("\\frac{a=1}{2}") == (["\\frac{a=1}{2}"], [])  # inside braces: not top level
    assert [names_answer(s) for s in ("x", "f(3)", "\\angle A", "205", "\\frac{1}{2}", "2\\pi")] == [
        True, True, True, False, False, False]


@pytest.mark.parametrize("bad", [None, "", "   ", float("nan"), "\\boxed{}"])
def test_missing_or_empty_ground_truth_is_a_data_error(bad):
    with pytest.raises(GroundTruthError, match="ground truth"):
        score("\\boxed{None}", bad)
    with pytest.raises(GroundTruthError):
        compute_score("math", "\\boxed{}", bad)


def test_loader_rejects_missing_or_empty_ground_truth(tmp_path):
    import pandas as pd

    from ctpo.data.problems import BenchmarkError, load_benchmark

    for i, gt in enumerate([None, "", "  "]):
        path = tmp_path / f"bad{i}.parquet"
        pd.DataFrame({"id": ["a", "b"], "prompt": [[{"role": "user", "content": "q"}]] * 2,
                      "reward_model": [{"ground_truth": "1"}, {"ground_truth": gt}]}).to_parquet(path)
        with pytest.raises(BenchmarkError, match=r"bad\d.parquet: row 1: 'reward_model.ground_truth' is missing or empty"):
            load_benchmark(path)


def test_extraction_is_bounded_on_degenerate_megabyte_outputs():
    # each of these took quadratic time before (rescanning from every \\boxed{); results checked, not timed
    mb = 1 << 20
    assert last_boxed("\\boxed{" * (mb // 7)) is None
    assert last_boxed("\\boxed{" * (mb // 7) + "}") == ""
    assert last_boxed("{" * mb + "\\boxed{5}") == "5"
    assert last_boxed("\\boxed{1}" + "x" * mb) is None  # beyond the scan window: the answer must end the text
    assert last_boxed("x" * mb + "\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert score("\\boxed{" * (mb // 7), "1").reason == "no_answer"
    long = score("\\boxed{" + "1+" * 5000 + "1}", "5001")
    assert long.reason == "parse_error"  # longer than MAX_ANSWER_CHARS: never handed to sympy


def test_linear_extraction_matches_the_rescanning_definition():
    import random

    def reference(text):  # the old definition: from every head, scan forward to its closing brace
        found = None
        starts = sorted(m.end() for h in ("\\boxed{", "\\fbox{") for m in __import__("re").finditer(__import__("re").escape(h), text))
        for start in starts:
            depth, i = 1, start
            while i < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            if depth == 0:
                found = text[start: i - 1]
        return found

    rng = random.Random(0)
    atoms = ["\\boxed{", "\\fbox{", "{", "}", "1", "x", " "]
    for _ in range(2000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 14)))
        assert last_boxed(text) == reference(text), text


def _worker_pids() -> list[int]:
    pool = reward._pool()
    with pool.cond:
        return [w.proc.pid for w in pool.all]


def test_dead_worker_is_replaced_and_the_answer_regraded(monkeypatch):
    assert score("\\boxed{2}", "2").reason == "correct"
    for pid in _worker_pids():  # SIGTERM from outside (e.g. to the job) kills the idle workers
        os.kill(pid, signal.SIGTERM)
    # the kill is asynchronous: the next check sees EOF or a broken pipe either way
    assert score("\\boxed{\\frac{1}{2}}", "0.5") == RewardResult(1.0, "\\frac{1}{2}", "correct")
    # a worker that dies *during* the check: the answer is regraded on a fresh worker, never scored 0
    real_check, killed = reward._Worker.check, []

    def dying_check(self, pred, gold, timeout_s, grader):
        if not killed:
            killed.append(self.proc.pid)
            self.proc.kill()
            self.proc.wait()
        return real_check(self, pred, gold, timeout_s, grader)

    monkeypatch.setattr(reward._Worker, "check", dying_check)
    assert score("\\boxed{7}", "7").reason == "correct" and killed


def test_workers_are_in_their_own_session():
    score("\\boxed{1}", "1")
    for pid in _worker_pids():
        assert os.getsid(pid) == pid != os.getsid(0)


def test_workers_survive_the_thread_that_started_them():
    """PR_SET_PDEATHSIG follows the forking *thread*: workers are forked by a long-lived spawner thread."""
    reward._pool().close()
    t = threading.Thread(target=lambda: score("\\boxed{3}", "3"))
    t.start()
    t.join()
    pids = _worker_pids()
    assert pids and all(Path(f"/proc/{p}").exists() for p in pids)
    assert score("\\boxed{4}", "4").reason == "correct"
    assert set(_worker_pids()) & set(pids)


def test_reward_worker_dies_with_a_sigkilled_caller():
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from ctpo import reward\nreward.score('\\\\boxed{1}', '1')\n"
            "print([w.proc.pid for w in reward._pool().all], flush=True)\n"
            "import time; time.sleep(600)\n") % str(REPO)
    caller = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = eval(caller.stdout.readline())
    assert pids and all(Path(f"/proc/{p}").exists() for p in pids)
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + HANG_S
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]


SLOW = "\\boxed{9^{9^{9^{9^{9}}}}}"


def test_slow_answers_do_not_delay_others_and_the_pool_follows_concurrency():
    """16 concurrent calls, 8 of them pathological: every fast call gets its own worker and finishes
    before any slow call ends (ordering by events; the slow answers' deadline is long so that a loaded
    machine cannot reorder them)."""
    reward.prewarm(16)
    assert len(reward._pool().idle) >= 16
    done, results, lock = [], {}, threading.Lock()

    def call(i):
        r = score(SLOW, "1", timeout_s=20.0) if i % 2 else score(f"\\boxed{{{i}}}", str(i), timeout_s=20.0)
        with lock:
            done.append(i)
            results[i] = r

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HANG_S)
    assert sorted(results) == list(range(16))
    assert all(results[i].reason == ("timeout" if i % 2 else "correct") for i in range(16)), results
    assert all(i % 2 == 0 for i in done[:8]), done  # the 8 fast ones finished first
    assert len(reward._pool().all) >= 8


def test_deadline_covers_waiting_for_a_worker(monkeypatch):
    pool = reward._WorkerPool(max_workers=1)
    monkeypatch.setattr(reward, "_POOL", pool)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("slow", score(SLOW, "1", timeout_s=3.0)))
    t.start()
    while not pool.all or pool.idle:  # wait until the slow answer holds the only worker
        time.sleep(0.01)
    queued = score("\\boxed{5}", "5", timeout_s=0.5)  # cannot get a worker within its deadline
    t.join()
    pool.close()
    assert queued.reason == "timeout" and out["slow"].reason == "timeout"
