"""Problems of a verl-schema parquet (benchmarks, the toy task, DeepScaleR): one reader for every stage.

A row holds prompt [{role, content}] (the question is the last user message; the system prompt comes from
the TIR template at rollout), reward_model {ground_truth}, and an id (the `id` column, else
`extra_info.index`). Errors name the file, the row and what was expected.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd


class BenchmarkError(ValueError):
    """A benchmark parquet that does not follow verl's schema; the message names the file and column."""


@dataclass(frozen=True)
class Problem:
    problem_id: str
    question: str  # the user message (the system prompt comes from the TIR template)
    ground_truth: str


def _user_content(prompt, path: Path, row: int) -> str:
    try:
        messages = list(prompt)
        users = [m["content"] for m in messages if m["role"] == "user"]
    except (TypeError, KeyError) as e:
        raise BenchmarkError(f"{path}: row {row}: 'prompt' must be a list of {{role, content}} ({e})") from None
    if not users:
        raise BenchmarkError(f"{path}: row {row}: 'prompt' has no message with role 'user'")
    return str(users[-1])


def _ground_truth(rm: dict, path: Path, row: int) -> str:
    """The row's ground truth as text; a missing or empty one is an error of the data (never a match)."""
    gt = rm["ground_truth"]
    if gt is None or (isinstance(gt, float) and gt != gt) or not str(gt).strip():
        raise BenchmarkError(f"{path}: row {row}: 'reward_model.ground_truth' is missing or empty, got {gt!r}")
    return str(gt)


def load_benchmark(path: str | Path, max_problems: int | None = None) -> list[Problem]:
    """Problems of a verl-schema parquet: prompt [{role, content}], reward_model.ground_truth, and an id
    (the `id` column, else `extra_info.index`). The first `max_problems` rows in file order when set."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: benchmark file not found")
    df = pd.read_parquet(path)
    for col in ("prompt", "reward_model"):
        if col not in df.columns:
            raise BenchmarkError(f"{path}: missing column '{col}' (verl schema: prompt, reward_model, extra_info)")
    if "id" not in df.columns and "extra_info" not in df.columns:
        raise BenchmarkError(f"{path}: no problem id: expected column 'id' or 'extra_info.index'")
    if max_problems is not None:
        df = df.iloc[:max_problems]
    problems = []
    for i, row in enumerate(df.itertuples(index=False)):
        rm = row.reward_model
        if not isinstance(rm, dict) or "ground_truth" not in rm:
            raise BenchmarkError(f"{path}: row {i}: 'reward_model' must hold 'ground_truth'")
        if "id" in df.columns:
            pid = row.id
        else:
            info = row.extra_info
            if not isinstance(info, dict) or info.get("index") is None:
                raise BenchmarkError(f"{path}: row {i}: no 'id' column and no 'extra_info.index'")
            pid = info["index"]
        problems.append(Problem(str(pid), _user_content(row.prompt, path, i), _ground_truth(rm, path, i)))
    ids = [p.problem_id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise BenchmarkError(f"{path}: problem id '{dup}' occurs more than once")
    if not problems:
        raise BenchmarkError(f"{path}: no problems")
    return problems


def read_questions(path: str | Path) -> tuple[list[str], list[str]]:
    """(questions, ground_truths) of a verl-schema parquet, in file order."""
    problems = load_benchmark(path)
    return [p.question for p in problems], [p.ground_truth for p in problems]
