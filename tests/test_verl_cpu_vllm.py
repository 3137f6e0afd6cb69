"""`train.verl_cpu_rollout: vllm`: the `cpu` device profile with verl's own vLLM rollout (vLLM's CPU build) in
place of the HF-generate server. Without Ray or vLLM: the command (the paper run's, but for device keys),
verl's composition and validation of it, and the one-line errors. The run itself is tests/test_vllm_*.py
(`make test-vllm`, in the vLLM test environment)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

pytest.importorskip("verl")

from ctpo.config import CPU_PROFILE_VERL, config_hash, load_experiment, load_run_config, resolve_run  # noqa: E402
from ctpo.train import verl_backend as vb  # noqa: E402
from ctpo.train import verl_command as vc  # noqa: E402
from test_verl_backend import verl_argv  # noqa: E402
from test_verl_cpu import CPU_DEVICE_KEYS  # noqa: E402
from ctpo.train import verl_cpu  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _paper(**train) -> dict:
    d = resolve_run(load_experiment(REPO / "configs/experiments/paper.yaml"), "qwen3_4b_ctpo", 0)
    d["train"].update(train)
    return d


def _paper_on_cpu(**train) -> dict:
    """The paper run with the train.verl values the cpu profile needs (ctpo.config.CPU_PROFILE_VERL; the
    vllm rollout: a weight-sync bucket of 64 MB, a /dev/shm segment on CPU)."""
    d = _paper(verl_device="cpu", **train)
    d["train"]["verl"].update(CPU_PROFILE_VERL, weight_sync_bucket_mb=64)
    return d


def _keys(argv: list[str]) -> dict[str, str]:
    return {a.split("=", 1)[0].lstrip("+"): a.split("=", 1)[1] for a in argv}


@pytest.fixture
def vllm_cpu_present(monkeypatch):
    """The vLLM test environment's check passes (its own test is below; this venv has no vLLM)."""
    monkeypatch.setattr(verl_cpu, "check_vllm_cpu", lambda: None)


def test_paper_command_on_cpu_with_vllm_differs_from_the_gpu_command_only_in_device_keys(
        tmp_path, vllm_cpu_present, capsys):
    on_cpu = load_run_config(_paper_on_cpu(verl_cpu_rollout="vllm"))
    same_on_gpu = _paper_on_cpu()
    same_on_gpu["train"]["verl_device"] = "gpu"
    gpu, cpu = verl_argv(load_run_config(same_on_gpu), tmp_path / "w"), verl_argv(on_cpu, tmp_path / "w")
    print("GPU command:\n" + vc.format_command(gpu) + "\nCPU (vLLM rollout) command:\n" + vc.format_command(cpu))
    assert cpu[:len(gpu)] == gpu  # the paper's rollout engine (vllm) on both; the device keys come after
    ro = "actor_rollout_ref.rollout"
    vllm_keys = {f"{ro}.enable_sleep_mode", f"{ro}.enforce_eager", f"{ro}.dtype", f"{ro}.enable_chunked_prefill",
                 f"{ro}.engine_kwargs.vllm.worker_extension_cls"}
    c = _keys(cpu[len(gpu):])
    assert c.keys() == CPU_DEVICE_KEYS | vllm_keys
    assert c["ray_kwargs.ray_init.num_gpus"] == "8"  # the paper's 8 GPUs: 8 logical devices on the CPU
    assert c[f"{ro}.engine_kwargs.vllm.worker_extension_cls"] == verl_cpu.VLLM_WORKER_EXTENSION
    assert _keys(cpu[3:])[f"{ro}.checkpoint_engine.update_weights_bucket_megabytes"] == "64"  # the config's
    out = capsys.readouterr().out
    assert "GPU command:" in out and "worker_extension_cls" in out


def test_the_vllm_profile_needs_a_small_weight_sync_bucket():
    from ctpo.config import ConfigError

    d = _paper_on_cpu(verl_cpu_rollout="vllm")
    d["train"]["verl"]["weight_sync_bucket_mb"] = 4096  # the paper's: a 4 GiB /dev/shm segment on CPU
    with pytest.raises(ConfigError, match=r"train\.verl\.weight_sync_bucket_mb: the cpu device profile with "
                                          r"train\.verl_cpu_rollout vllm needs <= 64 .*got 4096$"):
        load_run_config(d)


def test_vllm_profile_composes_and_passes_verls_validation(tmp_path, vllm_cpu_present):
    from hydra import compose, initialize_config_dir
    import os

    import verl
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    exp = load_experiment(REPO / "configs/experiments/toy_verl.yaml")
    exp["runs"]["toy_ctpo"]["model"] = "toy_vllm"  # head_dim 32 (configs/models/toy_vllm.yaml)
    d = resolve_run(exp, "toy_ctpo", 0)
    d["train"]["verl_cpu_rollout"] = "vllm"
    d["train"]["verl"]["weight_sync_bucket_mb"] = 64
    cfg = load_run_config(d)
    argv = verl_argv(cfg, tmp_path / "w", init=tmp_path / "policy")[3:]
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"),
                               version_base=None):
        c = compose("ppo_trainer", overrides=argv)
    r = c.actor_rollout_ref.rollout
    assert r.name == "vllm" and r.enforce_eager is True and r.enable_sleep_mode is False
    assert r.dtype == "float32" and r.enable_chunked_prefill is False
    assert r.engine_kwargs.vllm.worker_extension_cls == verl_cpu.VLLM_WORKER_EXTENSION
    assert c.trainer.device == "cpu" and c.actor_rollout_ref.actor.strategy == "fsdp2"
    validate_config(config=c, use_reference_policy=need_reference_policy(c), use_critic=need_critic(c))
    env = vc.verl_command(cfg, tmp_path / "w", vb.launch_state(cfg, tmp_path / "w", record=False), tmp_path / "p")[1]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["VERL_PLATFORM"] == "cpu"


def test_the_rollout_engine_is_in_the_run_identity():
    hf, vllm = _paper_on_cpu(), _paper_on_cpu(verl_cpu_rollout="vllm")
    assert config_hash(asdict(load_run_config(hf))) != config_hash(asdict(load_run_config(vllm)))


@pytest.mark.parametrize("train, message", [
    ({"verl_device": "cpu", "verl_cpu_rollout": "sglang"},
     "train.verl_cpu_rollout: expected one of ('hf', 'vllm'), got 'sglang'"),
    ({"verl_cpu_rollout": "vllm"}, "train.verl_cpu_rollout 'vllm' applies to train.verl_device cpu only"),
])
def test_a_bad_rollout_engine_fails_in_one_line(tmp_path, capsys, train, message):
    from ctpo.exitcodes import EXIT_PERMANENT  # a config error: never retried

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(_paper(**train)))
    assert vb.cli(["run", "--config", str(cfg), "--results", str(tmp_path), "--workdir", str(tmp_path)]) == EXIT_PERMANENT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_without_vllms_cpu_build_the_vllm_profile_names_the_make_target(monkeypatch):
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.24.0" if name == "vllm" else real(name))  # CUDA build
    with pytest.raises(RuntimeError, match=r"needs vLLM's CPU build \(`make venv-vllm`.*found vllm 0\.24\.0$"):
        verl_cpu.check_vllm_cpu()
    with pytest.raises(vb.VerlRunError, match="make venv-vllm"):
        vb.require_device(load_run_config(_paper_on_cpu(verl_cpu_rollout="vllm")))
