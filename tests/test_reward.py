"""ctpo.reward: extraction of the last \\boxed{}, math-verify verdicts (golden table written by hand),
time bound in a worker process (also from non-main threads), verl's compute_score signature."""
import threading

import pytest

from ctpo.reward import RewardResult, compute_score, extraction_failure_rate, last_boxed, score

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
