"""The release's grader (ctpo.release_reward), its selection by `reward.grader`, and both verdicts in evaluation.

Cases are written from the release's three scorers (horizon-llm/CTPO, verl/utils/reward_score: math_reward,
math_dapo, math_verify, joined by default_compute_score): which scorer credits a response, and whether our strict
grader (ctpo.reward) does.
"""
from __future__ import annotations

import copy
import sys

import numpy as np
import pytest

from ctpo import grading, reward
from ctpo import release_reward as rr
from ctpo.config import CONFIG_DIR, ConfigError, load_experiment, load_run_config, resolve_run
from ctpo.workdir import run_identity

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

TOOL_CALL = ('<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(7*10)"}}\n</tool_call>\n'
             "<tool_response>\n70\n</tool_response>\n")
FENCED = "Let me compute.\n```python\nprint(7*10)\n```\n```output\n70\n```\n"

# (response, ground truth, math_reward hit, math_dapo hit, release verdict, strict verdict)
CASES = [
    # right answers
    ("So the answer is \\boxed{70}.", "70", True, False, 1.0, 1.0),  # boxed: every grader
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", True, False, 1.0, 1.0),  # MATH normalisation: dfrac, \frac12
    ("\\boxed 70$ and more text", "70", True, False, 1.0, 0.0),  # `\boxed ` (space): up to the next $
    ("so $k = 3$, thus \\boxed{k=3}", "3", True, False, 1.0, 1.0),  # short `k=` prefix dropped
    ("The final answer is $70$.", "70", False, False, 1.0, 0.0),  # unboxed: only math-verify
    ("We get 2 and 3 so the answer is 5.", "5", False, False, 1.0, 0.0),  # plain text: math-verify
    ("Some work.\nAnswer: 70", "70", False, True, 1.0, 0.0),  # an Answer: line
    ("work\nanswer : 1,000 dollars", "1000", False, True, 1.0, 0.0),  # Minerva: separators, units
    (FENCED, "70", False, False, 1.0, 0.0),  # only in tool output (fenced protocol)
    (TOOL_CALL, "70", False, False, 1.0, 0.0),  # only in a tool response (Hermes protocol)
    # wrong answers, each way
    ("So the answer is \\boxed{71}.", "70", False, False, 0.0, 0.0),
    ("The final answer is $71$.", "70", False, False, 0.0, 0.0),
    ("Some work.\nAnswer: 71", "70", False, False, 0.0, 0.0),
    (FENCED.replace("7*10", "7*10+1").replace("70", "71"), "70", False, False, 0.0, 0.0),
    (TOOL_CALL.replace("7*10", "7*10+1").replace("70", "71"), "70", False, False, 0.0, 0.0),
    ("\\fbox{70}", "70", False, False, 0.0, 1.0),  # math_reward finds \fbox but its unboxing rejects it
]


@pytest.mark.parametrize("text,gold,boxed,line,release,strict", CASES)
def test_release_grader_against_the_three_scorers(text, gold, boxed, line, release, strict):
    assert rr.boxed_match(text, gold)[0] is boxed
    assert rr.answer_line_match(text, gold)[0] is line
    r = rr.score(text, gold)
    assert (r.score, r.reason) == (release, "correct" if release else "wrong")
    assert reward.score(text, gold).score == strict
    v = grading.grade_all("release")(text, gold)
    assert (v.primary.score, v.results["strict"].score) == (release, strict)


def test_string_scorer_facts():
    # `\boxed ` with a space wins over a later \boxed{..}
    assert rr.release_boxed("\\boxed 5$ then \\boxed{6}") == "5"
    assert rr.release_boxed("\\boxed{1} and \\boxed{\\frac{2}{3}}") == "\\frac{2}{3}"
    assert rr.release_boxed("\\boxed{12") is None  # unclosed
    # MATH normalisation
    assert rr._strip("0.5") == rr._strip("\\frac{1}{2}") == "\\frac{1}{2}"
    assert rr._strip("3/4") == "\\frac{3}{4}" and rr._strip("\\sqrt3") == "\\sqrt{3}"
    assert rr._strip("10\\text{ cm}") == "10" and rr._strip("30^\\circ") == "30" and rr._strip("50\\%") == "50"
    assert rr._equiv("\\frac", "\\frac") and not rr._equiv("\\frac", "\\frac ")  # an error: raw strings compared
    # Minerva normalisation
    assert rr._minerva_normalize("x = \\text{12 units}") == "12"
    assert rr._minerva_normalize("$\\boxed{7}$") == "7"
    # math_dapo reads only the last 300 characters
    assert rr.answer_line_match("Answer: 70\n" + "." * 400, "70")[0] is False
    assert rr.answer_line_match("." * 400 + "\nAnswer: 70", "70")[0] is True


def test_gold_candidates_as_the_release_builds_them():
    assert rr.gold_candidates("080") == ["080", "80", "\\boxed{80}"]
    assert rr.gold_candidates(" $5$ ") == ["$5$", "5", "\\boxed{$5$}"]
    assert rr.gold_candidates("-07") == ["-07", "-7", "\\boxed{-7}"]
    assert rr.gold_candidates("\\boxed{3}") == ["\\boxed{3}"]


def test_bad_ground_truth_is_a_data_error_and_bad_output_scores_zero():
    for gt in (None, float("nan"), "  "):
        with pytest.raises(reward.GroundTruthError):
            rr.score("\\boxed{1}", gt)
    assert rr.score(None, "1").score == 0.0


def test_math_verify_runs_under_the_pools_deadline():
    text = " ".join(f"x_{i} = {i}" for i in range(4000)) + " so the result follows."
    rr.score("warm the pool: 1", "1")
    r = rr.score(text, "123456789", timeout_s=1e-3)  # math-verify over 60k characters: far beyond 1 ms
    assert (r.score, r.reason) == (0.0, "timeout")
    assert rr.score("The final answer is $70$.", "70").score == 1.0  # the pool replaced the killed worker


# ----------------------------------------------------------------------------- selection and verl


@pytest.fixture(scope="module")
def paper():
    return load_experiment(CONFIG_DIR / "experiments" / "paper.yaml")


def test_paper_grades_with_the_release_toy_with_strict_and_the_key_is_validated(paper):
    cfg = resolve_run(paper, "qwen3_14b_ctpo", 0)
    assert cfg["reward"]["grader"] == "release"
    toy = load_experiment(CONFIG_DIR / "experiments" / "toy.yaml")
    assert resolve_run(toy, next(iter(toy["runs"])), 0)["reward"]["grader"] == "strict"
    strict = copy.deepcopy(paper)
    strict["defaults"]["reward"]["grader"] = "strict"
    s_cfg = resolve_run(strict, "qwen3_14b_ctpo", 0)
    assert run_identity(s_cfg)[0] != run_identity(cfg)[0]  # the grader is part of the run identity
    bad = copy.deepcopy(paper)
    bad["defaults"]["reward"]["grader"] = "lenient"
    with pytest.raises(ConfigError, match="reward.grader must be one of"):
        resolve_run(bad, "qwen3_14b_ctpo", 0)


def test_paper_runs_reward_loaded_by_verls_get_custom_reward_fn(paper, tmp_path):
    pytest.importorskip("verl")
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.reward import get_custom_reward_fn

    import verl
    from test_verl_backend import verl_argv

    config_dir = str(__import__("pathlib").Path(verl.__file__).parent / "trainer" / "config")
    fns = {}
    for grader in grading.GRADERS:
        exp = copy.deepcopy(paper)
        exp["defaults"]["reward"]["grader"] = grader
        cfg = load_run_config(resolve_run(exp, "qwen3_14b_ctpo", 0))
        argv = verl_argv(cfg, tmp_path / grader / "wd")
        assert argv[:3] == [sys.executable, "-m", "verl.trainer.main_ppo"]
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            fns[grader] = get_custom_reward_fn(compose("ppo_trainer", overrides=argv[3:]))
    for text, gold, _, _, release, strict in CASES:
        got = {g: fn(data_source="aime25", solution_str=text, ground_truth=gold, extra_info={})["score"]
               for g, fn in fns.items()}
        assert got == {"release": release, "strict": strict}, text


def test_table2_names_its_grader_and_gives_the_other_graders_average(tmp_path):
    import pandas as pd

    from ctpo.reports import tables
    from ctpo.reports.load import Results
    from ctpo.reports.synthetic import write_synthetic

    exp = load_experiment(CONFIG_DIR / "experiments" / "toy.yaml")
    exp["defaults"]["train"]["total_steps"] = exp["defaults"]["train"]["save_freq"]  # one evaluated step
    exp["defaults"]["train"]["dump_steps"] = [exp["defaults"]["train"]["save_freq"]]  # dumps within the run
    exp["defaults"]["reward"] = {"grader": "release"}
    exp["paper_reference"] = {}
    root = write_synthetic(exp, tmp_path / "toy_synthetic", n_problems=8, n_diag_sequences=16)
    t = tables.table2(exp, Results(root))
    assert "Grader: release (the authors' release" in t.caption and "Average (strict grader)" in t.columns
    col = t.columns.index("Average (strict grader)")
    benches, step = exp["evaluation"]["table2_benchmarks"], t.data[0]["step"]
    for row, rec in zip(t.rows, t.data):
        want = []
        for b in benches:
            df = pd.read_parquet(Results(root).tree.path("eval", run=rec["run"], seed=0, step=step, bench=b))
            assert (df["correct"] == df["correct_release"]).all()
            want.append(df.groupby("problem_id")["correct_strict"].mean().mean())
        assert rec["average_by_grader"]["strict"] == pytest.approx(np.mean(want))
        assert row[col] == f"{100 * np.mean(want):.1f}"


@pytest.mark.parametrize("text,failed,correct,strict", [
    ("I give up.", True, False, False),  # nothing to extract for either grader
    ("The answer is 10.", False, True, False),  # the release's grader reads it: not an extraction failure
    ("\\boxed{11}", False, False, False),  # a boxed wrong answer was extracted
])
def test_eval_record_has_both_verdicts_and_an_honest_extraction_flag(text, failed, correct, strict):
    from types import SimpleNamespace

    from ctpo.data.problems import Problem
    from ctpo.eval.runner import _record

    ep = SimpleNamespace(graded_text=text, turns=1, tool_calls=0, response_ids=[1, 2, 3])
    rec = _record(Problem("p0", "Add 5 and 5.", "10"), 0, ep, grading.grade_all("release"))
    assert (rec["extraction_failed"], rec["correct"], rec["correct_strict"]) == (failed, correct, strict)
    assert rec["grader"] == "release" and rec["correct_release"] == correct
