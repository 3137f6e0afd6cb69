"""The toy task: multi-digit integer arithmetic that a tiny model cannot do in its head, but can do by
calling the Python sandbox and copying the printed result into ``\\boxed{}``.

Two difficulty levels (both written in verl's parquet schema, as the real benchmarks):

- ``toy_arith`` (the training distribution): ``a*b`` with a of 4 digits, b of 3 digits, a 7-digit product.
- ``toy_arith_hard``: ``a*b`` with a of 5 digits, b of 4 digits, a 9-digit product: longer numbers to
  copy than any training question (a length-generalisation test for the tiny model).

Questions read "Compute 4821*377." and the ground truth is the exact integer as a string. Test
questions never occur in the training set (checked). `demo_turns` gives the tool-use demonstration
the SFT warm start learns from: a fenced Python block printing the expression, then (after the
sandbox's observation) the boxed answer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

TOY_SOURCE = "ctpo/toy_arith"
ABILITY = "math"
TRAIN_FILE = "train.parquet"
BENCHMARKS = ("toy_arith", "toy_arith_hard")
# level -> (digits of a, digits of b, digits of a*b). Fixed widths: every question of a level has the
# same layout, so the tiny model can learn to copy digits by relative position within a short SFT.
LEVELS = {"toy_arith": (4, 3, 7), "toy_arith_hard": (5, 4, 9)}


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem: `expression` (Python syntax), its `answer` (exact integer)."""

    expression: str
    answer: int

    @property
    def question(self) -> str:
        return f"Compute {self.expression}."

    @property
    def ground_truth(self) -> str:
        return str(self.answer)


def sample_problem(rng: random.Random, level: str) -> Problem:
    """Draw one problem of difficulty `level` ('toy_arith' or 'toy_arith_hard')."""
    if level not in LEVELS:
        raise ValueError(f"toy task level must be one of {BENCHMARKS}, got '{level}'")
    a_digits, b_digits, product_digits = LEVELS[level]
    while True:
        a = rng.randint(10 ** (a_digits - 1), 10**a_digits - 1)
        b = rng.randint(10 ** (b_digits - 1), 10**b_digits - 1)
        if len(str(a * b)) == product_digits:
            return Problem(expression=f"{a}*{b}", answer=a * b)


def sample_problems(n: int, level: str, seed: int, exclude: set[str] | frozenset = frozenset()) -> list[Problem]:
    """`n` distinct problems of `level`, none of whose expressions is in `exclude`."""
    rng = random.Random(f"{seed}:{level}")
    out: list[Problem] = []
    seen = set(exclude)
    while len(out) < n:
        p = sample_problem(rng, level)
        if p.expression in seen:
            continue
        seen.add(p.expression)
        out.append(p)
    return out


def demo_turns(problem: Problem) -> tuple[str, str]:
    """The two model turns of a tool-use demonstration: the code block (ending with the TIR stop string
    "\\n```\\n"), then, after the sandbox's observation, the boxed answer (the caller appends EOS)."""
    code_turn = f"```python\nprint({problem.expression})\n```\n"
    answer_turn = f"\\boxed{{{problem.answer}}}"
    return code_turn, answer_turn


def to_frame(problems: list[Problem], split: str, data_source: str):
    """Problems as a DataFrame in verl's parquet schema (the layout of data/benchmarks/*.parquet)."""
    import pandas as pd

    return pd.DataFrame(
        {
            "id": [f"{data_source}-{i}" for i in range(len(problems))],
            "data_source": [f"{TOY_SOURCE}/{data_source}"] * len(problems),
            "prompt": [[{"role": "user", "content": p.question}] for p in problems],
            "ability": [ABILITY] * len(problems),
            "reward_model": [{"style": "rule", "ground_truth": p.ground_truth} for p in problems],
            "extra_info": [{"split": split, "index": i} for i in range(len(problems))],
        }
    )


def write_toy_data(out_dir: str | Path, n_train: int, n_test: int, seed: int) -> dict[str, Path]:
    """Write train.parquet, toy_arith.parquet, toy_arith_hard.parquet under `out_dir`; return name -> path.

    The test sets are drawn first and excluded from the training set, so no test question is trained on.
    """
    from ctpo.io import write_parquet

    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"write_toy_data: n_train and n_test must be positive, got {n_train}, {n_test}")
    out_dir = Path(out_dir)
    tests = {name: sample_problems(n_test, name, seed + 1) for name in BENCHMARKS}
    held_out = {p.expression for probs in tests.values() for p in probs}
    train = sample_problems(n_train, "toy_arith", seed, exclude=held_out)
    paths = {"train": out_dir / TRAIN_FILE}
    write_parquet(paths["train"], to_frame(train, "train", "train"))
    for name, probs in tests.items():
        paths[name] = out_dir / f"{name}.parquet"
        write_parquet(paths[name], to_frame(probs, "test", name))
    return paths


