"""The synthetic toy task: verl parquet layout, exact answers, held-out sets, demonstrations."""
import re

import pandas as pd
import pytest

from ctpo.data.problems import BenchmarkError, read_questions
from ctpo.data.toy_task import demo_turns, sample_problems, write_toy_data


def test_write_toy_data_matches_benchmark_parquet_layout(tmp_path):
    paths = write_toy_data(tmp_path, n_train=50, n_test=10, seed=3)
    assert set(paths) == {"train", "toy_arith", "toy_arith_hard"}
    assert paths["train"] == tmp_path / "train.parquet"
    ref = pd.read_parquet("data/benchmarks/aime25.parquet")
    for name, n in (("train", 50), ("toy_arith", 10), ("toy_arith_hard", 10)):
        df = pd.read_parquet(paths[name])
        assert list(df.columns) == list(ref.columns)
        assert len(df) == n
        row = df.iloc[0]
        msgs = list(row["prompt"])
        assert [set(m) for m in msgs] == [{"role", "content"}] and msgs[0]["role"] == "user"
        assert set(row["reward_model"]) == {"style", "ground_truth"} and row["reward_model"]["style"] == "rule"
        assert set(row["extra_info"]) == {"split", "index"}
        assert list(df["extra_info"].map(lambda e: e["index"])) == list(range(n))


def test_ground_truth_is_the_exact_value_of_the_question(tmp_path):
    paths = write_toy_data(tmp_path, n_train=40, n_test=20, seed=0)
    for name in paths:
        questions, truths = read_questions(paths[name])
        for q, t in zip(questions, truths):
            m = re.fullmatch(r"Compute ([0-9+\-*]+)\.", q)
            assert m, q
            # independent evaluation: left-to-right with * before +/-, by hand
            terms = re.findall(r"[+-]?[0-9]+(?:\*[0-9]+)*", m.group(1))
            total = 0
            for term in terms:
                sign = -1 if term.startswith("-") else 1
                prod = 1
                for f in term.lstrip("+-").split("*"):
                    prod *= int(f)
                total += sign * prod
            assert int(t) == total, (q, t)


def test_test_questions_never_appear_in_training_set(tmp_path):
    paths = write_toy_data(tmp_path, n_train=300, n_test=100, seed=7)
    train_q = set(read_questions(paths["train"])[0])
    for name in ("toy_arith", "toy_arith_hard"):
        qs = read_questions(paths[name])[0]
        assert len(set(qs)) == len(qs)
        assert not train_q & set(qs)


def test_levels_have_fixed_widths_and_hard_is_longer():
    easy = sample_problems(200, "toy_arith", seed=1)
    hard = sample_problems(200, "toy_arith_hard", seed=1)
    for p in easy:
        a, b = p.expression.split("*")
        assert (len(a), len(b), len(str(p.answer))) == (4, 3, 7) and int(a) * int(b) == p.answer
    for p in hard:
        a, b = p.expression.split("*")
        assert (len(a), len(b), len(str(p.answer))) == (5, 4, 9) and int(a) * int(b) == p.answer


def test_sampling_is_deterministic_per_seed():
    assert sample_problems(30, "toy_arith", seed=5) == sample_problems(30, "toy_arith", seed=5)
    assert sample_problems(30, "toy_arith", seed=5) != sample_problems(30, "toy_arith", seed=6)


def test_demo_prints_the_expression_and_boxes_the_answer():
    p = sample_problems(1, "toy_arith", seed=2)[0]
    code, answer = demo_turns(p)
    assert code == f"```python\nprint({p.expression})\n```\n"
    assert answer == "\\boxed{" + str(p.answer) + "}"


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="n_train and n_test must be positive"):
        write_toy_data(tmp_path, n_train=0, n_test=5, seed=0)
    with pytest.raises(ValueError, match="level must be one of"):
        sample_problems(1, "toy_geometry", seed=0)
    with pytest.raises(BenchmarkError, match="missing.parquet: benchmark file not found"):
        read_questions(tmp_path / "missing.parquet")
