"""Offline compute nodes: a job whose model is not on disk fails in seconds with one line naming the fix;
a model fetched into the cache (or a local directory) is found without the network."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from ctpo.config import REPO_ROOT, load_experiment, resolve_run
from ctpo.hub import MissingLocalFiles, require_model


def _fake_cache(home, repo="Qwen/Qwen3-4B", commit="a" * 40):
    snap = home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"hidden_size": 2560}))
    refs = snap.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text(commit)
    return snap


def test_model_in_the_cache_or_a_directory_is_found_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = _fake_cache(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    from huggingface_hub import snapshot_download

    assert snapshot_download("Qwen/Qwen3-4B", local_files_only=True, cache_dir=tmp_path / "hub") == str(snap)
    assert require_model(str(snap)) == snap  # a local directory
    with pytest.raises(MissingLocalFiles, match=r"no config\.json"):
        require_model(str(tmp_path))


def _unshare_net() -> list[str]:
    """`unshare -n` (a network namespace with no interfaces) when this user may create one."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n"]
    return []


def test_training_job_with_missing_model_stops_at_once_with_the_network_cut(tmp_path):
    cfg = resolve_run(load_experiment(REPO_ROOT / "configs" / "experiments" / "paper.yaml"), "qwen3_4b_ctpo", 0)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([*_unshare_net(), sys.executable, "-m", "ctpo.train", "--config", str(tmp_path / "cfg.json"),
                           "--results", str(tmp_path / "r"), "--workdir", str(tmp_path / "w")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: model Qwen/Qwen3-4B is not in the local HF cache ({tmp_path / 'hf' / 'hub'}) and this job runs "
        "offline (LocalEntryNotFoundError); fetch it where the network is: python -m ctpo.hub fetch --model Qwen/Qwen3-4B"
    ]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()  # nothing started
