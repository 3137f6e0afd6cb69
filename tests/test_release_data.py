"""The paper experiment can train on the release's own DeepScaleR file (a verl train parquet), issue 20 item 5."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ctpo.data.benchmarks import DataError
from ctpo.data.deepscaler import prepare

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "deepscaler_small.json"


def test_a_verl_parquet_like_the_releases_gives_the_same_rows_as_the_hub_json(tmp_path):
    raw = json.loads(FIXTURE.read_text())
    # the release's layout: a verl parquet, chat `prompt` (here with a system message), reward_model.ground_truth
    verl = pd.DataFrame({
        "data_source": "deepscaler",
        "prompt": [[{"role": "system", "content": "Solve with Python."}, {"role": "user", "content": r["problem"]}]
                   for r in raw],
        "ability": "math",
        "reward_model": [{"style": "rule", "ground_truth": r["answer"]} for r in raw],
    })
    src = tmp_path / "train.parquet"
    verl.to_parquet(src)
    a = prepare(str(FIXTURE), tmp_path / "from_json.parquet", expected_rows=len(raw))
    b = prepare(str(src), tmp_path / "from_verl.parquet", expected_rows=len(raw))
    assert {k: a[k] for k in ("rows", "dropped_no_answer", "dropped_no_problem")} == \
           {k: b[k] for k in ("rows", "dropped_no_answer", "dropped_no_problem")} == \
           {"rows": 4, "dropped_no_answer": 2, "dropped_no_problem": 1}
    da, db = pd.read_parquet(tmp_path / "from_json.parquet"), pd.read_parquet(tmp_path / "from_verl.parquet")
    assert [list(p) for p in da["prompt"]] == [list(p) for p in db["prompt"]]  # the system message is not kept
    assert list(da["reward_model"]) == list(db["reward_model"])
    # our own prepared file is a verl parquet too: feeding it back changes nothing
    c = prepare(str(tmp_path / "from_json.parquet"), tmp_path / "again.parquet")
    assert c["rows"] == 4
    assert [list(p) for p in pd.read_parquet(tmp_path / "again.parquet")["prompt"]] == [list(p) for p in da["prompt"]]


def test_a_parquet_with_neither_layout_fails_naming_the_file(tmp_path):
    src = tmp_path / "odd.parquet"
    pd.DataFrame({"question": ["1+1"], "solution": ["2"]}).to_parquet(src)
    with pytest.raises(DataError, match=r"odd\.parquet: missing columns \['problem', 'answer'\]"):
        prepare(str(src), tmp_path / "x.parquet")


def test_docs_no_longer_call_the_releases_train_file_unpublished():
    text = (ROOT / "docs" / "TOOL_PROTOCOL.md").read_text()
    assert "not published" not in text and "dataset/deepscaler/train.parquet" in text
