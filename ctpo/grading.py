"""Which grader scores a run: `reward.grader` (ctpo.config.RewardConfig), one of GRADERS.

    strict   ctpo.reward: the last complete \\boxed{} checked by math-verify, strict relation rules (ours)
    release  ctpo.release_reward: the authors' release (any of last-\\boxed strings, an `Answer:` line, or
             math-verify over the whole response); the paper experiment's grader

Both run their math-verify checks in ctpo.reward's bounded-time worker pool. No heavy imports here: ctpo.config
validates against GRADERS.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

GRADERS = ("release", "strict")
DESCRIPTIONS = {  # for table captions
    "release": "the authors' release: correct if the last \\boxed{} matches as a string, an 'Answer:' line matches, "
               "or math-verify finds the answer anywhere in the response, tool outputs included",
    "strict": "ours: the last complete \\boxed{} checked by math-verify, strict relation rules",
}
_MODULES = {"strict": "ctpo.reward", "release": "ctpo.release_reward"}


def module(grader: str) -> str:
    """The grader's module (its `score` and verl's `compute_score`); ValueError naming reward.grader otherwise."""
    if grader not in _MODULES:
        raise ValueError(f"reward.grader: expected one of {', '.join(GRADERS)}, got {grader!r}")
    return _MODULES[grader]


def score_fn(grader: str) -> Callable:
    """`score(response, ground_truth) -> ctpo.reward.RewardResult` of the grader."""
    return importlib.import_module(module(grader)).score


def other(grader: str) -> str:
    """The grader beside `grader` (evaluation records both)."""
    module(grader)
    return next(g for g in GRADERS if g != grader)


@dataclass(frozen=True)
class Verdicts:
    """Every grader's verdict on one response; `grader` is the run's (its verdict is the sample's `correct`)."""

    grader: str
    results: dict  # grader name -> ctpo.reward.RewardResult, one per GRADERS

    @property
    def primary(self):
        return self.results[self.grader]


def grade_all(grader: str) -> Callable[[str, object], Verdicts]:
    """`grade(response, ground_truth) -> Verdicts`: both graders' verdicts, `grader` the run's (evaluation)."""
    fns = {g: score_fn(g) for g in GRADERS}
    module(grader)

    def grade(response: str, ground_truth) -> Verdicts:
        return Verdicts(grader, {g: f(response, ground_truth) for g, f in fns.items()})

    return grade


def correct_column(grader: str) -> str:
    """The evaluation records' column with `grader`'s verdict (ctpo.schema.EVAL_COLUMNS)."""
    module(grader)
    return f"correct_{grader}"
