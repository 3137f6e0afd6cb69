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
    assert proc.returncode == 78, proc.stderr[-2000:]  # 78: the workflow does not resubmit it
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    rev = cfg["model"]["revision"]
    assert rev == "1cfa9a7208912126459214e8b04321603b3df60c"  # configs/models/qwen3_4b.yaml's pin
    assert errors == [
        f"error: model Qwen/Qwen3-4B at revision {rev} is not in the local HF cache ({tmp_path / 'hf' / 'hub'}) and "
        "this job runs offline (LocalEntryNotFoundError); fetch it where the network is: python -m ctpo.hub fetch "
        f"--model Qwen/Qwen3-4B --revision {rev}"
    ]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()  # nothing started


def test_the_pinned_revision_is_required_on_disk(tmp_path, monkeypatch):
    """model.revision is enforced offline: another commit's snapshot (in the cache or as a directory) fails in
    one line naming both commits; the pinned snapshot is returned (what verl and the evaluator then load)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    old, pinned = "a" * 40, "b" * 40
    snap = _fake_cache(tmp_path, commit=old)
    assert require_model("Qwen/Qwen3-4B") == snap  # unpinned: whatever main points at
    assert require_model("Qwen/Qwen3-4B", old) == snap
    with pytest.raises(MissingLocalFiles) as e:
        require_model("Qwen/Qwen3-4B", pinned)
    msg = str(e.value)
    assert "\n" not in msg and f"at revision {old}, not model.revision {pinned}" in msg
    assert msg.endswith(f"python -m ctpo.hub fetch --model Qwen/Qwen3-4B --revision {pinned}")
    assert require_model(str(snap), old) == snap  # a snapshot directory carries its commit
    with pytest.raises(MissingLocalFiles, match=rf"not the hub snapshot of model.revision {pinned} \(it is {old}\)"):
        require_model(str(snap), pinned)
    plain = tmp_path / "mine"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert require_model(str(plain)) == plain
    with pytest.raises(MissingLocalFiles, match=r"no hub revision to check.*model.revision: null"):
        require_model(str(plain), pinned)
    with pytest.raises(MissingLocalFiles, match=r"model directory .*/gone/policy does not exist"):
        require_model(str(tmp_path / "gone" / "policy"))


def test_paper_models_are_pinned_to_a_commit():
    import re

    paper = load_experiment(REPO_ROOT / "configs" / "experiments" / "paper.yaml")
    for run in ("qwen3_4b_ctpo", "qwen3_14b_ctpo"):
        rev = resolve_run(paper, run, 0)["model"]["revision"]
        assert re.fullmatch(r"[0-9a-f]{40}", rev), (run, rev)


def test_prepare_model_fetches_the_pinned_revision(tmp_path):
    """The login-node rule fetches exactly the commit the offline jobs will require."""
    from test_dag import copy_workflow, snakemake

    wf = copy_workflow(tmp_path / "wf")
    target = "results/paper/data/model_qwen3_14b.json"
    proc = snakemake(wf, target, "-n", "-p", "--configfile", "configs/experiments/paper.yaml")
    assert ("python -m ctpo.hub fetch --model Qwen/Qwen3-14B --revision 40c069824f4251a91eefaf281ebe4c544efd3e18 "
            f"--out {target}") in proc.stdout
