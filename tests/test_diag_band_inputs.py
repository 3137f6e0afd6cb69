"""Figure 1's two bands come from the experiment (ctpo.diagnostics.bands): its `diagnostics.bands` block, else its
ablation pair's losses (evaluation.table3_runs). The workflow writes them to results/{exp}/configs/figure1_bands.json
(rule bands_config, rerun by Snakemake's params trigger like the run configs) and every diagnostics job reads that
file, so editing a band's source reruns the diagnostics and Figure 1; editing anything else does not.

Dry runs on a tree of up-to-date outputs: the config rules run for real (Snakemake records their params), every
other output is a placeholder older than nothing it depends on.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from test_dag import REPO, copy_workflow, count, parse_jobs, snakemake

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

CONFIG_RULES = {"experiment_config", "run_config", "sft_config", "data_config", "bands_config"}
FIXED = ("fixed_bounds: [0.5, 5.0]", "fixed_bounds: [0.4, 5.0]")  # configs/methods/ctpo_fixed.yaml


def up_to_date(wf: Path, *args: str) -> dict:
    """Bring the copy at `wf` up to date for `snakemake *args`; returns the planned jobs' counts before."""
    jobs = parse_jobs(snakemake(wf, "-n", *args).stdout)  # topological order
    configs = [j["output"] for j in jobs if j["rule"] in CONFIG_RULES]
    snakemake(wf, "--cores", "2", *configs, *args)  # --configfile takes every value after it
    now = time.time()
    for m in (wf / "configs").rglob("*.yaml"):  # every source older than every output
        os.utime(m, (now - 3600, now - 3600))
    for i, j in enumerate(jobs):
        for rel in filter(None, j.get("output", "").split(", ")):
            p = wf / rel
            if j["rule"] not in CONFIG_RULES:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("{}\n")
            os.utime(p, (now - 1800 + i, now - 1800 + i))
    assert "Nothing to be done" in snakemake(wf, "-n", *args).stdout
    return count(jobs)


def planned(wf: Path, *args: str) -> tuple[dict, list[dict]]:
    jobs = parse_jobs(snakemake(wf, "-n", *args).stdout)
    return count(jobs), jobs


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def test_the_ablation_pairs_fixed_band_reruns_the_diagnostics_figure1_and_that_run(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    exp = yaml.safe_load((REPO / "configs/experiments/toy.yaml").read_text())
    assert "bands" not in exp["diagnostics"] and exp["evaluation"]["table3_runs"][1] == "toy_ctpo_fixed"
    up_to_date(wf)
    bands = wf / "results" / exp["experiment"] / "configs" / "figure1_bands.json"
    assert json.loads(bands.read_text())["fixed_bounds"] == [0.5, 5.0]
    edit(wf / "configs/methods/ctpo_fixed.yaml", *FIXED)
    n, jobs = planned(wf)
    assert n.pop("bands_config") == 1 and n.pop("figures") == 1
    assert n.pop("diagnostics") == len(exp["diagnostics"]["steps"]) * len(exp["seeds"])
    # the fixed-clip run itself trains again (its loss changed), and so its evaluations and the tables
    assert {j["wildcards"] for j in jobs if j["rule"] in ("run_config", "train")} == {"run=toy_ctpo_fixed, seed=0"}
    assert set(n) == {"run_config", "train", "eval", "tables", "all"}, n


@pytest.mark.variant  # the other band source through the same DAG path (`make test-variants`)
def test_an_explicit_bands_block_is_the_source_and_the_method_files_are_not(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    exp = yaml.safe_load((REPO / "configs/experiments/toy.yaml").read_text())
    exp["diagnostics"]["bands"] = {"fixed": [0.5, 5.0], "adaptive": {"eps_low": 0.1, "eps_high": 0.2, "power": 0.5}}
    cfg = wf / "configs/experiments/toy_bands.yaml"
    cfg.write_text(yaml.safe_dump(exp, sort_keys=False))
    args = ("--configfile", str(cfg.relative_to(wf)))
    up_to_date(wf, *args)
    bands = json.loads((wf / "results" / exp["experiment"] / "configs" / "figure1_bands.json").read_text())
    assert bands["adaptive"] == {"eps_low": 0.1, "eps_high": 0.2, "power": 0.5}
    assert bands["source"] == "diagnostics.bands"

    # the method file no longer sets Figure 1's fixed band: only the fixed-clip run reruns
    edit(wf / "configs/methods/ctpo_fixed.yaml", *FIXED)
    n, _ = planned(wf, *args)
    assert not {"bands_config", "diagnostics", "figures"} & set(n), n
    assert n["train"] == 1
    edit(wf / "configs/methods/ctpo_fixed.yaml", *reversed(FIXED))
    assert "Nothing to be done" in snakemake(wf, "-n", *args).stdout

    # the block does: the diagnostics and Figure 1 rerun (the experiment's own config and tables too), no training
    edit(cfg, "- 0.5\n    - 5.0", "- 0.4\n    - 5.0")
    n, _ = planned(wf, *args)
    assert n.pop("bands_config") == 1 and n.pop("figures") == 1
    assert n.pop("diagnostics") == len(exp["diagnostics"]["steps"]) * len(exp["seeds"])
    assert not {"run_config", "train", "eval", "sft_config", "warmstart"} & set(n), n
