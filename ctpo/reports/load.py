"""Read an experiment and its results/ tree (paths from ctpo.layout) for the tables and figures.

Every input a table or figure needs is required: a missing file raises ReportInputError naming it
(no silently empty cells or panels). Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pyarrow.lib import ArrowException

from ctpo import layout, methods
from ctpo.config import ConfigError, load_experiment
from ctpo.eval.metrics import EvalDataError, check_k_samples, correct_counts
from ctpo.io import read_json, read_jsonl
from ctpo.run_health import degenerate_reward

MODEL_NAMES = {"qwen3_4b": "Qwen3-4B", "qwen3_14b": "Qwen3-14B", "toy": "toy-qwen3"}
REQUIRED_SECTIONS = ("experiment", "label", "seeds", "runs", "evaluation", "diagnostics")
# evaluation.exclude_degenerate (optional, default false): leave runs that learned nothing (reward 0, or 1, at
# every step; ctpo.run_health) out of the tables' means and intervals. Flagged in the captions either way.
EXCLUDE_DEGENERATE = "exclude_degenerate"
EVALUATION_KEYS = ("table2_benchmarks", "table2_runs", "table3_runs", "figure2_benchmark", "figure2_runs")


class ReportInputError(ValueError):
    """A missing or malformed report input; the message names the file (or experiment key)."""


def read_experiment(path: str | Path) -> dict:
    """An experiment (.yaml or .json) with the sections the reports need; raises naming the missing key."""
    path = Path(path)
    try:
        exp = load_experiment(path)
    except ConfigError as e:
        raise ReportInputError(str(e)) from None
    for key in REQUIRED_SECTIONS:
        if key not in exp:
            raise ReportInputError(f"{path}: missing key '{key}'")
    for key in EVALUATION_KEYS:
        if key not in exp["evaluation"]:
            raise ReportInputError(f"{path}: missing key 'evaluation.{key}'")
    runs = set(exp["runs"])
    named = [*exp["evaluation"]["table2_runs"], *exp["evaluation"]["table3_runs"], *exp["evaluation"]["figure2_runs"],
             exp["diagnostics"]["run"]]
    for run in named:
        if run not in runs:
            raise ReportInputError(f"{path}: run '{run}' is used by evaluation/diagnostics but not under 'runs'")
    exp.setdefault("paper_reference", {})
    exp.setdefault("assumptions", {})
    exclude_degenerate(exp, str(path))
    return exp


def exclude_degenerate(exp: dict, source: str = "experiment") -> bool:
    """evaluation.exclude_degenerate: optional, false when absent (workflow/schemas/config.schema.yaml)."""
    value = exp["evaluation"].get(EXCLUDE_DEGENERATE, False)
    if not isinstance(value, bool):
        raise ReportInputError(f"{source}: evaluation.{EXCLUDE_DEGENERATE} must be true or false, got {value!r}")
    return value


def is_toy(exp: dict) -> bool:
    return exp["label"] != "paper"


def label_tag(exp: dict) -> str:
    """The tag every title / caption / header carries: 'TOY' for toy scale, the label otherwise."""
    return exp["label"].upper() if is_toy(exp) else "paper setup, our runs"


def run_title(exp: dict, run: str) -> str:
    spec = exp["runs"][run]
    return f"{MODEL_NAMES.get(spec['model'], spec['model'])} {methods.display_name(spec['method'])}"


@dataclass
class EvalResult:
    """One (run, seed, step, benchmark): per-problem fraction correct, aligned by sorted problem_id."""

    problem_ids: np.ndarray  # (P,)
    scores: np.ndarray  # (P,) c_i / k
    k: int
    source: str


class Results:
    """Accessors over results/{exp}/ (`root`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.tree = layout.results(root)
        if not self.root.is_dir():
            raise ReportInputError(f"{self.root}: results directory not found")

    def _need(self, path: Path) -> Path:
        if not path.exists():
            raise ReportInputError(f"{path}: missing report input")
        return path

    def eval_dir(self, run: str, seed: int) -> Path:
        return self.tree.path("eval_dir", run=run, seed=seed)

    def eval_steps(self, run: str, seed: int) -> list[int]:
        d = self._need(self.eval_dir(run, seed))
        steps = self.tree.steps("eval_step_dir", run=run, seed=seed)
        if not steps:
            raise ReportInputError(f"{d}: no step<N>/ evaluation directories")
        return steps

    def final_step(self, runs: list[str], seeds: list[int]) -> int:
        """The last step evaluated by every (run, seed) in `runs` x `seeds` (tables compare like with like)."""
        return min(self.eval_steps(r, s)[-1] for r in runs for s in seeds)

    def eval_grader(self, run: str, seed: int, step: int, bench: str) -> str | None:
        """The grader whose verdicts an evaluation's `correct` holds (None: a sidecar from before ctpo.grading)."""
        meta = read_json(self._need(self.tree.path("eval_json", run=run, seed=seed, step=step, bench=bench)))
        return meta.get("grader")

    def eval_result(self, run: str, seed: int, step: int, bench: str, column: str = "correct") -> EvalResult:
        """`column`: "correct" (the run's grader) or a `ctpo.grading.correct_column(grader)`."""
        where = dict(run=run, seed=seed, step=step, bench=bench)
        pq, meta_path = self._need(self.tree.path("eval", **where)), self._need(self.tree.path("eval_json", **where))
        meta = read_json(meta_path)
        if "k" not in meta:
            raise ReportInputError(f"{meta_path}: missing key 'k'")
        try:
            records = pd.read_parquet(pq, columns=["problem_id", "sample_index", column])
        except (KeyError, ValueError, ArrowException) as e:
            raise ReportInputError(f"{pq}: no column '{column}' ({type(e).__name__}); rerun the evaluation") from None
        records = records.rename(columns={column: "correct"})
        try:
            check_k_samples(records, int(meta["k"]), str(pq))
        except EvalDataError as e:
            raise ReportInputError(str(e)) from None
        counts = correct_counts(records)
        return EvalResult(counts["problem_id"].to_numpy(), counts["c"].to_numpy() / meta["k"], int(meta["k"]), str(pq))

    def seed_scores(self, run: str, seeds: list[int], step: int, bench: str, column: str = "correct") -> np.ndarray:
        """(S, P) per-problem scores of each seed, problems aligned; problem sets must agree across seeds."""
        res = [self.eval_result(run, s, step, bench, column) for s in seeds]
        for r in res[1:]:
            if not np.array_equal(r.problem_ids, res[0].problem_ids):
                raise ReportInputError(f"{r.source}: problem set differs from {res[0].source}")
        return np.stack([r.scores for r in res])

    def metrics(self, run: str, seed: int) -> pd.DataFrame:
        path = self._need(self.tree.path("metrics", run=run, seed=seed))
        rows = read_jsonl(path)
        if not rows:
            raise ReportInputError(f"{path}: no rows")
        df = pd.DataFrame(rows)
        if "step" not in df:
            raise ReportInputError(f"{path}: rows lack the 'step' key")
        df.attrs["source"] = str(path)
        return df.sort_values("step")

    def degenerate(self, run: str, seed: int) -> str | None:
        """Why (run, seed) learned nothing (ctpo.run_health: reward 0, or 1, at every step), from its
        metrics.jsonl; None when its reward moved."""
        return degenerate_reward(read_jsonl(self._need(self.tree.path("metrics", run=run, seed=seed))))

    def diagnostics(self, run: str, seed: int, step: int) -> tuple[pd.DataFrame, dict]:
        where = dict(run=run, seed=seed, step=step)
        pq, js = self._need(self.tree.path("diag", **where)), self._need(self.tree.path("diag_json", **where))
        return pd.read_parquet(pq), read_json(js)

    def table1(self) -> dict:
        return read_json(self._need(self.tree.path("table1")))
