"""The GPU path on CPU, end to end, in CI: the warm-started toy through verl 0.9.1's own trainer
(`verl.trainer.main_ppo`: V1 engine workers, FSDP2, agent loop, TransferQueue) launched by the same
`ctpo.train.verl_backend` as the paper run, with only its `cpu` device profile swapped in
(`train.verl_device: cpu`, ctpo.train.verl_cpu).

One CTPO run with the paper's structure (groups of rollout.n, `ctpo_tir` with the real sandbox,
`ctpo.reward` as verl's custom reward, sequence-level rollout IS, the registered `ctpo` loss, a rollout-dump
step, validation, checkpoints), SIGTERM after the first saved step and a resume into the same W&B run,
then verl's checkpoint merge to HF, `ctpo.eval` on the merged model, the metrics conversion and the
diagnostics on the dumps. The Ray start-up dominates (about a minute per launch on 2 cores), so the test
is one function that runs once (`-m verl_e2e` selects it; plain `pytest` / `make test` include it).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("verl")
pytest.importorskip("transfer_queue")

from hang import HANG_S  # noqa: E402

from ctpo import schema  # noqa: E402
from ctpo.config import load_experiment, resolve_run  # noqa: E402
from ctpo.diagnostics.bands import plan_bands  # noqa: E402
from ctpo.io import read_json  # noqa: E402
from ctpo.train import verl_backend as vb  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT_S = HANG_S  # a hang guard only (one launch took ~4 min at load average 15 on 2 cores)
pytestmark = [pytest.mark.verl_e2e, pytest.mark.e2e]  # verl launches (minutes): `make test-e2e` (CI)


# An entropy term (the paper's is 0) gives every mini-batch a gradient, so the second mini-batch of each step sees
# a moved policy whatever was sampled: a group of 2 with equal rewards has zero advantages, and a step whose first
# group agrees would not move the policy (CI saw it: all three first groups agreed, log_rho_cum std exactly 0).
MOVE_EVERY_MINI_BATCH = 1e-3


def _run_config(root: Path, run: str) -> dict:
    d = resolve_run(load_experiment(REPO / "configs/experiments/toy_verl.yaml"), run, 0)
    d["data"]["train"] = str(root / "data/train.parquet")
    d["data"]["val"] = [str(root / "data/toy_arith.parquet")]
    d["wandb"]["mode"] = "offline"
    d["eval"].update(k=2, max_problems=2)
    # the smallest run with the paper's structure: 2 prompts x groups of 2, two mini-batch updates per step
    # (the second sees moved ratios), 3 steps, a save every step,
    # validation at step 2 (and, verl's rule, after the last step), a rollout dump at step 1
    d["rollout"].update(n=2)
    d["train"].update(prompts_per_step=2, mini_batch_prompts=1, micro_batch_size_per_gpu=2, total_steps=3,
                      save_freq=1, test_freq=2, dump_steps=[1])
    d["train"]["verl"]["entropy_coeff"] = MOVE_EVERY_MINI_BATCH
    return d


@pytest.fixture(scope="module")
def toy(verl_toy):
    """(root, SFT warm-start policy dir): tests/conftest.py's `verl_toy`."""
    return verl_toy


def _launch(cfg_path: Path, results: Path, workdir: Path, init: Path, log: Path,
            pause_after_step: int | None = None) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("CTPO_PAUSE_AFTER_STEP", None)
    if pause_after_step is not None:  # ctpo.train.verl_save_hook waits after saving that step
        env["CTPO_PAUSE_AFTER_STEP"] = str(pause_after_step)
    return subprocess.Popen(
        [sys.executable, "-m", "ctpo.train.verl_backend", "run", "--config", str(cfg_path), "--results", str(results),
         "--workdir", str(workdir), "--init", str(init)],
        cwd=REPO, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def _wait_for_saved_step(proc: subprocess.Popen, workdir: Path, step: int, log: Path) -> None:
    """Block until verl has saved `step` and its save hook is paused there (launched with pause_after_step),
    or fail if it exits first."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while vb.latest_step(workdir) < step or not (workdir / "verl" / f"paused_after_step{step}").exists():
        if proc.poll() is not None:
            pytest.fail(f"verl exited with {proc.returncode} before saving step {step}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no saved step {step} within {LAUNCH_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def sigterm_after_first_save(cfg_path: Path, results: Path, workdir: Path, init: Path, log: Path) -> float:
    """Launch, SIGTERM the launcher once step 1 is saved (forwarded to verl's process group; verl's save hook
    pauses after saving step 1 until the launcher asks for a save: no race with verl's speed), and check the run
    stopped undone with step 1 saved. Returns the seconds from launch to the saved step."""
    t0 = time.monotonic()
    proc = _launch(cfg_path, results, workdir, init, log, pause_after_step=1)
    _wait_for_saved_step(proc, workdir, 1, log)
    seconds = time.monotonic() - t0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=LAUNCH_TIMEOUT_S) != 0 and not (results / "done.json").exists()  # rerun resumes
    assert vb.latest_step(workdir) == 1
    return seconds


def resume_to_the_end(cfg_path: Path, results: Path, workdir: Path, init: Path, log: Path) -> float:
    """Relaunch the same command: it resumes after the saved step and finishes. Returns its seconds."""
    t0 = time.monotonic()
    proc = _launch(cfg_path, results, workdir, init, log)
    assert proc.wait(timeout=LAUNCH_TIMEOUT_S) == 0, log.read_text()[-6000:]
    return time.monotonic() - t0


def test_ctpo_through_verl_on_cpu_sigterm_resume_merge_eval_diagnostics(toy, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    root, policy = toy
    cfg = _run_config(root, "toy_ctpo")
    cfg_path = tmp_path / "toy_ctpo.json"
    cfg_path.write_text(json.dumps(cfg))
    wd, res, log = tmp_path / "runs" / "toy_ctpo" / "seed0", tmp_path / "results", tmp_path / "verl.log"
    timings = {}

    # attempt 1: run until step 1 is saved, then SIGTERM the launcher
    timings["to_first_saved_step_s"] = sigterm_after_first_save(cfg_path, res, wd, policy, log)
    run_id = (wd / "wandb_run_id").read_text().strip()

    # attempt 2: the same command resumes after the saved step and finishes
    timings["resume_launch_s"] = resume_to_the_end(cfg_path, res, wd, policy, log)
    done = read_json(res / "done.json")
    assert done["final_step"] == 3 and done["saved_steps"] == [1, 2, 3] and done["attempts"] == 2
    assert done["wandb_run_id"] == run_id == (wd / "wandb_run_id").read_text().strip()
    offline = sorted(p.name for p in (wd / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(run_id in name for name in offline), offline  # one W&B run, resumed

    # metrics: one row per step with the CTPO statistics verl logged as actor/ctpo/*
    rows = [json.loads(line) for line in (res / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for k in (schema.CLIP_FRAC, schema.CLIP_FRAC_LOW, schema.CLIP_FRAC_HIGH, schema.LOG_RATIO_MEAN,
                  schema.LOG_RHO_CUM_MEAN, schema.LOG_RHO_CUM_STD, schema.REWARD_MEAN, schema.ACCURACY,
                  schema.PG_LOSS, schema.GRAD_NORM, schema.STEP_TIME_S, schema.LOG_RATIO_ABS_MAX_LB):
            assert r[k] is not None and np.isfinite(r[k]), (r["step"], k, r)
        assert 0.0 <= r[schema.CLIP_FRAC] <= 1.0 and r[schema.LOG_RHO_CUM_STD] >= 0.0
    assert "val/toy_arith/avg_at_k" in rows[1]  # validation at test_freq
    assert any(r[schema.REWARD_MEAN] > 0 for r in rows)  # the warm start earns reward: advantages are live
    assert any(r[schema.LOG_RHO_CUM_STD] > 0 for r in rows)  # the second mini-batch saw a moved policy
    # fp32 trainer and fp32 HF rollout: verl's own rollout-vs-trainer comparison finds the same log-probs
    from ctpo.train.verl_metrics import read_verl_log

    for attempt in sorted((wd / "verl_logs").glob("attempt*.jsonl")):
        for step, data in read_verl_log(attempt).items():
            if "rollout_corr/log_ppl_abs_diff" in data:
                assert data["rollout_corr/log_ppl_abs_diff"] < 1e-4, (attempt.name, step, data)

    # rollout dump of step 1 -> the diagnostics
    dump = wd / "rollouts" / "step1.npz"
    with np.load(dump) as z:
        assert set(schema.ROLLOUT_ARRAYS) <= set(z.files) and z["response_mask"].shape[0] == 4
        assert z["response_mask"].sum() > 0
    diag = tmp_path / "diag" / "step1.parquet"
    bands = tmp_path / "figure1_bands.json"
    bands.write_text(json.dumps(plan_bands(load_experiment(REPO / "configs/experiments/toy_verl.yaml"))))
    out = subprocess.run([sys.executable, "-m", "ctpo.diagnostics", "--dump", str(dump), "--config", str(cfg_path),
                          "--bands", str(bands), "--bin-width", "8", "--min-bin-tokens", "1", "--out", str(diag)],
                         cwd=REPO, capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr[-3000:]
    assert read_json(diag.with_suffix(".json"))["n_sequences"] == 4

    # merge the final step to HF; its log-probs are the trained actor's (verl's merger stores bf16)
    hf = vb.merge_checkpoint(wd, 3)
    shard = torch.load(wd / "checkpoints" / "global_step_3" / "actor" / "model_world_size_1_rank_0.pt",
                       map_location="cpu", weights_only=False)
    actor_state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in shard.items()}
    merged = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32)
    actor = AutoModelForCausalLM.from_pretrained(policy, torch_dtype=torch.float32)
    missing, unexpected = actor.load_state_dict({k: v.float() for k, v in actor_state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    initial = AutoModelForCausalLM.from_pretrained(policy, torch_dtype=torch.float32)
    ids = torch.tensor([list(range(5, 60))])

    def logp(m):
        with torch.no_grad():
            return torch.log_softmax(m(input_ids=ids).logits.float(), -1)

    actor_bf16 = AutoModelForCausalLM.from_pretrained(policy, torch_dtype=torch.float32)
    actor_bf16.load_state_dict({k: v.bfloat16().float() for k, v in actor_state.items()}, strict=False)
    torch.testing.assert_close(logp(merged), logp(actor_bf16), rtol=0, atol=1e-5)  # the same weights
    # verl 0.9.1's merger writes bf16 (model_merger/base_model_merger.py: torch_dtype=torch.bfloat16): the
    # evaluated model is the fp32 actor rounded to bf16 (measured: up to 0.18 in log-prob over the vocab)
    assert (logp(actor) - logp(initial)).abs().max() > 1e-4  # and training moved the policy

    # evaluation of the merged checkpoint through ctpo.eval (the DAG's eval rule)
    ev = tmp_path / "eval" / "toy_arith.parquet"
    out = subprocess.run([sys.executable, "-m", "ctpo.eval", "--config", str(cfg_path), "--checkpoint", str(hf),
                          "--benchmark", str(root / "data" / "toy_arith.parquet"), "--step", "3", "--out", str(ev),
                          "--backend", "hf"], cwd=REPO, capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr[-3000:]
    side = read_json(ev.with_suffix(".json"))
    assert side["n_problems"] == 2 and side["k"] == 2 and 0.0 <= side["avg_at_k"] <= 1.0
    print("verl e2e timings:", json.dumps({k: round(v, 1) for k, v in timings.items()}))
