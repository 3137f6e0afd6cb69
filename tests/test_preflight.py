"""GPU preflight (issue 19, item 3): each check's failure (fakes only where this CPU machine cannot stand in: a CUDA
torch, nvidia-smi, a full disk), the real sandbox and model checks, the one-line exit 78 of the real CLI here, and a
real Snakemake run whose failed preflight stops it before any training starts (the dry-run DAG ordering:
tests/test_cluster_dag.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from collections import namedtuple
from pathlib import Path

import pytest

from ctpo import hub, preflight
from ctpo.config import canonical_json, load_experiment, resolve_run
from ctpo.exitcodes import EXIT_PERMANENT
from hang import HANG_S
from test_dag import REPO, VENV_BIN, copy_workflow

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

PAPER = load_experiment(REPO / "configs/experiments/paper.yaml")


def snapshot(cache: Path, repo: str, revision: str, weights: int = 1000, shards: int = 2, drop: int = 0) -> Path:
    """A hub-cache snapshot as huggingface_hub lays it out (blobs + links, refs/main), `drop` shards missing."""
    root = cache / "hub" / f"models--{repo.replace('/', '--')}"
    snap, blobs = root / "snapshots" / revision, root / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir(exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    files = {"config.json": b"{}", "tokenizer_config.json": b"{}", "tokenizer.json": b"{}",
             "model.safetensors.index.json": json.dumps({"weight_map": {f"w{i}": n for i, n in enumerate(names)}}).encode()}
    files.update({n: b"w" * (weights // shards) for n in names[: shards - drop]})
    for name, data in files.items():
        blob = blobs / f"{abs(hash((repo, name)))}"
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return snap


def test_model_completeness_every_shard_of_the_index(tmp_path, monkeypatch):
    rev = "a" * 40
    full = snapshot(tmp_path / "c1", "Qwen/X", rev)
    assert hub.incomplete(full) == []
    partial = snapshot(tmp_path / "c2", "Qwen/X", rev, shards=3, drop=1)
    assert hub.incomplete(partial) == ["1 of 3 weight shards named in model.safetensors.index.json are missing "
                                       "(model-00003-of-00003.safetensors)"]
    only_config = tmp_path / "c3" / "snap"
    only_config.mkdir(parents=True)
    (only_config / "config.json").write_text("{}")
    assert hub.incomplete(only_config) == ["no tokenizer_config.json", "no tokenizer file (tokenizer.json / "
                                           "tokenizer.model / vocab.json)", "no weights (model.safetensors.index.json"
                                           " / pytorch_model.bin.index.json / model.safetensors / pytorch_model.bin)"]
    blob = Path(os.path.realpath(full / "tokenizer.json"))
    blob.unlink()  # a cache whose blob was cleaned away
    assert hub.incomplete(full) == ["tokenizer.json is a dangling link (its blob is missing)",
                                    "no tokenizer file (tokenizer.json / tokenizer.model / vocab.json)"]
    # `python -m ctpo.hub check` passed a config.json-only snapshot before; now it names what is missing
    snapshot(tmp_path / "c4", "Qwen/Y", rev, shards=2, drop=2)
    env = dict(os.environ, HF_HOME=str(tmp_path / "c4"))
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "ctpo.hub", "check", "--model", "Qwen/Y", "--revision", rev],
                          capture_output=True, text=True, env=env, timeout=HANG_S)
    assert proc.returncode == 2 and "2 of 2 weight shards" in proc.stderr and "ctpo.hub fetch" in proc.stderr


def fake_cuda_torch(monkeypatch, cuda="13.0"):
    import torch

    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")


def test_gpu_stack_fails_here_and_passes_with_a_cuda_torch_and_the_modules(monkeypatch):
    with pytest.raises(preflight.CheckFailed) as e:
        preflight.check_gpu_stack()  # this machine: CPU torch, no vllm, no flash_attn
    assert "is a CPU build" in str(e.value) and "vllm does not import" in str(e.value)
    assert "flash_attn does not import" in str(e.value) and "verl does not" not in str(e.value)
    fake_cuda_torch(monkeypatch)
    mods = {n: types.SimpleNamespace(__version__=v) for n, v in (("vllm", "0.24.0"), ("verl", "0.9.1"))}

    def imp(name):
        if name == "flash_attn":
            raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c10")
        return mods[name]

    with pytest.raises(preflight.CheckFailed, match=r"^flash_attn does not import \(ImportError: .*undefined symbol"):
        preflight.check_gpu_stack(imp)
    mods["flash_attn"] = types.SimpleNamespace(__version__="2.8.3")
    seen = preflight.check_gpu_stack(lambda n: mods[n])
    assert seen["gpus"] == 8 and seen["vllm"] == "0.24.0" and seen["flash_attn"] == "2.8.3"


def fake_nvidia_smi(tmp_path, monkeypatch, version: str | None) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if version is not None:
        (bin_dir / "nvidia-smi").write_text(f'#!/bin/sh\necho "$*" > "{bin_dir}/args"\necho {version}\necho {version}\n')
        (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return bin_dir


@pytest.mark.parametrize("driver, cuda, ok", [
    ("535.104.05", "13.0", False), ("580.65.06", "13.0", True), ("580.82.07", "13.2", True),
    ("575.57.08", "13.0", False), ("550.54.15", "12.8", True), ("470.256.02", "12.8", False),
])
def test_driver_against_torchs_cuda_build(tmp_path, monkeypatch, driver, cuda, ok):
    fake_cuda_torch(monkeypatch, cuda)
    bin_dir = fake_nvidia_smi(tmp_path, monkeypatch, driver)
    need = {"13": (580, 65, 6), "12": (525, 60, 13)}[cuda.split(".")[0]]  # NVIDIA's minor-version floors
    have = tuple(int(x) for x in driver.split("."))
    assert (have >= need) == ok
    if ok:
        assert preflight.check_driver() == {"driver": driver, "min_driver": ".".join(
            f"{x:02d}" if i == 2 else str(x) for i, x in enumerate(need)), "torch_cuda": cuda}
    else:
        with pytest.raises(preflight.CheckFailed, match=f"NVIDIA driver {driver} is older than"):
            preflight.check_driver()
    assert (bin_dir / "args").read_text().split() == ["--query-gpu=driver_version", "--format=csv,noheader"]


def test_driver_without_nvidia_smi_or_with_cpu_torch(tmp_path, monkeypatch):
    with pytest.raises(preflight.CheckFailed, match="CPU build"):
        preflight.check_driver()
    fake_cuda_torch(monkeypatch)
    fake_nvidia_smi(tmp_path, monkeypatch, None)
    with pytest.raises(preflight.CheckFailed, match="nvidia-smi not found"):
        preflight.check_driver()


def test_sandbox_really_runs_here_and_its_failure_is_named(monkeypatch):
    from ctpo.config import RolloutConfig
    from ctpo.sandbox import runner

    seen = preflight.check_sandbox([RolloutConfig()])
    assert seen["isolation"] in ("root", "userns")
    monkeypatch.setattr(runner, "_probe", lambda mode: "unshare(CLONE_NEWUSER) failed: Operation not permitted")
    with pytest.raises(preflight.CheckFailed, match="sandbox isolation is not available here: .*CLONE_NEWUSER"):
        preflight.check_sandbox([RolloutConfig()])


def test_disk_need_follows_the_retention_plan(tmp_path, monkeypatch):
    model = tmp_path / "m"
    model.mkdir()
    (model / "model-1.safetensors").write_bytes(b"w" * 600)
    (model / "model-2.safetensors").write_bytes(b"w" * 400)
    (model / "config.json").write_text("{}")  # not weights
    runs = [{"run": "a", "seed": 0, "model_path": "M", "keep": [20, 40, 305], "total_steps": 305},
            {"run": "b", "seed": 0, "model_path": "M", "keep": [305], "total_steps": 305}]
    # by hand, per byte of bf16 weights: 2 full checkpoints x (4 + 8 B/param = 6x), earlier evaluated steps
    # model-only (4 B/param = 2x), one bf16 merge (1x) per evaluated step
    want = 1000 * (2 * 6 + 2 * 2 + 3 * 1) + 1000 * (2 * 6 + 0 + 1)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(10**12, 0, want))
    seen = preflight.check_disk(runs, {"M": str(model)}, tmp_path / "runs")
    assert seen["need_bytes"] == want and seen["per_run"] == {"a seed 0": 19000, "b seed 0": 13000}
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(10**12, 0, want - 1))
    with pytest.raises(preflight.CheckFailed, match=r"runs has 0 GB free, training keeps up to 0 GB \(a seed 0 "):
        preflight.check_disk(runs, {"M": str(model)}, tmp_path / "runs")


def paper_plan(tmp_path, runs=("qwen3_4b_grpo",)) -> str:
    items = []
    for run in runs:
        p = tmp_path / "configs" / f"{run}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(resolve_run(PAPER, run, 0)))
        items.append({"config": str(p), "keep": [305]})
    return json.dumps({"runs": items})


def test_cli_on_this_cpu_node_fails_once_in_one_line(tmp_path):
    cfg = resolve_run(PAPER, "qwen3_4b_grpo", 0)
    snapshot(tmp_path / "hf", cfg["model"]["path"], cfg["model"]["revision"])
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), PATH="/usr/bin:/bin")  # no nvidia-smi
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "preflight" / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "ctpo.preflight", "--plan", paper_plan(tmp_path), "--runs-dir",
                           str(tmp_path / "runs"), "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=HANG_S)
    assert proc.returncode == EXIT_PERMANENT
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("preflight failed on ") and "gpu_stack: torch" in lines[0]
    assert "driver: torch" in lines[0] and "CPU build" in lines[0]
    assert "sandbox:" not in lines[0] and "model:" not in lines[0] and "disk:" not in lines[0]  # those passed
    assert not out.exists()


def test_failed_preflight_stops_a_real_snakemake_run_before_training(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    hf = tmp_path / "hf"
    for model in ("qwen3_4b", "qwen3_14b"):
        m = load_experiment(REPO / f"configs/models/{model}.yaml")
        snapshot(hf, m["path"], m["revision"])
    env = dict(os.environ, HF_HOME=str(hf), PATH=f"{VENV_BIN}:/usr/bin:/bin", WANDB_MODE="offline")
    env.pop("HF_HUB_CACHE", None)
    target = "results/paper/train/qwen3_4b_grpo/seed0/done.json"
    # what the login node and the config rules leave before a training: data and model markers, run configs
    markers = {f"results/paper/data/{m}.json": "{}" for m in ("deepscaler", "model_qwen3_4b", "model_qwen3_14b")}
    markers.update({f"results/paper/configs/{r}/seed0.json": canonical_json(resolve_run(PAPER, r, 0)) for r in PAPER["runs"]})
    for rel, text in markers.items():
        (wf / rel).parent.mkdir(parents=True, exist_ok=True)
        (wf / rel).write_text(text)
    proc = subprocess.run([str(VENV_BIN / "snakemake"), target, "--configfile", "configs/experiments/paper.yaml",
                           "--cores", "1", "--allowed-rules", "preflight", "train"], cwd=wf, env=env,
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode != 0
    log = (wf / "logs/paper/preflight/gpu.log").read_text().strip().splitlines()
    assert len(log) == 1 and log[0].startswith("preflight failed on ") and "gpu_stack:" in log[0]
    assert "Error in rule preflight" in proc.stdout + proc.stderr
    assert not (wf / "logs/paper/train").exists() and not (wf / "runs").exists()  # no training started
    assert not (wf / "results/paper/preflight/gpu.json").exists()
    shutil.rmtree(wf)
