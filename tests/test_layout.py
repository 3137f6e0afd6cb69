"""One layout: the Snakemake DAG's paths are ctpo.layout's, every stage hands files over at the layout's
paths, done.json reads in every shape, and saved steps follow verl's rule.

The DAG tests dry-run `snakemake -n -p --forceall` on the toy (local backend) and paper (verl) experiments
in a copy of the workflow and check every input, output, log, benchmark file and every path a shell
command passes against the templates of ctpo.layout, with the job's own wildcards.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from ctpo import layout
from test_dag import copy_workflow, snakemake

REPO = Path(__file__).resolve().parent.parent
PATH_FLAGS = ("--config", "--results", "--workdir", "--init", "--checkpoint", "--benchmark", "--out", "--out-dir",
              "--dump", "--done", "--experiment", "--tables", "--figures")


def dry_run_jobs(wf: Path, experiment: str) -> list[dict]:
    """Jobs of a forced dry run: rule, wildcards, files (input/output/log/benchmark) and shell flags."""
    text = snakemake(wf, "-n", "-p", "--forceall", "--configfile", f"configs/experiments/{experiment}.yaml").stdout
    jobs, cur = [], None
    for line in text.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            cur = {"rule": m.group(1), "wildcards": {}, "files": [], "flags": {}}
            jobs.append(cur)
        elif cur is None:
            continue
        elif line.startswith("    ") and ": " in line:
            key, val = line.strip().split(": ", 1)
            if key == "wildcards":
                cur["wildcards"] = dict(item.split("=", 1) for item in val.split(", "))
            elif key in ("input", "output", "log", "benchmark"):
                cur["files"] += val.split(", ")
        elif line.startswith("Shell command: "):
            words = line.removeprefix("Shell command: ").split()
            cur["flags"] = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w in PATH_FLAGS}
        elif not line.strip():
            cur = None
    assert jobs, text[-2000:]
    return jobs


def _regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    out, seen = "", set()
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out += re.escape(part)
        elif part in seen:
            out += f"(?P={part})"
        else:
            seen.add(part)
            out += f"(?P<{part}>[^/]+)"
    return re.compile(out)


def layout_names(exp: str, job: dict, path: str) -> list[str]:
    """Names of the layout templates (and the job's rule log / benchmark) that `path` is, with the job's
    own wildcard values wherever the template uses them."""
    candidates = dict(layout.templates(exp))
    for key in (None, *layout.JOB_KEYS):
        candidates[f"log:{key}"] = layout.rule_log(exp, job["rule"], key)
        candidates[f"bench:{key}"] = layout.rule_benchmark(exp, job["rule"], key)
    hits = []
    for name, template in candidates.items():
        m = _regex(template).fullmatch(path.rstrip("/"))
        if m and all(job["wildcards"].get(k, v) == v for k, v in m.groupdict().items()):
            hits.append(name)
    return hits


@pytest.fixture(scope="module")
def wf(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("wf"))


@pytest.mark.parametrize("experiment", ["toy", "paper"])
def test_every_path_of_the_dag_is_a_layout_path_with_the_jobs_wildcards(wf, experiment):
    exp = yaml.safe_load((REPO / f"configs/experiments/{experiment}.yaml").read_text())["experiment"]
    jobs = dry_run_jobs(wf, experiment)
    unknown = [(j["rule"], p) for j in jobs for p in [*j["files"], *j["flags"].values()]
               if not layout_names(exp, j, p)]
    assert not unknown, f"paths of the DAG that ctpo.layout does not name: {unknown[:10]}"
    rules = {j["rule"] for j in jobs}
    assert {"train", "eval", "run_config", "tables", "figures"} <= rules


@pytest.mark.parametrize("experiment,backend", [("toy", "local"), ("paper", "verl")])
def test_stages_hand_files_over_at_the_layouts_paths(wf, experiment, backend):
    """train writes where eval and diagnostics read: --results / --workdir / --checkpoint / --dump are the
    layout's train_dir, workdir, policy (local) or hf (verl), rollout of the same run, seed and step."""
    exp = yaml.safe_load((REPO / f"configs/experiments/{experiment}.yaml").read_text())["experiment"]
    jobs = dry_run_jobs(wf, experiment)
    seen = set()
    for j in jobs:
        w, f = j["wildcards"], j["flags"]
        if j["rule"] == "train":
            assert f["--results"] == str(layout.path("train_dir", exp=exp, **w))
            assert f["--workdir"] == str(layout.path("workdir", exp=exp, **w))
            assert str(layout.path("train_done", exp=exp, **w)) in j["files"]
            if "--init" in f:
                assert f["--init"] == str(layout.path("sft_policy", exp=exp, seed=w["seed"]))
        elif j["rule"] == "eval":
            kind = "policy" if backend == "local" else "hf"
            assert f["--checkpoint"] == str(layout.path(kind, exp=exp, **w))
            assert f["--out"] == str(layout.path("eval", exp=exp, **w))
            assert str(layout.path("eval_json", exp=exp, **w)) in j["files"]
        elif j["rule"] == "diagnostics":
            assert f["--dump"] == str(layout.path("rollout", exp=exp, **w))
            assert f["--out"] == str(layout.path("diag", exp=exp, **w))
        elif j["rule"] == "merge":
            assert f["--workdir"] == str(layout.path("workdir", exp=exp, run=w["run"], seed=w["seed"]))
        else:
            continue
        seen.add(j["rule"])
    assert {"train", "eval", "diagnostics"} <= seen and ("merge" in seen) == (backend == "verl")


def test_the_evaluators_and_diagnostics_summaries_sit_where_the_layout_says():
    from ctpo.eval.__main__ import sidecar_path

    w = dict(exp="e", run="r", seed=0, step=5, bench="b")
    assert sidecar_path(layout.path("eval", **w)) == layout.path("eval_json", **w)
    # ctpo.diagnostics writes its summary as <out>.with_suffix(".json")
    assert layout.path("diag", **w).with_suffix(".json") == layout.path("diag_json", **w)


def test_a_directory_given_by_path_uses_the_same_templates_as_the_tree():
    w = dict(run="r", seed=3, step=7)
    tree = layout.path("results", exp="e")
    assert layout.results(tree).path("eval", bench="b", **w) == layout.path("eval", exp="e", bench="b", **w)
    assert layout.results(tree).path("metrics", **w) == layout.path("metrics", exp="e", **w)
    wd = layout.path("workdir", exp="e", **w)
    assert layout.workdir(wd).path("rollout", step=7) == layout.path("rollout", exp="e", **w)
    assert layout.train_dir(layout.path("train_dir", exp="e", **w)).path("train_done") == \
        layout.path("train_done", exp="e", **w)
    with pytest.raises(KeyError, match="needs wildcard 'step'"):
        layout.path("eval", exp="e", run="r", seed=0, bench="b")
    with pytest.raises(KeyError, match="no path named 'evals'"):
        layout.path("evals", exp="e")


@pytest.mark.parametrize("total,freq", [(305, 20), (30, 10), (5, 10), (1, 1), (12, 5), (7, 0), (7, -1)])
def test_saved_steps_follow_verls_save_rule(total, freq):
    # verl 0.9.1 RayPPOTrainer.fit: save when save_freq > 0 and (is_last_step or global_steps % save_freq == 0)
    verl = [s for s in range(1, total + 1) if freq > 0 and (s == total or s % freq == 0)]
    assert layout.saved_steps(total, freq) == verl
    assert [s for s in range(1, total + 1) if layout.is_saved_step(s, total, freq)] == verl


def test_done_json_round_trips_and_old_shapes_still_read(tmp_path):
    done = layout.TrainDone(experiment="toy", run="r", seed=0, backend="verl", final_step=3, total_steps=3,
                            saved_steps=[1, 2, 3], dump_steps=[2], metrics_rows=3, wandb_run_id="abc",
                            config_hash="h", checkpoints="runs/toy/r/seed0/checkpoints", attempts=2,
                            final={"step": 3})
    layout.write_done(tmp_path / "done.json", done)
    assert layout.read_done(tmp_path / "done.json") == done
    # the local trainer's shape before the two were unified
    (tmp_path / "local.json").write_text('{"final_step": 4, "saved_steps": [0, 2, 4], "dump_steps": [2], '
                                         '"wandb_run_id": "x", "wandb_mode": "offline", "checkpoints": "c", '
                                         '"final": {"step": 4}}')
    old = layout.read_done(tmp_path / "local.json")
    assert (old.final_step, old.saved_steps, old.dump_steps, old.backend, old.final) == (4, [0, 2, 4], [2], None,
                                                                                         {"step": 4})
    # the verl launcher's: `rollout_dumps` held the dumped steps
    (tmp_path / "verl.json").write_text('{"final_step": 3, "saved_steps": [1, 3], "rollout_dumps": [1], '
                                        '"backend": "verl", "attempts": 1, "metrics_rows": 3}')
    old = layout.read_done(tmp_path / "verl.json")
    assert (old.dump_steps, old.attempts, old.checkpoints) == ([1], 1, None)
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="bad.json: expected a done marker"):
        layout.read_done(tmp_path / "bad.json")


# fragments of the layout that no module but ctpo/layout.py may spell in a path (docstrings, comments,
# messages and help texts may describe it; a layout name such as "checkpoints" is how a module asks for one)
FRAGMENTS = ("metrics.jsonl", "done.json", "provenance.json", "experiment.json", "wandb_run_id", "rollout_dumps",
             "global_step_", "/seed", "checkpoints", "rollouts", "results/", "runs/")
ALLOWED = {
    ("ctpo/train/sft.py", "done.json"),  # the warm start's default marker <out>/done.json (the DAG passes --done)
    ("ctpo/tracking.py", "/seed"),  # the key hashed into W&B run ids; changing it would fork every resumed run
}


def _code_strings(tree: ast.AST):
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    helps = {id(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords
             if k.arg in ("help", "description")}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings | helps:
            if " " not in n.value and n.value not in layout.TEMPLATES:
                yield n.lineno, n.value


def test_no_module_but_the_layout_spells_a_layout_path():
    found = []
    for f in sorted((REPO / "ctpo").rglob("*.py")):
        rel = str(f.relative_to(REPO))
        if rel == "ctpo/layout.py":
            continue
        for lineno, s in _code_strings(ast.parse(f.read_text())):
            found += [f"{rel}:{lineno}: {s!r}" for frag in FRAGMENTS if frag in s and (rel, frag) not in ALLOWED]
    assert not found, "\n".join(found)


def test_steps_on_disk_are_found_through_the_templates(tmp_path):
    from ctpo.train.verl_backend import list_checkpoints

    wd = layout.workdir(tmp_path)
    for s in (2, 10):
        wd.path("rollout", step=s).parent.mkdir(parents=True, exist_ok=True)
        wd.path("rollout", step=s).write_bytes(b"")
    for junk in ("step3.npz.tmp", "stepx.npz", ".step4.npz"):
        (wd.path("rollouts") / junk).write_bytes(b"")
    assert layout.dumped_steps(tmp_path) == [2, 10]
    for s in (1, 3):
        wd.path("verl_actor", step=s).mkdir(parents=True)
    (wd.path("checkpoints") / "global_step_5").mkdir()  # no actor/: not a checkpoint
    assert list_checkpoints(tmp_path) == [1, 3]
    eval_dir = layout.results(tmp_path / "res")
    for s in (0, 20, 100):
        eval_dir.path("eval_step_dir", run="r", seed=1, step=s).mkdir(parents=True)
    eval_dir.path("eval_step_dir", run="r", seed=2, step=7).mkdir(parents=True)
    assert eval_dir.steps("eval_step_dir", run="r", seed=1) == [0, 20, 100]
