"""Draw k samples per benchmark problem through the TIR agent loop, score them, and keep them resumably.

The (problem, sample_index) pairs of one evaluation, in problem-major order, are cut into fixed chunks of
`chunk_size` pairs. Each chunk is one batched `run_episodes` call whose sampling seed is a hash of
(cfg.seed, step, benchmark, the chunk's first (problem, sample_index)). The chunking depends only on the
problem list, k and chunk_size, so every pair is always drawn in the same batch with the same seed:
an interrupted evaluation that resumes from `<out>.partial.parquet` gives the same records as an
uninterrupted one. The partial file carries a fingerprint of everything that changes samples (checkpoint,
benchmark, sampling, rollout config, seed, backend, chunking); a partial file with another fingerprint is
discarded, never mixed in.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from ctpo.data.problems import BenchmarkError, Problem, load_benchmark  # noqa: F401  (the evaluator reads benchmarks)
from ctpo.grading import correct_column
from ctpo.io import atomic_path
from ctpo.progress import Progress
from ctpo.schema import EVAL_COLUMNS

log = logging.getLogger(__name__)

FINGERPRINT_KEY = b"ctpo_eval_fingerprint"
# Redraws of samples whose episode still ended in infra after the sandbox call's own retries
# (ctpo.agent.turns.INFRA_RETRIES); infra is never a model error.
INFRA_REDRAWS = 2


# ----------------------------------------------------------------------------- chunks and seeds

Pair = tuple[int, int]  # (index into the problem list, sample_index)


def plan_chunks(n_problems: int, k: int, chunk_size: int) -> list[list[Pair]]:
    """All (problem, sample) pairs in problem-major order, cut into consecutive chunks of `chunk_size`."""
    if chunk_size < 1:
        raise ValueError(f"eval.chunk_size must be >= 1, got {chunk_size}")
    pairs = [(p, j) for p in range(n_problems) for j in range(k)]
    return [pairs[i : i + chunk_size] for i in range(0, len(pairs), chunk_size)]


def derive_seed(*parts) -> int:
    """A 31-bit seed from the parts' text (stable across processes and platforms, unlike hash())."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- partial results


def empty_records() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in EVAL_COLUMNS.items()})


def as_records(rows: Sequence[dict] | pd.DataFrame) -> pd.DataFrame:
    """Exactly the EVAL_COLUMNS, in order, with their dtypes."""
    df = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows
    if len(df) == 0:
        return empty_records()
    return df[list(EVAL_COLUMNS)].astype(EVAL_COLUMNS).reset_index(drop=True)


def partial_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".partial.parquet")


def write_partial(path: Path, records: pd.DataFrame, fp: str) -> None:
    """Records so far plus the run's fingerprint (parquet schema metadata), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(as_records(records), preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), FINGERPRINT_KEY: fp.encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_partial(path: Path, fp: str) -> pd.DataFrame:
    """Finished records of an interrupted run with the same fingerprint; empty otherwise (stale files ignored)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return empty_records()
    try:
        table = pq.read_table(path)
    except Exception as e:  # a foreign or corrupt file: never trusted, redrawn
        log.warning("%s: unreadable partial results (%s); starting over", path, e)
        return empty_records()
    found = (table.schema.metadata or {}).get(FINGERPRINT_KEY, b"").decode()
    if found != fp:
        log.warning("%s: partial results from a different evaluation setup; starting over", path)
        return empty_records()
    return as_records(table.to_pandas())


# ----------------------------------------------------------------------------- drawing samples


@dataclass(frozen=True)
class EvalPlan:
    """What one evaluation draws. `sampling` builds ctpo.agent.SamplingParams from a seed."""

    problems: list[Problem]
    k: int
    chunk_size: int
    seed_parts: tuple  # (cfg.seed, step, benchmark): chunk seeds derive from these
    fingerprint: str

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"eval.k must be >= 1, got {self.k}")
        if self.chunk_size < 1:
            raise ValueError(f"eval.chunk_size must be >= 1, got {self.chunk_size}")


def _record(problem: Problem, sample_index: int, episode, grade_fn: Callable) -> dict:
    verdicts = grade_fn(episode.graded_text, problem.ground_truth)  # ctpo.grading.Verdicts
    result = verdicts.primary
    # no answer to extract: no complete \boxed{} (the strict grader's no_answer) and no credit from the run's grader
    # (the release's grader never says no_answer: its math-verify reads the whole response)
    failed = verdicts.results["strict"].reason == "no_answer" and float(result.score) < 1.0
    return {
        "problem_id": problem.problem_id,
        "sample_index": sample_index,
        "ground_truth": problem.ground_truth,
        "extracted_answer": "" if failed else str(result.extracted),
        "extraction_failed": failed,
        "correct": float(result.score) >= 1.0,
        "grader": verdicts.grader,
        **{correct_column(g): float(r.score) >= 1.0 for g, r in verdicts.results.items()},
        "turns": int(episode.turns),
        "tool_calls": int(episode.tool_calls),
        "response_length": len(episode.response_ids),
    }


def _draw(pairs: list[Pair], seed: int, plan: EvalPlan, rollout: Callable) -> list:
    """Episodes for `pairs`; samples whose sandbox failed for infrastructure reasons are redrawn."""
    episodes = rollout([plan.problems[p].question for p, _ in pairs], seed)
    if len(episodes) != len(pairs):
        raise RuntimeError(f"the agent loop returned {len(episodes)} episodes for {len(pairs)} questions")
    for attempt in range(1, INFRA_REDRAWS + 1):
        bad = [i for i, ep in enumerate(episodes) if ep.infra_failures > 0]
        if not bad:
            break
        log.warning("redrawing %d samples after sandbox infrastructure failures (attempt %d)", len(bad), attempt)
        redo = rollout([plan.problems[pairs[i][0]].question for i in bad], derive_seed(seed, "infra", attempt))
        for i, ep in zip(bad, redo):
            episodes[i] = ep
    still = sum(ep.infra_failures > 0 for ep in episodes)
    if still:
        raise RuntimeError(
            f"{still} samples kept failing in the sandbox infrastructure after {INFRA_REDRAWS} redraws; "
            "finished chunks are kept in the partial file; fix the sandbox and rerun"
        )
    return episodes


def evaluate(
    plan: EvalPlan,
    rollout: Callable[[list[str], int], list],
    grade_fn: Callable,
    partial: Path,
) -> pd.DataFrame:
    """All k samples of every problem as records (EVAL_COLUMNS), resuming from and updating `partial`.

    rollout(questions, seed) -> list[Episode] runs one batch through the agent loop (see __main__);
    grade_fn(solution_text, ground_truth) -> ctpo.grading.Verdicts (`grading.grade_all`): every grader's verdict.
    Returns records sorted by problem order, sample.
    """
    done = read_partial(partial, plan.fingerprint)
    index = {p.problem_id: i for i, p in enumerate(plan.problems)}
    done = done[done["problem_id"].isin(index) & (done["sample_index"] < plan.k)]
    done_pairs = {(index[pid], int(j)) for pid, j in zip(done["problem_id"], done["sample_index"])}
    frames = [done]
    chunks = plan_chunks(len(plan.problems), plan.k, plan.chunk_size)
    todo = [c for c in chunks if not set(c) <= done_pairs]
    if done_pairs:
        log.info("resuming: %d samples done, %d of %d chunks to draw", len(done_pairs), len(todo), len(chunks))
    total = len(plan.problems) * plan.k
    n_done = len(done_pairs)
    clock = Progress(total, start=n_done, unit="samples")
    for i, chunk in enumerate(todo, start=len(chunks) - len(todo) + 1):
        p0, j0 = chunk[0]
        seed = derive_seed(*plan.seed_parts, plan.problems[p0].problem_id, j0)
        episodes = _draw(chunk, seed, plan, rollout)
        rows = [
            _record(plan.problems[p], j, ep, grade_fn)
            for (p, j), ep in zip(chunk, episodes)
            if (p, j) not in done_pairs
        ]
        frames.append(as_records(rows))
        write_partial(partial, pd.concat(frames, ignore_index=True), plan.fingerprint)
        n_done += len(rows)
        log.info("chunk %d/%d done: %s", i, len(chunks), clock.line(n_done))
    records = as_records(pd.concat(frames, ignore_index=True))
    order = records["problem_id"].map(index)
    return records.assign(_o=order).sort_values(["_o", "sample_index"]).drop(columns="_o").reset_index(drop=True)
