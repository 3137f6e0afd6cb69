"""No silent fallback on the cluster (issue 19, item 2): a GPU run's evaluation asks for vLLM and a verl run on
the `gpu` device asks for CUDA; without them each stops in one line with EXIT_PERMANENT (78, never resubmitted)
before loading anything. The toy keeps `--backend auto` (HF generate on CPU): tests/test_cluster_dag.py.

This machine has neither CUDA nor vLLM, so the real checks fail here as they would on a CPU node.
"""
from __future__ import annotations

import importlib.util
import json

import pytest

from ctpo.config import load_experiment, load_run_config, resolve_run
from ctpo.exitcodes import EXIT_PERMANENT
from test_dag import REPO

no_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _toy_verl_cfg(tmp_path, device: str):
    exp = load_experiment(REPO / "configs/experiments/toy_verl.yaml")
    d = resolve_run(exp, next(iter(exp["runs"])), 0)
    d["train"]["verl_device"] = device
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(d))
    return d, path


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@no_vllm
def test_eval_without_vllm_fails_in_one_line_before_loading_the_model(tmp_path, capsys):
    from ctpo.eval.__main__ import main

    _, cfg = _toy_verl_cfg(tmp_path, "gpu")
    ckpt = tmp_path / "hf" / "step2"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")  # would not load: the backend check must come first
    out = tmp_path / "eval" / "toy_arith.parquet"
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(cfg), "--checkpoint", str(ckpt), "--benchmark", str(tmp_path / "missing.parquet"),
              "--step", "2", "--out", str(out), "--backend", "vllm"])
    assert exc.value.code == EXIT_PERMANENT
    line = _one_line(capsys.readouterr().err)
    assert "--backend vllm" in line and "vllm package is not installed" in line and "not falling back" in line
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.skipif(_has_cuda(), reason="a CUDA device is visible here")
def test_verl_on_gpu_without_cuda_fails_in_one_line_before_verl_starts(tmp_path, capsys):
    from ctpo.train import verl_backend

    d, _ = _toy_verl_cfg(tmp_path, "gpu")
    cfg = load_run_config(d)
    wd = tmp_path / "runs" / "w"
    with pytest.raises(SystemExit) as exc:
        verl_backend.main(cfg, tmp_path / "results", wd, init=str(tmp_path / "no_policy"))
    assert exc.value.code == EXIT_PERMANENT
    line = _one_line(capsys.readouterr().err)
    assert "train.verl_device gpu" in line and "0 CUDA device(s)" in line and "verl_device cpu" in line
    assert not wd.exists()  # nothing claimed, no Ray, no verl
