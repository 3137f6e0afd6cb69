"""DeepScaleR -> verl parquet conversion and benchmark checksum/schema verification (no network)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from ctpo.config import load_experiment
from ctpo.data.__main__ import main as data_main
from ctpo.data.benchmarks import DataError, verify_all, verify_benchmark
from ctpo.data.deepscaler import prepare

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "deepscaler_small.json"
PAPER = ROOT / "configs" / "experiments" / "paper.yaml"
BENCH_DIR = ROOT / "data" / "benchmarks"


def _expected_rows(raw: list[dict]) -> list[tuple[int, str, str]]:
    """(source index, problem, stripped answer) of the rows that should survive, by a plain loop."""
    keep = []
    for i, r in enumerate(raw):
        ans, prob = r.get("answer"), r.get("problem")
        if ans is None or not str(ans).strip() or prob is None or not str(prob).strip():
            continue
        keep.append((i, prob, str(ans).strip()))
    return keep


def test_deepscaler_json_converts_to_verl_rows_and_drops_unanswered(tmp_path):
    raw = json.loads(FIXTURE.read_text())
    out = tmp_path / "train.parquet"
    summary = prepare(str(FIXTURE), out, expected_rows=len(raw))
    expected = _expected_rows(raw)
    df = pd.read_parquet(out)
    assert len(df) == len(expected) == 4
    assert summary["source_rows"] == 7
    assert summary["dropped_no_answer"] == 2  # null and blank answers
    assert summary["dropped_no_problem"] == 1
    assert summary["rows"] == 4
    for (idx, problem, answer), (_, row) in zip(expected, df.iterrows()):
        assert list(row["prompt"]) == [{"role": "user", "content": problem}]  # problem text only, like benchmarks
        assert row["reward_model"] == {"style": "rule", "ground_truth": answer}
        assert row["extra_info"] == {"split": "train", "index": idx}
        assert row["ability"] == "math"
        assert row["data_source"] == "agentica-org/DeepScaleR-Preview-Dataset"
    # same columns and nested layout as the benchmark files
    bench = pd.read_parquet(BENCH_DIR / "aime25.parquet")
    assert set(bench.columns) <= set(df.columns)


def test_deepscaler_jsonl_and_parquet_sources_give_the_same_output(tmp_path):
    raw = json.loads(FIXTURE.read_text())
    jsonl = tmp_path / "src.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in raw))
    pq = tmp_path / "src.parquet"
    pd.DataFrame(raw).to_parquet(pq)
    a = prepare(str(jsonl), tmp_path / "a.parquet")
    b = prepare(str(pq), tmp_path / "b.parquet")
    assert a["rows"] == b["rows"] == 4
    da, db = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    assert [list(p) for p in da["prompt"]] == [list(p) for p in db["prompt"]]
    assert list(da["reward_model"]) == list(db["reward_model"])


def test_deepscaler_wrong_row_count_fails_naming_the_source(tmp_path):
    with pytest.raises(DataError, match=r"deepscaler_small\.json: 7 rows, expected 40315"):
        prepare(str(FIXTURE), tmp_path / "t.parquet", expected_rows=40315)
    assert not (tmp_path / "t.parquet").exists()


def test_deepscaler_missing_column_fails_naming_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: missing columns \['problem'\]"):
        prepare(str(bad), tmp_path / "t.parquet")


def test_benchmarks_match_the_pinned_checksums_and_schema():
    exp = load_experiment(PAPER)
    manifest = verify_all(exp, BENCH_DIR)
    assert sorted(manifest["benchmarks"]) == sorted(exp["data"]["benchmarks"])
    for name, entry in manifest["benchmarks"].items():
        digest = hashlib.sha256((BENCH_DIR / f"{name}.parquet").read_bytes()).hexdigest()
        assert entry["sha256"] == digest == exp["data"]["checksums"][name]
        assert entry["rows"] == len(pd.read_parquet(BENCH_DIR / f"{name}.parquet"))


def test_benchmark_checksum_mismatch_names_the_file(tmp_path):
    exp = load_experiment(PAPER)
    for name in exp["data"]["benchmarks"]:
        shutil.copy(BENCH_DIR / f"{name}.parquet", tmp_path / f"{name}.parquet")
    df = pd.read_parquet(tmp_path / "aime25.parquet")
    rm = list(df["reward_model"])
    rm[0] = {"style": "rule", "ground_truth": "71"}  # a silently "fixed" answer
    df["reward_model"] = rm
    df.to_parquet(tmp_path / "aime25.parquet", index=False)
    with pytest.raises(DataError, match=r"aime25\.parquet: sha256 [0-9a-f]{64} does not match the pinned"):
        verify_all(exp, tmp_path)


def test_benchmark_schema_error_names_file_and_row(tmp_path):
    df = pd.read_parquet(BENCH_DIR / "aime24.parquet")
    rm = list(df["reward_model"])
    rm[3] = {"style": "rule", "ground_truth": ""}
    df["reward_model"] = rm
    path = tmp_path / "aime24.parquet"
    df.to_parquet(path, index=False)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(DataError, match=r"aime24\.parquet: row 3: reward_model"):
        verify_benchmark(path, digest)


def test_unpinned_benchmark_is_an_error():
    exp = load_experiment(PAPER)
    exp["data"]["checksums"].pop("smt_2025")
    with pytest.raises(DataError, match=r"data\.checksums has no sha256 for \['smt_2025'\]"):
        verify_all(exp, BENCH_DIR)


def test_cli_writes_manifest_and_reports_bad_input(tmp_path, capsys):
    out = tmp_path / "manifest.json"
    assert data_main(["benchmarks", "--experiment", str(PAPER), "--out", str(out)]) == 0
    manifest = json.loads(out.read_text())
    assert manifest["experiment"] == "paper" and len(manifest["benchmarks"]) == 8
    train = tmp_path / "ds" / "train.parquet"
    assert data_main(["deepscaler", "--source", str(FIXTURE), "--out", str(train), "--expected-rows", "7"]) == 0
    assert len(pd.read_parquet(train)) == 4
    assert data_main(["deepscaler", "--source", str(FIXTURE), "--out", str(train), "--expected-rows", "8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "deepscaler_small.json: 7 rows, expected 8" in err[0]


def test_cli_toy_writes_train_and_test_sets(tmp_path):
    assert data_main(["toy", "--out-dir", str(tmp_path), "--n-train", "20", "--n-test", "5", "--seed", "3"]) == 0
    train = pd.read_parquet(tmp_path / "train.parquet")
    assert len(train) == 20
    tests = sorted(p.name for p in tmp_path.glob("*.parquet") if p.name != "train.parquet")
    assert tests and all(len(pd.read_parquet(tmp_path / t)) == 5 for t in tests)
