"""ctpo.configure: the evaluation plan, checkpoint steps, the warm-start config and the writer CLI."""
from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctpo.config import ConfigError, load_experiment, load_run_config
from ctpo.configure import check_experiment, eval_targets, resolve_runs, warmstart_config
from ctpo.layout import saved_steps

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def toy():
    return load_experiment(REPO / "configs/experiments/toy.yaml")


@pytest.mark.parametrize("total,freq,expected", [(305, 20, list(range(20, 301, 20)) + [305]), (30, 10, [10, 20, 30]),
                                                 (5, 10, [5]), (2, 1, [1, 2])])
def test_saved_steps_every_save_freq_plus_the_final_step(total, freq, expected):
    assert saved_steps(total, freq) == expected


def test_eval_targets_match_a_hand_enumeration(toy):
    exp = copy.deepcopy(toy)
    exp["seeds"] = [0, 3]
    exp["runs"]["toy_gspo"]["overrides"] = {"train": {"total_steps": 25, "dump_steps": [10, 20]}}  # its own schedule
    resolved = resolve_runs(exp)
    got = eval_targets(exp, resolved)
    want = set()
    for seed in (0, 3):
        for run in ("toy_grpo", "toy_gspo", "toy_ctpo", "toy_ctpo_fixed"):
            final = 25 if run == "toy_gspo" else 30
            for bench in ("toy_arith", "toy_arith_hard"):
                want.add((run, seed, final, bench))
        for run, steps in (("toy_grpo", [10, 20, 30]), ("toy_gspo", [10, 20, 25]), ("toy_ctpo", [10, 20, 30])):
            for step in steps:
                want.add((run, seed, step, "toy_arith"))
    assert got == sorted(want) and len(got) == len(set(got))


def test_check_experiment_names_the_bad_key(toy):
    resolved = resolve_runs(toy)
    bad = copy.deepcopy(toy)
    bad["evaluation"]["figure2_benchmark"] = "aime99"
    with pytest.raises(ConfigError, match="benchmark 'aime99' is not in data.benchmarks"):
        check_experiment(bad, resolved)
    bad = copy.deepcopy(toy)
    bad["diagnostics"]["steps"] = [10, 15]
    with pytest.raises(ConfigError, match=r"diagnostics.steps: steps \[15\]"):
        check_experiment(bad, resolved)
    bad = copy.deepcopy(toy)
    bad["evaluation"]["table3_runs"] = ["toy_ctpo"]  # failed the tables job only, after every training
    with pytest.raises(ConfigError, match=r"evaluation.table3_runs: expected \[adaptive_run, fixed_run\]"):
        check_experiment(bad, resolved)


def test_warmstart_config_ignores_methods_and_run_overrides(toy, tmp_path):
    base = warmstart_config(toy, 0)
    load_run_config(base)  # a valid RunConfig
    assert base["run"] == "sft" and base["seed"] == 0
    exp = copy.deepcopy(toy)
    exp["runs"]["toy_grpo"]["overrides"] = {"train": {"lr": 0.5}, "loss": {"clip_ratio_high": 0.9}}
    exp["runs"]["toy_grpo"]["method"] = "gspo"
    assert warmstart_config(exp, 0) == base
    exp["runs"]["toy_gspo"]["overrides"] = {"model": {"hidden_size": 32}}
    with pytest.raises(ConfigError, match="use different models"):
        warmstart_config(exp, 0)


def test_cli_writes_json_and_checksum_manifest(tmp_path):
    doc = {"b": [1, 2], "a": "x'y"}
    out = tmp_path / "c/seed0.json"
    subprocess.run([sys.executable, "-m", "ctpo.configure", "--json", json.dumps(doc), "--out", str(out)], check=True,
                   capture_output=True)
    assert json.loads(out.read_text()) == doc
    data = tmp_path / "d.parquet"
    data.write_bytes(b"\x00abc" * 100)
    man = tmp_path / "m.json"
    subprocess.run([sys.executable, "-m", "ctpo.configure", "--checksums", str(data), "--out", str(man)], check=True,
                   capture_output=True)
    entry = json.loads(man.read_text())["files"][str(data)]
    assert entry == {"sha256": hashlib.sha256(b"\x00abc" * 100).hexdigest(), "bytes": 400}
    bad = subprocess.run([sys.executable, "-m", "ctpo.configure", "--json", "{not json", "--out", str(man)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--json: expected a JSON document" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "ctpo.configure", "--checksums", str(tmp_path / "nope.parquet"),
                              "--out", str(man)], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.parquet: expected a data file" in missing.stderr
