"""Figure 1's fixed band comes from configs/methods/ctpo_fixed.yaml (and the adaptive one from ctpo.yaml, for a
run whose loss sets neither): the diagnostics rule takes the method files it reads as inputs, so editing a band
reruns the diagnostics and Figure 1, and nothing else (dry run on a tree of up-to-date outputs)."""
from __future__ import annotations

import os
import time

import yaml

from ctpo import methods
from ctpo.diagnostics.run import REFERENCE
from test_dag import REPO, copy_workflow, count, parse_jobs, snakemake


def test_editing_the_fixed_band_reruns_diagnostics_and_figure1_only(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    exp = yaml.safe_load((REPO / "configs/experiments/toy.yaml").read_text())
    diag_run = exp["diagnostics"]["run"]
    own_band = methods.get(exp["runs"][diag_run]["method"]).band
    assert own_band != "fixed"  # so the fixed band is read from the reference method file
    jobs = parse_jobs(snakemake(wf, "-n").stdout)  # topological order
    now = time.time()
    for m in (wf / "configs").rglob("*.yaml"):  # every source older than every output
        os.utime(m, (now - 3600, now - 3600))
    for i, j in enumerate(jobs):
        for rel in filter(None, j.get("output", "").split(", ")):
            p = wf / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("{}\n")
            os.utime(p, (now - 1800 + i, now - 1800 + i))
    assert "Nothing to be done" in snakemake(wf, "-n").stdout
    fixed = wf / "configs/methods" / f"{REFERENCE['fixed']}.yaml"
    fixed.write_text(fixed.read_text().replace("fixed_bounds: [0.5, 5.0]", "fixed_bounds: [0.4, 5.0]"))
    rerun = count(parse_jobs(snakemake(wf, "-n").stdout))
    assert rerun.pop("diagnostics") == len(exp["diagnostics"]["steps"]) * len(exp["seeds"])
    assert rerun == {"figures": 1, "all": 1}, rerun
