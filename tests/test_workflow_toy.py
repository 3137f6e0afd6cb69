"""A real tiny toy run of the whole DAG (run once per test session, reused), and the behaviours users
rely on: nothing to do after success, one changed method reruns only its jobs, figures from a copied
results tree never train or evaluate, --keep-going keeps finished evaluations, kill-and-resume.

Tiny: 2 RL steps of 2 prompts x 2 responses, k = 2 on 2 problems of one benchmark (7 evaluations, not the
11 two benchmarks take), a 4-step warm start.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ctpo.train.local import PAUSE_ENV
from hang import HANG_S
from test_dag import REPO, VENV_BIN, copy_workflow, count, kv, parse_jobs, snakemake

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # a whole DAG run (minutes): `make test-e2e` (CI)

EXP = "tiny"
CFG = "tiny.yaml"


def tiny_experiment() -> dict:
    exp = yaml.safe_load((REPO / "configs/experiments/toy.yaml").read_text())
    exp["experiment"] = EXP
    exp["wandb"]["mode"] = "offline"
    exp["data"]["toy"].update(n_train=64, n_test=4)
    exp["data"]["benchmarks"] = exp["evaluation"]["table2_benchmarks"] = ["toy_arith"]
    d = exp["defaults"]
    d["train"].update(prompts_per_step=2, mini_batch_prompts=2, total_steps=2, save_freq=1, test_freq=100,
                      dump_steps=[1, 2])
    d["rollout"].update(n=2, max_turns=2, sandbox_concurrency=1)
    d["eval"].update(k=2, max_problems=2)
    d["sft"] = {"steps": 4, "batch_size": 4, "n_demos": 16}
    exp["diagnostics"].update(steps=[2], bin_width=8, min_bin_tokens=1)  # 4 sequences per dump
    return exp


def write_config(wf: Path, exp: dict, name: str = CFG) -> str:
    (wf / name).write_text(yaml.safe_dump(exp, sort_keys=False))
    return name


def clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(".snakemake"))
    return dst


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """The tiny experiment, run to completion once; the tests below dry-run or clone it."""
    wf = copy_workflow(tmp_path_factory.mktemp("tiny") / "repo")
    write_config(wf, tiny_experiment())
    snakemake(wf, "--cores", "2", "--configfile", CFG)
    return wf


def test_tiny_run_writes_every_table_and_figure(tiny):
    for n in ("table1", "table2", "table3"):
        for ext in ("md", "tex"):
            assert (tiny / f"results/{EXP}/tables/{n}.{ext}").stat().st_size > 0
    for n in ("figure1", "figure2"):
        for ext in ("pdf", "png"):
            assert (tiny / f"figures/{EXP}/{n}.{ext}").stat().st_size > 0
    for run in ("toy_grpo", "toy_gspo", "toy_ctpo", "toy_ctpo_fixed"):
        assert (tiny / f"results/{EXP}/train/{run}/seed0/done.json").is_file()
        assert (tiny / f"runs/{EXP}/{run}/seed0/checkpoints/step2/policy").is_dir()  # never an output
    assert "toy_ctpo_fixed" in (tiny / f"results/{EXP}/tables/table3.md").read_text()


def test_html_report_embeds_every_table_and_figure(tiny, tmp_path):
    report = tmp_path / "report.html"
    snakemake(tiny, "--report", str(report), "--configfile", CFG)
    html = report.read_text(errors="replace")
    for name in ("table1.md", "table2.md", "table3.tex", "figure1.png", "figure2.pdf"):
        assert name in html, name


def test_second_run_does_nothing(tiny):
    proc = snakemake(tiny, "-n", "--configfile", CFG)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert parse_jobs(proc.stdout) == []


def test_changing_one_method_reruns_only_that_methods_jobs(tiny, tmp_path):
    wf = clone(tiny, tmp_path / "edit")
    shutil.copytree(tiny / ".snakemake/metadata", wf / ".snakemake/metadata")  # params history
    method = wf / "configs/methods/gspo.yaml"
    method.write_text(method.read_text().replace("clip_ratio_high: 0.0004", "clip_ratio_high: 0.0005"))
    jobs = parse_jobs(snakemake(wf, "-n", "--configfile", CFG).stdout)
    per_run = {(j["rule"], kv(j.get("wildcards", "")).get("run")) for j in jobs}
    runs = {r for _, r in per_run if r}
    assert runs == {"toy_gspo"}, per_run
    n = count(jobs)
    assert n["run_config"] == 1 and n["train"] == 1 and n["eval"] >= 1
    assert not {"warmstart", "prepare_toy_data", "experiment_config", "sft_config"} & set(n)
    assert {"tables", "figures"} <= set(n)


def test_figures_from_copied_results_never_train_or_evaluate(tiny, tmp_path):
    fresh = copy_workflow(tmp_path / "fresh")  # a fresh checkout: no data/, runs/, .snakemake/
    shutil.copy2(tiny / CFG, fresh / CFG)
    shutil.copytree(tiny / "results", fresh / "results")
    rng = random.Random(0)
    now = time.time()
    for p in (fresh / "results").rglob("*"):  # scrambled mtimes, as after a download or `cp -r`
        t = now - rng.uniform(0, 30 * 86400)
        os.utime(p, (t, t))
    proc = snakemake(fresh, "--profile", "profiles/reports", "figures", "--configfile", CFG)
    ran = count(parse_jobs(proc.stdout + "\n" + proc.stderr))  # a real run logs its jobs on stderr
    assert ran["figures"] == 1 and set(ran) <= {"figures", "experiment_config"}, ran
    for ext in ("pdf", "png"):
        assert (fresh / f"figures/{EXP}/figure2.{ext}").stat().st_size > 0
    assert not (fresh / "runs").exists() and not (fresh / "data/toy").exists()


def adopt_copy(tiny: Path, dst: Path, edit=None) -> tuple[Path, str]:
    """A fresh checkout holding a copy of the tiny results and figures (scrambled dates, no .snakemake/),
    `edit(checkout)` applied, then adopted as the README says; returns (checkout, adoption output)."""
    fresh = copy_workflow(dst)
    shutil.copy2(tiny / CFG, fresh / CFG)
    for d in ("results", "figures"):
        shutil.copytree(tiny / d, fresh / d)
    rng = random.Random(1)
    now = time.time()
    for p in [*(fresh / "results").rglob("*"), *(fresh / "figures").rglob("*")]:
        t = now - rng.uniform(0, 30 * 86400)
        os.utime(p, (t, t))
    if edit is not None:
        edit(fresh)
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", WANDB_MODE="offline")
    proc = subprocess.run([str(VENV_BIN / "python"), "-m", "ctpo.adopt", "--configfile", CFG], cwd=fresh, env=env,
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return fresh, proc.stdout


def edit_method(wf: Path, name: str, old: str, new: str) -> None:
    f = wf / f"configs/methods/{name}.yaml"
    assert old in f.read_text()
    f.write_text(f.read_text().replace(old, new))


def planned(wf: Path) -> tuple[dict, set]:
    jobs = parse_jobs(snakemake(wf, "-n", "--configfile", CFG).stdout)
    return count(jobs), {kv(j.get("wildcards", "")).get("run") for j in jobs} - {None}


def test_adopted_results_rerun_only_the_edited_method(tiny, tmp_path):
    fresh, _ = adopt_copy(tiny, tmp_path / "fresh")
    n, runs = planned(fresh)
    assert n == {} and runs == set()  # the copied tree is current: nothing to do, whatever its dates
    edit_method(fresh, "gspo", "clip_ratio_high: 0.0004", "clip_ratio_high: 0.0005")
    n, runs = planned(fresh)
    assert runs == {"toy_gspo"}, n
    assert n["run_config"] == 1 and n["train"] == 1 and n["eval"] >= 1
    assert not {"warmstart", "prepare_toy_data", "experiment_config", "sft_config", "diagnostics"} & set(n)
    assert {"tables", "figures"} <= set(n)


def test_adopting_results_made_with_another_method_file_reruns_that_method(tiny, tmp_path):
    """A checkout whose ctpo_fixed.yaml differs from the one the results were made with."""
    fresh, out = adopt_copy(tiny, tmp_path / "other",
                            edit=lambda wf: edit_method(wf, "ctpo_fixed", "fixed_bounds: [0.5, 5.0]",
                                                        "fixed_bounds: [0.4, 5.0]"))
    assert "configs/toy_ctpo_fixed/seed0.json differs" in out and "loss.fixed_bounds" in out
    n, runs = planned(fresh)
    assert runs == {"toy_ctpo_fixed"}, n
    assert n["train"] == 1 and n["eval"] >= 1 and "run_config" not in n  # its config is already this checkout's


def test_keep_going_keeps_finished_evaluations(tiny, tmp_path):
    wf = clone(tiny, tmp_path / "kg")
    ev = wf / f"results/{EXP}/eval"
    good = ev / "toy_ctpo/seed0/step2/toy_arith.parquet"
    bad = ev / "toy_grpo/seed0/step1/toy_arith.parquet"
    for p in (good, bad):
        p.unlink()
        p.with_suffix(".json").unlink()
    shutil.rmtree(wf / f"runs/{EXP}/toy_grpo/seed0/checkpoints/step1")  # this evaluation now fails
    # an evaluation whose output is gone is only rebuilt when asked for (the tables are up to date)
    targets = [str(p.relative_to(wf)) for p in (good, bad)]
    proc = snakemake(wf, *targets, "--cores", "2", "--keep-going", "--configfile", CFG, check=False)
    assert proc.returncode != 0
    assert good.is_file() and good.with_suffix(".json").is_file()
    assert not bad.exists()


def _default_sigint() -> None:
    """Snakemake in a terminal gets Ctrl-C; a suite started in the background (`make test &`, CI runners) has
    SIGINT ignored, which its children inherit. The job under test gets the terminal's default back."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_killed_training_resumes_from_its_checkpoint(tiny, tmp_path):
    wf = clone(tiny, tmp_path / "kill")
    shutil.copytree(tiny / ".snakemake/metadata", wf / ".snakemake/metadata")
    exp = tiny_experiment()
    exp["runs"]["toy_ctpo"]["overrides"] = {"train": {"total_steps": 6, "dump_steps": [2]}}
    write_config(wf, exp)
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", WANDB_MODE="offline")
    ckpts = wf / f"runs/{EXP}/toy_ctpo/seed0/checkpoints"
    shutil.rmtree(ckpts.parent)
    shutil.rmtree(wf / f"results/{EXP}/train/toy_ctpo")
    # the training job waits after step 2 (checkpoint saved) until it is signalled: no race with its speed
    proc = subprocess.Popen(
        [str(VENV_BIN / "snakemake"), "run_toy_ctpo", "--cores", "1", "--configfile", CFG],
        cwd=wf, env={**env, PAUSE_ENV: "2"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, preexec_fn=_default_sigint,
    )
    deadline = time.monotonic() + HANG_S
    while not (ckpts.parent / "paused_after_step2").exists():
        assert proc.poll() is None, f"training ended before it could be killed:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "the training job never reached its pause after step 2"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: Snakemake stops the job and marks it incomplete
    proc.communicate(timeout=HANG_S)
    done = wf / f"results/{EXP}/train/toy_ctpo/seed0/done.json"
    assert not done.exists() and (ckpts / "step2").is_dir()
    snakemake(wf, "run_toy_ctpo", "--cores", "1", "--configfile", CFG)
    log = (wf / f"logs/{EXP}/train/toy_ctpo/seed0.log").read_text()
    m = re.search(r"resuming from \S+ \(step (\d+)\)", log)
    assert m and int(m.group(1)) >= 2, log[-2000:]
    assert done.is_file() and (ckpts / "step6").is_dir()
