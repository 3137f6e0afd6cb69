"""DeepScaleR-Preview (agentica-org/DeepScaleR-Preview-Dataset, 40,315 problems) -> verl train parquet.

Source: the Hugging Face dataset (via `datasets`, imported only then; pin `revision`) or a local
.parquet / .json (a JSON array, as the hub's deepscaler.json) / .jsonl file with columns
problem, answer[, solution], or a verl train parquet (prompt, reward_model), such as the release's own
`dataset/deepscaler/train.parquet` (`from_verl_rows`; it has not been compared with the hub revision). Output rows match the benchmark files (ctpo.data.benchmarks):

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
    if not set(REQUIRED) <= set(df.columns) and {"prompt", "reward_model"} <= set(df.columns):
        df = from_verl_rows(df, source)  # a verl train parquet, e.g. the release's dataset/deepscaler/train.parquet
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing columns {missing} (expected problem, answer[, solution], or a verl "
                        f"parquet with prompt and reward_model)")
    return df


def from_verl_rows(df, source: str):
    """problem / answer from a verl-schema DataFrame: the problem is the content of the last `user` message of
    `prompt` (a system message is dropped: our chat template adds its own), the answer `reward_model.ground_truth`.
    The user message is taken as it is; any instruction text the file put there stays in the problem."""
    import pandas as pd

    def user_text(prompt) -> str | None:
        msgs = [m for m in (list(prompt) if prompt is not None else []) if isinstance(m, dict) and m.get("role") == "user"]
        return msgs[-1].get("content") if msgs else None

    def truth(rm):
        return rm.get("ground_truth") if isinstance(rm, dict) else None

    out = pd.DataFrame({"problem": df["prompt"].map(user_text), "answer": df["reward_model"].map(truth)}, index=df.index)
    if out["problem"].isna().all():
        raise DataError(f"{source}: verl parquet without a `user` message in any prompt")
    return out


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
