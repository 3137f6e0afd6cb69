"""Benchmark parquet files (data/benchmarks/{name}.parquet): checksum + schema verification.

Each file is in verl's RL dataset schema, one row per problem:
    id            str, unique
    data_source   str (e.g. math-ai/aime25, MathArena/brumo_2025)
    prompt        [{role: "user", content: <the problem text>}]   (system prompt: chat template at rollout)
    ability       "math"
    reward_model  {style: "rule", ground_truth: <answer>}
    extra_info    {split, index}
The sha256 of every file is pinned in the experiment YAML under `data.checksums.<name>`; a mismatch
means the benchmark changed (pain point 16: benchmark copies with errors) and stops the pipeline.
"""
from __future__ import annotations

from pathlib import Path

from ctpo.config import REPO_ROOT
from ctpo.io import sha256_file

BENCHMARK_DIR = REPO_ROOT / "data" / "benchmarks"
VERL_COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info")
BENCHMARK_COLUMNS = ("id", *VERL_COLUMNS)


class DataError(ValueError):
    """Bad data: the message names the file (and row / key) and what was expected."""


def check_verl_rows(df, source: str, columns: tuple[str, ...] = VERL_COLUMNS) -> None:
    """Raise DataError (naming `source` and the row) unless `df` holds verl RL rows as documented above."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing columns {missing} (expected {list(columns)})")
    if len(df) == 0:
        raise DataError(f"{source}: no rows")
    for i, (prompt, rm, ability) in enumerate(zip(df["prompt"], df["reward_model"], df["ability"])):
        msgs = list(prompt) if prompt is not None else []
        if len(msgs) != 1 or not isinstance(msgs[0], dict) or msgs[0].get("role") != "user":
            raise DataError(f"{source}: row {i}: prompt must be one message [{{role: user, content}}], got {prompt!r}"[:300])
        content = msgs[0].get("content")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{source}: row {i}: prompt content must be a non-empty string")
        gt = rm.get("ground_truth") if isinstance(rm, dict) else None
        if not isinstance(gt, str) or not gt.strip() or rm.get("style") != "rule":
            raise DataError(f"{source}: row {i}: reward_model must be {{style: rule, ground_truth: <non-empty str>}}, got {rm!r}")
        if ability != "math":
            raise DataError(f"{source}: row {i}: ability must be 'math', got {ability!r}")
    if "id" in columns and df["id"].duplicated().any():
        dup = df["id"][df["id"].duplicated()].iloc[0]
        raise DataError(f"{source}: column id must be unique, '{dup}' repeats")


def _display(path: Path) -> str:
    """Repository-relative when inside the repository (manifests stay machine-independent)."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def verify_benchmark(path: str | Path, expected_sha256: str) -> dict:
    """Checksum first (cheap, decisive), then schema. Returns the manifest entry."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: benchmark file not found")
    digest = sha256_file(path)
    if digest != expected_sha256:
        raise DataError(f"{path}: sha256 {digest} does not match the pinned {expected_sha256} (data.checksums)")
    df = pd.read_parquet(path)
    check_verl_rows(df, str(path), BENCHMARK_COLUMNS)
    return {
        "path": _display(path),
        "sha256": digest,
        "rows": int(len(df)),
        "data_source": sorted(set(map(str, df["data_source"]))),
    }


def verify_all(experiment: dict, data_dir: str | Path = BENCHMARK_DIR) -> dict:
    """Verify every benchmark named in `data.benchmarks` against `data.checksums`; returns the manifest."""
    name = experiment.get("experiment", "?")
    data = experiment.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise DataError(f"experiment '{name}': data.benchmarks must be a list of benchmark names")
    checksums = data.get("checksums")
    if not isinstance(checksums, dict):
        raise DataError(f"experiment '{name}': data.checksums must map each benchmark to its sha256")
    unpinned = [b for b in data["benchmarks"] if b not in checksums]
    if unpinned:
        raise DataError(f"experiment '{name}': data.checksums has no sha256 for {unpinned}")
    entries = {b: verify_benchmark(Path(data_dir) / f"{b}.parquet", checksums[b]) for b in data["benchmarks"]}
    return {"experiment": name, "benchmarks": entries}
