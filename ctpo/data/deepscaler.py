"""DeepScaleR-Preview (agentica-org/DeepScaleR-Preview-Dataset, 40,315 problems) -> verl train parquet.

Source: the Hugging Face dataset (via `datasets`, imported only then; pin `revision`) or a local
.parquet / .json (a JSON array, as the hub's deepscaler.json) / .jsonl file with columns
problem, answer[, solution]. Output rows match the benchmark files (ctpo.data.benchmarks):

    data_source   "agentica-org/DeepScaleR-Preview-Dataset"
    prompt        [{role: "user", content: <problem>}]   the problem text only, as in data/benchmarks/*;
                  the TIR instruction is the system prompt the chat template adds at rollout (configs/tir)
    ability       "math"
    reward_model  {style: "rule", ground_truth: <answer>}
    extra_info    {split, index}   index = the row's position in the source (stable across drops)

Rows whose answer (or problem) is missing or blank are dropped and counted. `expected_rows` checks the
source size before any drop, so a truncated download or a different revision fails loudly.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ctpo.data.benchmarks import DataError, check_verl_rows
from ctpo.io import write_parquet

HF_ID = "agentica-org/DeepScaleR-Preview-Dataset"
DATA_SOURCE = HF_ID
LOCAL_SUFFIXES = (".parquet", ".json", ".jsonl")
REQUIRED = ("problem", "answer")


def _blank(x) -> bool:
    if x is None:
        return True
    if isinstance(x, float) and math.isnan(x):
        return True
    return not str(x).strip()


def load_source(source: str, split: str = "train", revision: str | None = None):
    """A DataFrame with at least `problem` and `answer`, from a local file or the hub."""
    import pandas as pd

    path = Path(source)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise DataError(f"{path}: source file not found")
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        elif path.suffix == ".jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
        else:
            try:
                rows = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON array of {{problem, answer, solution}} objects")
            df = pd.DataFrame(rows)
    elif path.exists():
        raise DataError(f"{path}: unsupported source file type (expected one of {LOCAL_SUFFIXES})")
    else:
        import datasets  # lazy: only the hub path needs it

        df = datasets.load_dataset(source, split=split, revision=revision).to_pandas()
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing columns {missing} (expected problem, answer[, solution])")
    return df


def to_verl(df, split: str = "train"):
    """(verl DataFrame, counts) from a problem/answer DataFrame; drops rows without an answer/problem."""
    import pandas as pd

    no_answer = df["answer"].map(_blank)
    no_problem = df["problem"].map(_blank) & ~no_answer
    keep = ~(no_answer | no_problem)
    rows = []
    for index, problem, answer in zip(df.index[keep], df["problem"][keep], df["answer"][keep]):
        idx = int(df.index.get_loc(index))
        rows.append({
            "id": str(idx),
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": str(problem)}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(answer).strip()},
            "extra_info": {"split": split, "index": idx},
        })
    counts = {
        "source_rows": int(len(df)),
        "dropped_no_answer": int(no_answer.sum()),
        "dropped_no_problem": int(no_problem.sum()),
        "rows": len(rows),
    }
    return pd.DataFrame(rows), counts


def prepare(source: str, out: str | Path, expected_rows: int | None = None, split: str = "train",
            revision: str | None = None) -> dict:
    """Load, check the size, convert, validate and write `out` atomically; returns the counts."""
    df = load_source(source, split=split, revision=revision).reset_index(drop=True)
    if expected_rows is not None and len(df) != expected_rows:
        raise DataError(
            f"{source}: {len(df)} rows, expected {expected_rows} (data.deepscaler.expected_rows); "
            f"wrong revision or an incomplete file"
        )
    verl_df, counts = to_verl(df, split=split)
    check_verl_rows(verl_df, f"{out} (from {source})")
    write_parquet(out, verl_df)
    return {"source": source, "revision": revision, "out": str(out), **counts}
