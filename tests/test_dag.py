"""The Snakemake DAG, dry-run: job counts per rule, resources, targets, parse-time config errors.

Each test runs `snakemake -n` in a temporary copy of the workflow (Snakefile, workflow/, configs/,
profiles/), so no .snakemake/ state of the checkout is touched. Expected counts are computed here with
plain loops from the experiment YAML, independently of ctpo.configure.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hang import HANG_S

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def copy_workflow(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "Snakefile", dst / "Snakefile")
    for d in ("workflow", "configs", "profiles", "envs"):
        shutil.copytree(REPO / d, dst / d, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def snakemake(cwd: Path, *args: str, check: bool = True, timeout: int = HANG_S) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", WANDB_MODE="offline")
    proc = subprocess.run(
        [str(VENV_BIN / "snakemake"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def parse_jobs(text: str) -> list[dict]:
    """Job blocks of a dry-run (`rule NAME:` / `localrule NAME:` then indented `key: value` lines)."""
    jobs, cur = [], None
    for line in text.splitlines():
        m = re.match(r"^(local)?rule (\w+):$", line)
        if m:
            cur = {"rule": m.group(2)}
            jobs.append(cur)
        elif cur is not None and line.startswith("    ") and ": " in line:
            key, val = line.strip().split(": ", 1)
            cur[key] = val
        elif not line.strip():
            cur = None
    return jobs


def kv(s: str) -> dict:
    return dict(item.split("=", 1) for item in s.split(", ")) if s else {}


def count(jobs: list[dict]) -> dict:
    out: dict[str, int] = {}
    for j in jobs:
        out[j["rule"]] = out.get(j["rule"], 0) + 1
    return out


@pytest.fixture(scope="module")
def wf(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("wf"))


def expected_eval_keys(exp: dict, runs_cfg: dict[str, tuple[int, int]]) -> set:
    """(run, seed, step, bench) by hand: finals of table runs on table benchmarks, and Figure 2 steps."""
    ev, out = exp["evaluation"], set()
    for seed in exp["seeds"]:
        for run in ev["table2_runs"] + ev["table3_runs"]:
            total, _ = runs_cfg[run]
            for b in ev["table2_benchmarks"]:
                out.add((run, seed, total, b))
        for run in ev["figure2_runs"]:
            total, freq = runs_cfg[run]
            step = freq
            while step <= total:
                out.add((run, seed, step, ev["figure2_benchmark"]))
                step += freq
            out.add((run, seed, total, ev["figure2_benchmark"]))
    return out


def test_paper_dryrun_job_counts_and_gpu_resources(wf):
    exp = yaml.safe_load((REPO / "configs/experiments/paper.yaml").read_text())
    proc = snakemake(wf, "-n", "--configfile", "configs/experiments/paper.yaml")
    jobs = parse_jobs(proc.stdout)
    n = count(jobs)
    total = exp["defaults"]["train"]["total_steps"]
    freq = exp["defaults"]["train"]["save_freq"]
    evals = expected_eval_keys(exp, {r: (total, freq) for r in exp["runs"]})
    assert n["train"] == 7 == len(exp["runs"]) * len(exp["seeds"])
    assert n["eval"] == len(evals) == 73  # 6 x 4 (Table 2) + 4 (ablation) + 3 x 16 steps - 3 shared
    assert n["merge"] == len({(r, s, t) for r, s, t, _ in evals})  # verl: one HF merge per evaluated ckpt
    assert n["diagnostics"] == len(exp["diagnostics"]["steps"])
    assert n["tables"] == n["figures"] == n["table1"] == 1
    assert "warmstart" not in n  # no toy SFT for verl runs
    # hub files are fetched once per model by `prepare_model` (a localrule: the login node's network)
    assert n["prepare_model"] == 2 and n["prepare_deepscaler"] == 1
    got_evals = {
        (w["run"], int(w["seed"]), int(w["step"]), w["bench"])
        for j in jobs
        if j["rule"] == "eval"
        for w in [kv(j["wildcards"])]
    }
    assert got_evals == evals
    for j in jobs:
        res = kv(j.get("resources", ""))
        if j["rule"] == "train":
            assert res["gpu"] == "8" and res["nodes"] == "1"  # GPU type, CPUs, memory, time: the slurm profile's
        elif j["rule"] in ("eval", "preflight"):
            assert res["gpu"] == "1" and res["nodes"] == "1"
        else:
            assert "gpu" not in res, f"{j['rule']} asks for a GPU"


def test_toy_default_never_asks_for_a_gpu(wf):
    proc = snakemake(wf, "-n")  # no --configfile: the toy default
    jobs = parse_jobs(proc.stdout)
    n = count(jobs)
    exp = yaml.safe_load((REPO / "configs/experiments/toy.yaml").read_text())
    t = exp["defaults"]["train"]
    evals = expected_eval_keys(exp, {r: (t["total_steps"], t["save_freq"]) for r in exp["runs"]})
    assert n["train"] == len(exp["runs"]) and n["warmstart"] == 1 and n["eval"] == len(evals)
    assert "merge" not in n and "prepare_deepscaler" not in n
    for j in jobs:
        res = kv(j.get("resources", ""))
        assert "gpu" not in res and "gpu_model" not in res, j
    assert "--gpus" not in proc.stdout


def test_seeds_are_a_wildcard(wf):
    proc = snakemake(wf, "-n", "--config", "seeds=[0,1,2]")
    n = count(parse_jobs(proc.stdout))
    assert n["train"] == 4 * 3 and n["warmstart"] == 3 and n["run_config"] == 12


def test_run_target_trains_only_that_run(wf):
    proc = snakemake(wf, "-n", "run_qwen3_14b_ctpo_fixed", "--configfile", "configs/experiments/paper.yaml")
    jobs = parse_jobs(proc.stdout)
    trains = [kv(j["wildcards"])["run"] for j in jobs if j["rule"] == "train"]
    assert trains == ["qwen3_14b_ctpo_fixed"]
    assert "eval" not in count(jobs)


def test_table3_ablation_target_evaluates_only_table3_runs(wf):
    exp = yaml.safe_load((REPO / "configs/experiments/paper.yaml").read_text())
    proc = snakemake(wf, "-n", "table3_ablation", "--configfile", "configs/experiments/paper.yaml")
    jobs = parse_jobs(proc.stdout)
    runs = {kv(j["wildcards"])["run"] for j in jobs if j["rule"] in ("train", "eval")}
    assert runs == set(exp["evaluation"]["table3_runs"])
    assert count(jobs)["eval"] == len(exp["evaluation"]["table3_runs"]) * len(exp["evaluation"]["table2_benchmarks"])


def _bad_config(wf: Path, name: str, mutate) -> str:
    exp = yaml.safe_load((REPO / "configs/experiments/toy.yaml").read_text())
    mutate(exp)
    path = wf / f"{name}.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path.name


def test_unknown_top_level_key_fails_at_parse_time_naming_it(wf):
    cfg = _bad_config(wf, "bad_top", lambda e: e.__setitem__("evalution", {}))
    proc = snakemake(wf, "-n", "--configfile", cfg, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "'evalution' was unexpected" in out and "Building DAG" not in out


def test_schema_takes_the_executors_resource_keys_and_names_an_unknown_one(wf):
    def partitions(e):
        e["resources"]["cpu"] = {"constraint": "skylake", "mem_mb_per_cpu": 2000, "cpus_per_task": 2}
        e["resources"]["train"] = {"nodes": 1, "gres": "gpu:2", "slurm_extra": "--mail-type=FAIL", "qos": "long"}

    proc = snakemake(wf, "-n", "--configfile", _bad_config(wf, "good_res", partitions))
    jobs = parse_jobs(proc.stdout)
    cpu = [kv(j["resources"]) for j in jobs if j["rule"] == "prepare_toy_data"]
    assert cpu and cpu[0]["constraint"] == "skylake" and cpu[0]["mem_mb_per_cpu"] == "2000"
    train = [kv(j["resources"]) for j in jobs if j["rule"] == "train"]
    assert train and all(r["nodes"] == "1" and r["gres"] == "gpu:2" for r in train)
    # partition and account are the cluster's (the slurm profile), never the experiment's
    for key in ("partition", "slurm_partition", "slurm_account"):
        bad = _bad_config(wf, f"bad_{key}", lambda e: e["resources"]["train"].__setitem__(key, "gpu"))
        proc = snakemake(wf, "-n", "--configfile", bad, check=False)
        assert proc.returncode != 0 and f"'{key}' was unexpected" in proc.stdout + proc.stderr


def test_mistyped_run_override_fails_at_parse_time_naming_the_key(wf):
    cfg = _bad_config(
        wf, "bad_run", lambda e: e["runs"]["toy_gspo"].__setitem__("overrides", {"train": {"total_step": 3}})
    )
    proc = snakemake(wf, "-n", "--configfile", cfg, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "runs.toy_gspo.overrides" in out and "total_step" in out


def test_unknown_run_in_evaluation_fails_naming_it(wf):
    cfg = _bad_config(wf, "bad_eval", lambda e: e["evaluation"]["table3_runs"].append("toy_nope"))
    proc = snakemake(wf, "-n", "--configfile", cfg, check=False)
    assert proc.returncode != 0
    assert "evaluation.table3_runs: unknown run 'toy_nope'" in proc.stdout + proc.stderr


def test_every_rule_is_thin_and_complete():
    """Style: input/output/log/benchmark/conda on every job rule, shell <= 3 lines ending `> {log} 2>&1`."""
    text = "\n".join(p.read_text() for p in sorted((REPO / "workflow/rules").glob("*.smk")))
    assert "run:" not in text
    blocks = re.split(r"\n(?=rule \w+:)", text)
    job_rules = [b for b in blocks if b.startswith("rule ") and "shell:" in b]
    assert len(job_rules) >= 13
    for b in job_rules:
        name = b.split(":")[0]
        for key in ("output:", "log:", "benchmark:", "conda:"):
            assert f"    {key}" in b, f"{name} lacks {key}"
        shell = b.split("shell:")[1].strip().splitlines()
        shell = [s for s in shell if s.strip().startswith('"')]
        assert 1 <= len(shell) <= 3, name
        assert shell[-1].strip().endswith('2>&1"'), name
        assert "python -m ctpo." in " ".join(shell), name
    assert len((REPO / "Snakefile").read_text().splitlines()) <= 50


def test_figures_from_copied_paper_results_schedule_no_training_or_evaluation(tmp_path):
    """A results/ tree copied into a fresh checkout with scrambled mtimes (no data/, runs/, .snakemake/):
    `snakemake --profile profiles/reports figures tables` schedules only report jobs. The tree is built
    from the dry-run's output list."""
    import random
    import time

    wf = copy_workflow(tmp_path / "fresh")
    dry = snakemake(wf, "-n", "--configfile", "configs/experiments/paper.yaml")
    outputs = [o for j in parse_jobs(dry.stdout) for o in j.get("output", "").split(", ") if o]
    assert any("/train/" in o for o in outputs) and any("/eval/" in o for o in outputs)
    rng, now = random.Random(1), time.time()
    for rel in outputs:
        if rel.startswith("results/"):
            p = wf / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("{}\n")
            t = now - rng.uniform(0, 90 * 86400)
            os.utime(p, (t, t))
    args = ("figures", "tables", "--configfile", "configs/experiments/paper.yaml")
    proc = snakemake(wf, "-n", "--profile", "profiles/reports", *args)
    ran = count(parse_jobs(proc.stdout))
    assert ran["figures"] == 1 and set(ran) <= {"figures", "tables", "table1"}, ran  # reports only
    # without the reports profile, Snakemake's mtime rule would re-evaluate: that is why it exists
    plain = count(parse_jobs(snakemake(wf, "-n", *args).stdout))
    assert plain.get("eval", 0) > 0
    assert not (wf / "data").exists()
