"""Exact reruns: what a run reads from configs/ while it runs (the TIR template, the verl agent loop entry and
tool config of its protocol; `ctpo.config.run_files`) is hashed into its resolved config, so into its run
identity and the `run_config` rule's params. After a real Snakemake run of the config rules (which records
their params) and an up-to-date tree of every other output, editing one of those files reruns exactly the
trainings and evaluations that read it, and nothing when no run reads it (`snakemake -n`)."""
from __future__ import annotations

import os
import time

import pytest
import yaml

from ctpo.config import load_experiment, resolve_run
from ctpo.configure import warmstart_config
from ctpo.workdir import run_identity
from test_dag import REPO, copy_workflow, count, parse_jobs, snakemake

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

CONFIG_RULES = ("experiment_config", "run_config", "sft_config")  # cheap: `python -m ctpo.configure`


def up_to_date_tree(tmp_path, experiment: str):
    """(workflow copy, {rule: jobs} of the full plan): config rules run for real, other outputs written newer."""
    wf = copy_workflow(tmp_path / "wf")
    cf = ("--configfile", f"configs/experiments/{experiment}.yaml")
    jobs = parse_jobs(snakemake(wf, "-n", *cf).stdout)  # topological order
    now = time.time()
    for m in (wf / "configs").rglob("*.yaml"):  # every source older than every output
        os.utime(m, (now - 7200, now - 7200))
    targets = [o for j in jobs if j["rule"] in CONFIG_RULES for o in j["output"].split(", ")]
    snakemake(wf, *targets, "--cores", "2", *cf)  # records their params in .snakemake/metadata
    for i, j in enumerate(jobs):
        if j["rule"] in CONFIG_RULES:
            continue
        for rel in filter(None, j.get("output", "").split(", ")):
            p = wf / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("{}\n")
            os.utime(p, (now + 60 + i, now + 60 + i))
    assert "Nothing to be done" in snakemake(wf, "-n", *cf).stdout
    return wf, cf, count(jobs)


def edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def reruns(wf, cf) -> dict:
    return count(parse_jobs(snakemake(wf, "-n", *cf).stdout))


def test_a_template_edit_reruns_every_toy_training_and_evaluation_and_a_verl_tool_edit_none(tmp_path):
    wf, cf, full = up_to_date_tree(tmp_path, "toy")
    # configs/verl/ is read by verl runs only: the local toy reruns nothing
    edit(wf / "configs/verl/tool_config.yaml", "timeout_s: 10.0", "timeout_s: 11.0")
    edit(wf / "configs/verl/agent_loop.yaml", "Solve the following problem", "Solve this problem")
    assert reruns(wf, cf) == {}
    # the toy's system prompt: every toy run and the warm start read it
    edit(wf / "configs/tir/toy_tir.yaml", 'system_prompt: "Use', 'system_prompt: "Now use')
    again = reruns(wf, cf)
    for rule in ("run_config", "sft_config", "warmstart", "train", "eval"):
        assert again.get(rule) == full[rule], (rule, again, full)
    assert not {"prepare_toy_data", "experiment_config"} & again.keys(), again


@pytest.mark.variant  # the same mechanism as the toy's test above, for the verl files (about 50 s)
def test_verl_runs_rerun_on_their_protocols_files_only(tmp_path):
    wf, cf, full = up_to_date_tree(tmp_path, "toy_verl")
    edit(wf / "configs/verl/release_tool_config.yaml", "default_timeout_s: 30", "default_timeout_s: 31")
    edit(wf / "configs/verl/agent_loop.yaml", "Solve the following problem", "Solve this problem")  # ctpo_release
    assert reruns(wf, cf) == {}  # toy_verl's runs use the ctpo_tir loop
    edit(wf / "configs/verl/tool_config.yaml", "timeout_s: 10.0", "timeout_s: 11.0")
    again = reruns(wf, cf)
    for rule in ("run_config", "train", "eval"):
        assert again.get(rule) == full[rule], (rule, again, full)
    assert "warmstart" not in again and "sft_config" not in again  # the warm start reads the template only


@pytest.mark.parametrize("protocol_file, runs_read_it", [
    ("configs/verl/release_tool_config.yaml", True), ("configs/tir/qwen3_tir.yaml", False)])
def test_the_paper_runs_hash_the_release_protocols_files(tmp_path, protocol_file, runs_read_it):
    """Without Snakemake: the paper's run identities change with the release's tool config, not the TIR
    template (the release protocol never reads it); the warm start's config hashes the template only."""
    import shutil

    cfg_dir = tmp_path / "configs"
    shutil.copytree(REPO / "configs", cfg_dir)
    paper = load_experiment(REPO / "configs/experiments/paper.yaml")
    before = {run: run_identity(resolve_run(paper, run, 0, cfg_dir))[0] for run in paper["runs"]}
    (cfg_dir / protocol_file.removeprefix("configs/")).write_text(
        (cfg_dir / protocol_file.removeprefix("configs/")).read_text() + "\n# edited\n")
    after = {run: run_identity(resolve_run(paper, run, 0, cfg_dir))[0] for run in paper["runs"]}
    assert all((before[r] != after[r]) == runs_read_it for r in paper["runs"]), (before, after)


def test_the_hashes_are_of_the_files_read(tmp_path):
    """The `files` entries against an independent hash of each file (and of the agent loop's own entry)."""
    import hashlib
    import json

    toy_verl = load_experiment(REPO / "configs/experiments/toy_verl.yaml")
    d = resolve_run(toy_verl, "toy_ctpo", 0)
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    loops = yaml.safe_load((REPO / "configs/verl/agent_loop.yaml").read_text())
    entry = next(e for e in loops if e["name"] == "ctpo_tir")
    assert d["files"] == {
        "configs/tir/toy_tir.yaml": sha((REPO / "configs/tir/toy_tir.yaml").read_bytes()),
        "configs/verl/agent_loop.yaml#ctpo_tir": sha(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()),
        "configs/verl/tool_config.yaml": sha((REPO / "configs/verl/tool_config.yaml").read_bytes()),
    }
    assert warmstart_config(toy_verl, 0)["files"] == {"configs/tir/toy_tir.yaml": d["files"]["configs/tir/toy_tir.yaml"]}


def test_a_run_config_resolved_before_an_edit_fails_to_load_naming_the_file(tmp_path, monkeypatch):
    """A run never reads other text than its identity says: loading a run config whose `files` no longer match
    configs/ (edited after it was resolved, the workflow not rerun) fails in one line naming the file."""
    import shutil

    from ctpo import config
    from ctpo.config import ConfigError, load_run_config

    d = resolve_run(load_experiment(REPO / "configs/experiments/toy_verl.yaml"), "toy_ctpo", 0)
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path / "configs")  # what the run reads at run time
    assert load_run_config(d).files == d["files"]
    edit(tmp_path / "configs/verl/agent_loop.yaml", "Solve the following problem", "Solve this problem")
    assert load_run_config(d).files == d["files"]  # the release's entry: this run does not read it
    edit(tmp_path / "configs/tir/toy_tir.yaml", 'system_prompt: "Use', 'system_prompt: "Now use')
    with pytest.raises(ConfigError, match=r"^run config: files: configs/tir/toy_tir\.yaml changed since this run "
                                          r"config was resolved; resolve it again"):
        load_run_config(d)
