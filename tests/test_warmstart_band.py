"""The warm start's accuracy band (issue 24): a validated config key, and a warm start outside it fails in one
line naming the seed and the accuracy, with no done marker, so a seed that did not learn never reaches RL."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctpo.config import ConfigError, load_experiment, resolve_run
from ctpo.configure import warmstart_config
from ctpo.exitcodes import EXIT_PERMANENT

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

REPO = Path(__file__).resolve().parent.parent


def _toy() -> dict:
    return load_experiment(REPO / "configs/experiments/toy.yaml")


def test_toy_experiments_declare_a_band_inside_zero_one():
    for name in ("toy", "toy_verl"):
        band = warmstart_config(load_experiment(REPO / f"configs/experiments/{name}.yaml"), 0)["sft"]["accuracy_band"]
        assert 0.0 < band[0] < band[1] < 1.0, name


@pytest.mark.parametrize("band", [[0.6, 0.2], [0.1], [-0.1, 0.5], [0.2, 1.5]])
def test_a_malformed_band_is_a_config_error_naming_the_key(band):
    exp = _toy()
    exp["defaults"]["sft"]["accuracy_band"] = band
    with pytest.raises(ConfigError, match=r"sft.accuracy_band must be \[lo, hi\] with 0 <= lo <= hi <= 1"):
        resolve_run(exp, "toy_grpo", 0)


@pytest.mark.e2e  # a real SFT run (16 s idle, 80 s at load 5): `make test-e2e` (CI)
def test_a_warm_start_outside_the_band_fails_in_one_line_without_a_done_marker(tmp_path):
    """The real SFT entry point, 2 steps on 32 demonstrations: the policy cannot solve anything yet, so with
    a band starting at 50% it must exit 78 and name seed 3 and its accuracy (0/4)."""
    from ctpo.data.toy_task import write_toy_data

    write_toy_data(tmp_path / "data", n_train=20, n_test=4, seed=1234)
    cfg = warmstart_config(_toy(), 3)
    cfg["data"].update(train=str(tmp_path / "data/train.parquet"), val=[str(tmp_path / "data/toy_arith.parquet")])
    cfg["sft"].update(steps=2, n_demos=32, batch_size=32, accuracy_band=[0.5, 1.0])
    cfg["rollout"]["max_response_tokens"] = 64  # an untrained policy runs to the budget: keep it short
    cfg["wandb"]["mode"] = "disabled"
    (tmp_path / "sft.json").write_text(json.dumps(cfg))
    out = tmp_path / "sft"
    proc = subprocess.run([sys.executable, "-m", "ctpo.train.sft", "--config", str(tmp_path / "sft.json"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert proc.returncode == EXIT_PERMANENT, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sft: warm start seed 3 reached held-out accuracy 0.000 (0/4, loss ")
    assert "outside sft.accuracy_band [0.5, 1] of experiment 'toy'" in last
    assert not (out / "done.json").exists() and (out / "policy" / "config.json").is_file()
