"""vLLM's own code under test on CPU (marker `vllm`; `make test-vllm` runs it in the vLLM test environment,
`make venv-vllm`: vLLM 0.24.0's CPU build beside verl[vllm] 0.9.1; skipped anywhere else).

The policy is the toy warm start built with configs/models/toy_vllm.yaml (the toy with head_dim 32, which
vLLM's CPU attention needs; the main toy keeps head_dim 16):
  (a) `python -m ctpo.eval --backend vllm` (avg@k through the TIR agent loop and the sandbox) on vLLM's CPU
      platform; every sampled token's log-prob vLLM returned is checked against an HF forward pass of the
      same policy on the same ids;
  (b) verl's own trainer with verl's vLLM rollout server (`train.verl_cpu_rollout: vllm`): the CTPO e2e path
      (SIGTERM after a saved step, resume, merge, eval through vLLM) with vLLM's log-probs equal to the
      trainer's at every step after an update (vLLM starts on dummy weights: only verl's weight sync puts the
      policy there), no process and no /dev/shm segment of the launches left behind;
  (c) with verl's stock worker extension (oneDNN prepacking on) the first weight sync fails inside vLLM:
      the launcher ends the hung launch and names that error in one line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("verl")

from hang import HANG_S  # noqa: E402

from ctpo import layout, schema  # noqa: E402
from ctpo.agent.vllm_generator import cpu_platform  # noqa: E402
from ctpo.config import load_experiment, resolve_run  # noqa: E402
from ctpo.io import read_json  # noqa: E402
from ctpo.train import verl_backend as vb  # noqa: E402
from test_verl_backend import verl_argv  # noqa: E402

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not cpu_platform(), reason="the installed vLLM is not its CPU build")]

REPO = Path(__file__).resolve().parent.parent
LOGPROB_ATOL = 1e-4  # fp32 on both sides (measured: a few 1e-7)


def toy_vllm_run(experiment: str, run: str) -> dict:
    """`run` of configs/experiments/<experiment>.yaml with the head_dim-32 toy (configs/models/toy_vllm.yaml)."""
    exp = load_experiment(REPO / f"configs/experiments/{experiment}.yaml")
    exp["runs"][run]["model"] = "toy_vllm"
    d = resolve_run(exp, run, 0)
    d["wandb"]["mode"] = "offline"
    return d


@pytest.fixture(scope="module")
def warmstart(tmp_path_factory):
    """(data dir, SFT policy dir) of the toy_vllm model: toy.yaml's warm-start recipe on 200 toy problems,
    or the policy dir in $CTPO_VLLM_WARMSTART (one built earlier; saves minutes when iterating)."""
    from ctpo.data.toy_task import write_toy_data
    from ctpo.train import sft

    root = tmp_path_factory.mktemp("vllm_toy")
    write_toy_data(root / "data", n_train=64, n_test=8, seed=1234)
    reuse = os.environ.get("CTPO_VLLM_WARMSTART")
    if reuse:
        return root / "data", Path(reuse)
    d = toy_vllm_run("toy", "toy_grpo")
    write_toy_data(root / "sft_data", n_train=200, n_test=32, seed=1234)
    d["data"]["train"] = str(root / "sft_data" / "train.parquet")
    d["data"]["val"] = [str(root / "sft_data" / "toy_arith.parquet")]
    d["sft"]["accuracy_band"] = [0.0, 1.0]  # toy.yaml's band is for toy.yaml's model; these tests compare log-probs
    (root / "sft.json").write_text(json.dumps(d))
    assert sft.main(["--config", str(root / "sft.json"), "--out", str(root / "sft")]) == 0
    return root / "data", root / "sft" / "policy"


def test_the_environment_is_the_gpu_set_with_vllms_cpu_build():
    """What `make venv-vllm` built: every pin of the GPU set (core + `gpu` extra) at its version, vllm as its
    CPU build of the pinned version, and pip's own consistency check clean."""
    import importlib.util
    from importlib import metadata

    from packaging.requirements import Requirement

    spec = importlib.util.spec_from_file_location("pins", REPO / "envs" / "pins.py")
    pins = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pins)
    wrong = {}
    for line in pins.pin_list(("gpu",)):
        r = Requirement(line)
        want = next(s.version for s in r.specifier if s.operator == "==")
        got = metadata.version(r.name)
        if got != (want + "+cpu" if r.name == "vllm" else want):
            wrong[r.name] = (want, got)
    assert wrong == {}
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=HANG_S)
    assert check.returncode == 0, check.stdout


def _eval_config(tmp_path: Path, data: Path, **eval_keys) -> Path:
    d = toy_vllm_run("toy_verl", "toy_ctpo")
    d["data"]["train"] = str(data / "train.parquet")
    d["data"]["val"] = [str(data / "toy_arith.parquet")]
    d["eval"].update(eval_keys)
    path = tmp_path / "eval_cfg.json"
    path.write_text(json.dumps(d))
    return path


def test_avg_at_k_through_vllm_on_cpu_with_log_probs_equal_to_hf(warmstart, tmp_path, monkeypatch):
    import torch

    from ctpo.agent import load_policy
    from ctpo.eval import __main__ as ev
    from ctpo.eval import backend as B

    data, policy = warmstart
    cfg = _eval_config(tmp_path, data, k=4, max_problems=8, temperature=0.7)
    calls = []  # (prompt ids, GenOutput, temperature) of every generate call the agent loop made

    real_build = B.build_generator

    def recording_build(backend, checkpoint, run_cfg):
        generator, tokenizer = real_build(backend, checkpoint, run_cfg)
        assert type(generator).__name__ == "VLLMGenerator"
        real_generate = generator.generate

        def generate(prompts, params, stop):
            outs = real_generate(prompts, params, stop)
            calls.extend((list(p), o, params.temperature) for p, o in zip(prompts, outs))
            return outs

        generator.generate = generate
        return generator, tokenizer

    monkeypatch.setattr(B, "build_generator", recording_build)
    out = tmp_path / "eval" / "toy_arith.parquet"
    t0 = time.monotonic()
    assert ev.main(["--config", str(cfg), "--checkpoint", str(policy), "--benchmark", str(data / "toy_arith.parquet"),
                    "--step", "0", "--out", str(out), "--backend", "vllm"]) == 0
    wall = time.monotonic() - t0
    side = read_json(out.with_suffix(".json"))
    assert side["n_problems"] == 8 and side["k"] == 4 and 0.0 <= side["avg_at_k"] <= 1.0
    prov = side["provenance"]
    assert prov["backend"] == "vllm" and prov["backend_version"].endswith("+cpu")
    assert side["avg_at_k"] > 0  # the warm start solves some toy problems through vLLM too

    # every sampled token's log-prob, against an HF forward pass of the same policy on the same ids
    model, _ = load_policy(str(policy), dtype="float32")
    worst, n_tokens = 0.0, 0
    with torch.no_grad():
        for prompt, o, temperature in calls:
            ids = torch.tensor([prompt + o.token_ids])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            hf = torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0]
            worst = max(worst, (hf - torch.tensor(o.log_probs)).abs().max().item())
            n_tokens += len(o.token_ids)
    assert len(calls) >= 32 and n_tokens > 0
    assert worst < LOGPROB_ATOL, worst
    print(f"vllm eval: {len(calls)} generations, {n_tokens} tokens, max |logp_vllm - logp_hf| = {worst:.2e}, "
          f"{wall:.1f} s")


def _ray_processes(marker: str) -> list[int]:
    """Live processes whose command line names `marker` (the launch's Ray temp dir)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if marker in Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(d))
            except OSError:
                pass
    return found


def _shm() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(("psm_", "verl_weights_"))}


def test_ctpo_through_verl_with_the_vllm_rollout_sigterm_resume_merge_eval(warmstart, tmp_path):
    from test_verl_e2e import MOVE_EVERY_MINI_BATCH, resume_to_the_end, sigterm_after_first_save

    from ctpo.train.verl_metrics import read_verl_log

    data, policy = warmstart
    d = toy_vllm_run("toy_verl", "toy_ctpo")
    d["train"]["verl_cpu_rollout"] = "vllm"
    d["train"]["verl"]["weight_sync_bucket_mb"] = 64  # the profile's ceiling on CPU (ctpo.config.CPU_VLLM_BUCKET_MB)
    d["data"]["train"] = str(data / "train.parquet")
    d["data"]["val"] = [str(data / "toy_arith.parquet")]
    d["eval"].update(k=2, max_problems=2)
    # tests/test_verl_e2e.py's smallest run with the paper's structure: 2 prompts x groups of 2, two
    # mini-batch updates per step, 3 steps, a save every step, validation at step 2 and after the last
    d["rollout"].update(n=2)
    d["train"].update(prompts_per_step=2, mini_batch_prompts=1, micro_batch_size_per_gpu=2, total_steps=3,
                      save_freq=1, test_freq=2, dump_steps=[1])
    d["train"]["verl"]["entropy_coeff"] = MOVE_EVERY_MINI_BATCH  # every mini-batch moves the policy (test_verl_e2e.py says why)
    cfg_path = tmp_path / "toy_ctpo.json"
    cfg_path.write_text(json.dumps(d))
    wd, res, log = tmp_path / "runs" / "toy_ctpo" / "seed0", tmp_path / "results", tmp_path / "verl.log"
    shm_before = _shm()
    timings = {}

    timings["to_first_saved_step_s"] = sigterm_after_first_save(cfg_path, res, wd, policy, log)
    timings["resume_launch_s"] = resume_to_the_end(cfg_path, res, wd, policy, log)
    text = log.read_text()
    command = layout.workdir(wd).path("verl_cmd", attempt=1).read_text()
    assert "actor_rollout_ref.rollout.name=vllm" in command and "worker_extension_cls" in command
    done = read_json(res / "done.json")
    assert done["final_step"] == 3 and done["saved_steps"] == [1, 2, 3] and done["attempts"] == 2

    # vLLM served the rollouts (its engine's log lines), and its log-probs are the trainer's at every step;
    # steps 2 and 3 sample from weights that the updates of steps 1 and 2 changed
    assert "vllm" in text.lower() and "Attempted to load weight" not in text
    per_step = {}
    for attempt in sorted((wd / "verl_logs").glob("attempt*.jsonl")):
        per_step.update(read_verl_log(attempt))
    assert sorted(per_step) == [1, 2, 3]
    for step in (2, 3):
        m = per_step[step]
        assert m["rollout_corr/log_ppl_abs_diff"] < LOGPROB_ATOL, (step, m)
        assert abs(m["rollout_corr/kl"]) < LOGPROB_ATOL, (step, m)
    rows = [json.loads(line) for line in (res / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and any(r[schema.LOG_RHO_CUM_STD] > 0 for r in rows)

    # nothing of the two launches is left: no Ray / vLLM process, no shared-memory segment
    assert _ray_processes(str(vb.ray_temp_dir(wd))) == []
    assert _shm() - shm_before == set()

    # merge, then evaluate the merged checkpoint through vLLM
    hf = vb.merge_checkpoint(wd, 3)
    ev = tmp_path / "eval" / "toy_arith.parquet"
    out = subprocess.run([sys.executable, "-m", "ctpo.eval", "--config", str(cfg_path), "--checkpoint", str(hf),
                          "--benchmark", str(data / "toy_arith.parquet"), "--step", "3", "--out", str(ev),
                          "--backend", "vllm"], cwd=REPO, capture_output=True, text=True, timeout=HANG_S,
                         env=dict(os.environ, WANDB_MODE="offline"))
    assert out.returncode == 0, out.stderr[-3000:]
    side = read_json(ev.with_suffix(".json"))
    assert side["provenance"]["backend"] == "vllm" and side["n_problems"] == 2 and side["k"] == 2
    print("vllm verl e2e:", json.dumps({**{k: round(v, 1) for k, v in timings.items()},
                                        **{f"log_ppl_abs_diff_step{s}": per_step[s]["rollout_corr/log_ppl_abs_diff"]
                                           for s in (1, 2, 3)}}))


def test_a_failed_weight_sync_inside_vllm_ends_the_launch_with_its_error(warmstart, tmp_path, capsys):
    """The trial's defect, reproduced with verl's stock worker extension (vLLM's oneDNN prepacking on): the
    first weight sync fails inside vLLM's worker and verl 0.9.1's trainer waits forever. The launcher ends
    the whole tree after `error_grace_s` without a step, fails in one line naming the error, and leaves no
    Ray / vLLM process and no /dev/shm segment behind."""
    from ctpo.config import load_run_config
    from ctpo.train import verl_cpu

    data, policy = warmstart
    d = toy_vllm_run("toy_verl", "toy_ctpo")
    d["train"]["verl_cpu_rollout"] = "vllm"
    d["train"]["verl"]["weight_sync_bucket_mb"] = 64  # the profile's ceiling on CPU (ctpo.config.CPU_VLLM_BUCKET_MB)
    d["data"]["train"] = str(data / "train.parquet")
    d["data"]["val"] = [str(data / "toy_arith.parquet")]
    d["rollout"].update(n=2)
    d["train"].update(prompts_per_step=2, mini_batch_prompts=2, micro_batch_size_per_gpu=2, total_steps=1,
                      save_freq=1, test_freq=100, dump_steps=[])
    cfg = load_run_config(d)
    wd, res = tmp_path / "runs" / "fail" / "seed0", tmp_path / "results"
    stock = "verl.workers.rollout.vllm_rollout.utils.vLLMColocateWorkerExtension"
    argv = [a.replace(verl_cpu.VLLM_WORKER_EXTENSION, stock) for a in verl_argv(cfg, wd, init=policy)]
    assert any(a.endswith("worker_extension_cls=" + stock) for a in argv)
    shm_before = _shm()
    rc = vb.main(cfg, res, wd, init=policy, command=argv, error_grace_s=120.0)
    captured = capsys.readouterr()
    assert rc != 0 and not (res / "done.json").exists()
    failed = [line for line in captured.err.splitlines() if line.startswith("[ctpo] verl failed")]
    assert len(failed) == 1 and "first error: " in failed[0], captured.err[-3000:]
    assert "Attempted to load weight" in failed[0], failed[0]
    assert _ray_processes(str(vb.ray_temp_dir(wd))) == []
    assert _shm() - shm_before == set()
    print("vllm failed launch:", failed[0])
