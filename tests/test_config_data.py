"""Configuration values are data (issue 21, item 6): a name, revision or split never reaches a shell, a path
outside the tree or a Hydra/OmegaConf interpolation as code.

The attacks are the issue's: a benchmark `b$(touch PWNED)`, a dataset revision `x$(touch PWNED)`, a run
`r$(touch PWNED)`, a run `../../../../outside/x` (each ran or wrote during a real `snakemake` before), and
`${oc.env:HF_TOKEN}` as the W&B project / model path (resolved into the secret by Hydra and OmegaConf).
Snakemake runs for real (not a dry run) on a copy of the workflow, so an injection that got through would
run; Hydra's own compose (verl's ppo_trainer config) reads the overrides back.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctpo.config import ConfigError, hydra_quote, load_experiment, load_run_config, resolve_run
from hang import HANG_S
from test_dag import REPO, copy_workflow, snakemake

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

SECRET = "hf_not_a_real_token_21"
TOY = yaml.safe_load((REPO / "configs/experiments/toy.yaml").read_text())


def _toy_with(mutate) -> dict:
    exp = copy.deepcopy(TOY)
    mutate(exp)
    return exp


def _bench(e):
    e["data"]["benchmarks"].append("b$(touch PWNED)")


def _revision(e):
    e["data"]["kind"] = "deepscaler"
    e["data"]["deepscaler"] = {"source": "nowhere.parquet", "split": "train", "revision": "x$(touch PWNED)"}


def _rename_run(new):
    def mutate(e):
        old = e["diagnostics"]["run"]
        e["runs"][new] = e["runs"].pop(old)
        e["diagnostics"]["run"] = new
        for key in ("table2_runs", "table3_runs", "figure2_runs"):
            e["evaluation"][key] = [new if r == old else r for r in e["evaluation"][key]]
    return mutate


# (id, mutation, the key the error names, the targets whose shell commands the value reached before the fix:
# on the old code these created PWNED in the workflow copy and wrote ../outside/x/seed0.json beside it)
ATTACKS = [
    ("benchmark", _bench, "data.benchmarks[2]", ["prepare_toy_data"]),
    ("revision", _revision, "data.deepscaler.revision", ["prepare_deepscaler"]),
    ("run_name", _rename_run("r$(touch PWNED)"), "runs", ["--until", "run_config"]),
    ("run_path", _rename_run("../../../../outside/x"), "runs", ["--until", "run_config"]),
]


@pytest.mark.parametrize("name,mutate,key,target", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_injection_fails_at_parse_time_in_one_line_and_runs_nothing(tmp_path, name, mutate, key, target):
    wf = copy_workflow(tmp_path / "wf")
    (wf / "bad.yaml").write_text(yaml.safe_dump(_toy_with(mutate)))
    before = {p for p in tmp_path.rglob("*")}
    proc = snakemake(wf, "--cores", "1", *target, "--configfile", "bad.yaml", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    lines = [ln for ln in out.splitlines() if "experiment config" in ln]
    assert len(lines) == 1, out[-2000:]  # one line: the key, the value, what the schema expects
    assert lines[0].startswith(f"experiment config {key}: ") and ("PWNED" in lines[0] or "outside" in lines[0])
    assert "expected a name" in lines[0] or "expected a hub revision" in lines[0]
    assert "Traceback" not in out and "Building DAG" not in out
    created = {p for p in tmp_path.rglob("*")} - before
    assert not [p for p in created if "PWNED" in p.name], created
    assert not (tmp_path / "outside").exists() and not (wf / "results").exists() and not (wf / "data").exists()


def test_every_shell_placeholder_is_quoted():
    """Each `{...}` in a rule's shell command is `{...:q}` (Snakemake quotes it, item by item for a list);
    `{threads}` is Snakemake's own integer."""
    text = "\n".join(p.read_text() for p in sorted((REPO / "workflow/rules").glob("*.smk")))
    shells = re.findall(r"\n    shell:\n((?:        \".*\"\n?)+)", text)
    assert len(shells) >= 13
    fields = [f for s in shells for f in re.findall(r"\{([^{}]+)\}", s)]
    assert fields and [f for f in fields if not f.endswith(":q") and f != "threads"] == []


def _shell_argv(proc: subprocess.CompletedProcess, module: str) -> list[list[str]]:
    cmds = [ln.split("Shell command: ", 1)[1] for ln in proc.stdout.splitlines() if "Shell command: " in ln]
    return [shlex.split(c.split(" > ")[0]) for c in cmds if f"-m {module} " in c]


def test_flag_lists_reach_the_command_as_separate_quoted_words(tmp_path):
    """Flags held as lists (`--split S --revision R`, `--revision R`, `--init DIR`) are quoted item by item."""
    wf = copy_workflow(tmp_path / "wf")
    paper = yaml.safe_load((REPO / "configs/experiments/paper.yaml").read_text())
    ds = paper["data"]["deepscaler"]
    proc = snakemake(wf, "-n", "-p", "prepare", "--configfile", "configs/experiments/paper.yaml")
    [data] = [a for a in _shell_argv(proc, "ctpo.data") if a[3] == "deepscaler"]
    i = data.index("--split")
    assert data[i:i + 6] == ["--split", ds["split"], "--revision", ds["revision"], "--expected-rows",
                             str(ds["expected_rows"])]
    models = {m: yaml.safe_load((REPO / f"configs/models/{m}.yaml").read_text()) for m in ("qwen3_4b", "qwen3_14b")}
    hub = _shell_argv(proc, "ctpo.hub")
    assert sorted(a[a.index("--model") + 1:a.index("--model") + 4] for a in hub) == sorted(
        [m["path"], "--revision", m["revision"]] for m in models.values())
    toy = snakemake(wf, "-n", "-p")
    train = _shell_argv(toy, "ctpo.train")
    assert train and all(a[a.index("--init") + 1] == "runs/toy/sft/seed0/policy" for a in train)


# ----------------------------------------------------------------------------- OmegaConf and Hydra


def test_config_values_with_interpolations_stay_text(monkeypatch, tmp_path):
    """`${oc.env:HF_TOKEN}` in the experiment, a model file or a run config file is kept as that text."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    cfg_dir = tmp_path / "configs"
    for sub in ("models", "methods", "tir", "verl"):  # tir, verl: what runs read at run time (hashed)
        (cfg_dir / sub).mkdir(parents=True)
        for f in (REPO / "configs" / sub).glob("*.yaml"):
            (cfg_dir / sub / f.name).write_text(f.read_text())
    evil = yaml.safe_load((REPO / "configs/models/toy.yaml").read_text())
    evil["path"] = "a\\${oc.env:HF_TOKEN}\\"
    (cfg_dir / "models" / "evil.yaml").write_text(yaml.safe_dump(evil))
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(yaml.safe_dump(_toy_with(lambda e: e["wandb"].__setitem__("project", "${oc.env:HF_TOKEN}"))))
    exp = load_experiment(exp_file)
    run = next(iter(exp["runs"]))
    exp["runs"][run]["model"] = "evil"
    resolved = resolve_run(exp, run, 0, cfg_dir)
    assert resolved["wandb"]["project"] == "${oc.env:HF_TOKEN}"
    assert resolved["model"]["path"] == "a\\${oc.env:HF_TOKEN}\\"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(resolved))
    for source in (resolved, path):
        cfg = load_run_config(source)
        assert (cfg.wandb.project, cfg.model.path) == ("${oc.env:HF_TOKEN}", "a\\${oc.env:HF_TOKEN}\\")


def test_model_revision_must_be_a_revision():
    exp = _toy_with(lambda e: None)
    run = next(iter(exp["runs"]))
    exp["runs"][run]["overrides"] = {"model": {"revision": "x$(touch PWNED)"}}
    with pytest.raises(ConfigError) as e:
        resolve_run(exp, run, 0)
    msg = str(e.value)
    assert "\n" not in msg and "model.revision" in msg and "x$(touch PWNED)" in msg and "no '..'" in msg
    exp["runs"][run]["overrides"] = {"model": {"revision": "refs/pr/1"}}
    assert resolve_run(exp, run, 0)["model"]["revision"] == "refs/pr/1"


TRICKY = ["${oc.env:HF_TOKEN}", "a\\${oc.env:HF_TOKEN}", "a\\\\${x}", "x,y=z [1, 2]", "it's \"q\"", "tail\\",
          "\\'", "${", "}${a.b}{", "plain"]


@pytest.mark.parametrize("resolves", [0, 1])
def test_hydra_quote_round_trips_through_hydras_parser_and_omegaconf(monkeypatch, tmp_path, resolves):
    """Hydra's own compose reads each value back as the same text, after `resolves` in-place resolutions."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    monkeypatch.setenv("HF_TOKEN", SECRET)
    (tmp_path / "c.yaml").write_text("v: 0\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        for text in TRICKY:
            c = compose("c", overrides=[f"v={hydra_quote(text, resolves=resolves)}"])
            for _ in range(resolves):
                OmegaConf.resolve(c)
            assert c.v == text and OmegaConf.to_container(c, resolve=True)["v"] == text


def test_verl_overrides_keep_interpolations_as_text(monkeypatch, tmp_path):
    """model.path, the W&B project and the run name reach verl's composed config (after main_ppo's
    OmegaConf.resolve) as the literal text; the secret appears nowhere in it."""
    from omegaconf import OmegaConf

    from test_verl_backend import _cfg, _compose, verl_argv

    monkeypatch.setenv("HF_TOKEN", SECRET)
    cfg = _cfg("grpo")
    cfg = dataclasses.replace(
        cfg, run="r${oc.env:HF_TOKEN}",
        model=dataclasses.replace(cfg.model, path="m${oc.env:HF_TOKEN},a=b 'q'"),
        wandb=dataclasses.replace(cfg.wandb, project="${oc.env:HF_TOKEN}"),
    )
    with pytest.raises(ValueError, match=r"a path holding '\$\{' cannot be verl's"):
        verl_argv(cfg, tmp_path / "w${x}")
    argv = verl_argv(cfg, tmp_path / "w$d 'q'")
    c = _compose(argv[3:])
    OmegaConf.resolve(c)  # verl.trainer.main_ppo TaskRunner.run, before anything reads the config
    assert c.trainer.project_name == "${oc.env:HF_TOKEN}"
    assert c.trainer.experiment_name == "r${oc.env:HF_TOKEN}-seed0"
    assert c.actor_rollout_ref.model.path == "m${oc.env:HF_TOKEN},a=b 'q'"
    assert c.trainer.default_local_dir == str((tmp_path / "w$d 'q'" / "checkpoints").resolve())
    assert SECRET not in OmegaConf.to_yaml(c, resolve=True)
    ray_tmp = OmegaConf.to_container(c.ray_kwargs.ray_init)["_temp_dir"]  # read before the resolve
    assert re.fullmatch(r"/tmp/ctpo-ray-[0-9a-f]{10}", ray_tmp)


@pytest.mark.parametrize("mutate,key", [
    (lambda e: e.__setitem__("experiment", "toy\n"), "experiment"),  # Python's `$` matches before a final newline
    (lambda e: e["data"]["benchmarks"].append("aime\n"), "data.benchmarks[2]"),
    (lambda e: e["data"]["benchmarks"].append("-rf"), "data.benchmarks[2]"),  # never read as a flag
    (lambda e: e["data"].__setitem__("checksums", {"../x": "0" * 64}), "data.checksums"),
    (lambda e: e["evaluation"].__setitem__("figure2_benchmark", "a b"), "evaluation.figure2_benchmark"),
    (lambda e: e["runs"][next(iter(e["runs"]))].__setitem__("method", "../../x"), "runs."),
    (lambda e: _revision(e) or e["data"]["deepscaler"].__setitem__("revision", "a/../b"), "data.deepscaler.revision"),
    (lambda e: _revision(e) or e["data"]["deepscaler"].__setitem__("split", "train[:10]"), "data.deepscaler.split"),
])
def test_schema_refuses_unsafe_values_in_one_line(mutate, key):
    from ctpo.configure import check_schema

    schema = REPO / "workflow/schemas/config.schema.yaml"
    check_schema(copy.deepcopy(TOY), schema)  # the shipped configs pass
    check_schema(yaml.safe_load((REPO / "configs/experiments/paper.yaml").read_text()), schema)
    with pytest.raises(ConfigError) as e:
        check_schema(_toy_with(mutate), schema)
    assert str(e.value).startswith(f"experiment config {key}") and "\n" not in str(e.value), str(e.value)
    ok = _toy_with(lambda e: _revision(e) or e["data"]["deepscaler"].update(revision="refs/pr/1", split="test"))
    check_schema(ok, schema)
