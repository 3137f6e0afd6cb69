"""Figure 1's two clip bands of an experiment (ctpo.diagnostics.bands): the ablation pair's resolved losses, or an
explicit, schema-checked `diagnostics.bands` block; every wrong source fails in one line naming its key.
Expected values are read here from the method files with plain YAML, independently of ctpo.config."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import yaml

from ctpo.config import ConfigError, load_experiment
from ctpo.configure import check_experiment, check_schema, resolve_runs
from ctpo.diagnostics.bands import clip_bands, experiment_bands, plan_bands, read_bands
from ctpo.diagnostics.stream import ClipBands
from test_dag import REPO

SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
BLOCK = {"fixed": [0.8, 1.25], "adaptive": {"eps_low": 0.1, "eps_high": 0.2, "power": 0.4}}


def method_file(name: str) -> dict:
    return yaml.safe_load((REPO / "configs/methods" / f"{name}.yaml").read_text())


@pytest.fixture(scope="module")
def toy():
    return load_experiment(REPO / "configs/experiments/toy.yaml")


@pytest.mark.parametrize("name", ["toy", "toy_verl", "paper"])
def test_each_experiments_bands_are_its_ctpo_and_fixed_clip_method_files(name):
    exp = load_experiment(REPO / f"configs/experiments/{name}.yaml")
    ctpo, fixed = method_file("ctpo"), method_file("ctpo_fixed")
    bands = plan_bands(exp)
    assert bands["fixed_bounds"] == fixed["fixed_bounds"]
    assert bands["adaptive"] == {k: ctpo[k] for k in ("eps_low", "eps_high", "power")}
    assert bands["source"] == f"evaluation.table3_runs {exp['evaluation']['table3_runs']}"
    assert clip_bands(bands) == ClipBands(*fixed["fixed_bounds"], ctpo["eps_low"], ctpo["eps_high"], ctpo["power"])
    check_experiment(exp, resolve_runs(exp))


def test_an_override_of_the_fixed_clip_run_moves_figure1s_fixed_band_with_it(toy):
    exp = copy.deepcopy(toy)
    exp["runs"]["toy_ctpo_fixed"]["overrides"] = {"loss": {"fixed_bounds": [0.8, 1.25], "fixed_dual_clip": 1.25}}
    resolved = resolve_runs(exp)
    check_experiment(exp, resolved)  # no longer an error: the band is the run's
    assert experiment_bands(exp, resolved)["fixed_bounds"] == [0.8, 1.25]


def test_an_explicit_block_wins_and_passes_the_schema(toy):
    exp = copy.deepcopy(toy)
    exp["diagnostics"]["bands"] = BLOCK
    check_schema(exp, SCHEMA)
    bands = plan_bands(exp)
    assert bands == {"fixed_bounds": [0.8, 1.25], "adaptive": BLOCK["adaptive"], "source": "diagnostics.bands"}
    # with explicit bands the Table 3 pair need not carry them
    exp["evaluation"]["table3_runs"] = ["toy_grpo", "toy_gspo"]
    assert plan_bands(exp)["fixed_bounds"] == [0.8, 1.25]


@pytest.mark.parametrize("block,key", [
    ({"fixed": [0.5, 5.0]}, "'adaptive' is a required property"),
    ({**BLOCK, "extra": 1}, "Additional properties"),
    ({**BLOCK, "fixed": [0.5]}, "is too short"),
    ({**BLOCK, "adaptive": {**BLOCK["adaptive"], "power": 0}}, "less than or equal to the minimum of 0"),
    ({**BLOCK, "adaptive": {"eps_low": 0.1, "eps_high": 0.2}}, "'power' is a required property"),
])
def test_a_malformed_block_fails_the_schema_in_one_line_naming_its_key(toy, block, key):
    exp = copy.deepcopy(toy)
    exp["diagnostics"]["bands"] = block
    with pytest.raises(ConfigError) as e:
        check_schema(exp, SCHEMA)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("experiment config diagnostics.bands") and key in msg, msg


def test_a_block_the_schema_cannot_check_fails_in_one_line(toy):
    exp = copy.deepcopy(toy)
    exp["diagnostics"]["bands"] = {**BLOCK, "fixed": [1.5, 5.0]}  # lo > 1: every token would count as clipped
    check_schema(exp, SCHEMA)
    with pytest.raises(ConfigError, match=r"^experiment diagnostics.bands: fixed bounds must satisfy 0 < lo < 1 < hi"):
        check_experiment(exp, resolve_runs(exp))


@pytest.mark.parametrize("pair,match", [
    (["toy_ctpo_fixed", "toy_ctpo"], r"table3_runs\[0\]: run 'toy_ctpo_fixed' \(method ctpo_fixed\) has no "
                                     r"position-adaptive band .* or give diagnostics.bands"),
    (["toy_ctpo", "toy_grpo"], r"table3_runs\[1\]: run 'toy_grpo' \(method grpo\) has no fixed band"),
])
def test_a_pair_without_the_bands_fails_naming_the_run_and_the_way_out(toy, pair, match):
    exp = copy.deepcopy(toy)
    exp["evaluation"]["table3_runs"] = pair
    with pytest.raises(ConfigError, match=match):
        check_experiment(exp, resolve_runs(exp))


def test_the_bands_file_is_read_back_and_a_bad_one_fails_naming_the_file(tmp_path, toy):
    good = tmp_path / "figure1_bands.json"
    good.write_text(json.dumps(plan_bands(toy)))
    assert read_bands(good) == clip_bands(plan_bands(toy))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fixed_bounds": [0.5, 5.0]}))
    with pytest.raises(ConfigError, match=r"bad.json: expected \{fixed_bounds"):
        read_bands(bad)
    run_config = tmp_path / "toy_ctpo.json"
    run_config.write_text(json.dumps(resolve_runs(toy)[("toy_ctpo", 0)]))
    cmd = [sys.executable, "-m", "ctpo.diagnostics", "--dump", str(tmp_path / "step1.npz"), "--config",
           str(run_config), "--bands", str(bad), "--bin-width", "4", "--min-bin-tokens", "1",
           "--out", str(tmp_path / "o.parquet")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "bad.json: expected" in res.stderr, res.stderr
