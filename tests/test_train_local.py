"""The CPU toy backend end to end: SFT warm start, RL for every method through the real agent loop and
sandbox, checkpoints / dumps / done marker, kill-and-resume equality, epoch-boundary resume, SIGTERM.

One SFT warm start is built per session (tests/conftest.py) and shared by every test.
"""
import json
import math
import os
import signal
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ctpo import schema
from ctpo.config import load_experiment, load_run_config, resolve_run
from ctpo.io import read_json, read_jsonl
from ctpo.train import local
from hang import HANG_S

REPO = Path(__file__).resolve().parent.parent
TIME_KEYS = {schema.STEP_TIME_S}


def _cfg_dict(data_dir: Path, run: str = "toy_grpo", **train) -> dict:
    d = resolve_run(load_experiment(REPO / "configs/experiments/toy.yaml"), run, 0)
    d["data"]["train"] = str(data_dir / "train.parquet")
    d["data"]["val"] = [str(data_dir / "toy_arith.parquet")]
    d["eval"].update(k=2, max_problems=8)
    d["wandb"]["mode"] = "offline"
    # test sizes: 8 prompts x 4 responses, 4 optimizer steps per rollout batch
    d["train"].update(prompts_per_step=8, mini_batch_prompts=2, lr=2e-4, total_steps=6, save_freq=2, test_freq=6,
                      dump_steps=[2])
    d["train"].update(train)
    return d


@pytest.fixture
def toy(toy_warmstart):
    """(data dir, SFT policy dir, SFT done record): the session's toy warm start (tests/conftest.py)."""
    return toy_warmstart


def test_sft_warm_start_is_partially_correct_and_idempotent(toy, tmp_path):
    from ctpo.agent import load_policy
    from ctpo.train import sft

    data, policy, rec = toy
    # 10 seeds of this recipe solved 40.6-57.8% of 64 held-out problems (BENCHMARKS.md); this one, 32 problems
    # on 200 training problems, measured 0.5625: the range allows for the sampling of 32 problems
    assert 0.30 <= rec["accuracy"] <= 0.75, rec
    assert rec["accuracy_n"] == 32 and rec["loss_last"] < rec["loss_first"] / 10
    model, tok = load_policy(str(policy))
    assert model.config.model_type == "qwen3" and model.config.vocab_size == tok.vocab_size
    done = policy.parent / "done.json"
    mtime = done.stat().st_mtime_ns
    # done: no work (the config it is given does not even exist) and nothing rewritten
    assert sft.main(["--config", str(tmp_path / "unused.json"), "--out", str(policy.parent)]) == 0
    assert done.stat().st_mtime_ns == mtime


def _train(toy, tmp_path, run, **train):
    data, policy, _ = toy
    cfg = load_run_config(_cfg_dict(data, run, **train))
    res, wd = tmp_path / "results", tmp_path / "work"
    assert local.main(cfg, res, wd, policy) == 0
    return cfg, res, wd


# `make test` trains CTPO; the other methods take the same path (make test-variants)
@pytest.mark.parametrize("run", ["toy_ctpo", *(pytest.param(r, marks=pytest.mark.variant)
                                              for r in ("toy_grpo", "toy_gspo", "toy_ctpo_fixed"))])
def test_method_trains_and_writes_the_contract_outputs(toy, tmp_path, run):
    steps = 12
    cfg, res, wd = _train(toy, tmp_path, run, total_steps=steps, save_freq=6, test_freq=steps, dump_steps=[6])
    rows = read_jsonl(res / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert set(schema.TRAIN_KEYS) <= set(r)
        assert all(math.isfinite(v) for v in r.values())
        assert 0.0 <= r[schema.ENTROPY] and r[schema.TOOL_CALLS] > 0.5  # the policy does call Python
    assert f"{schema.VAL_PREFIX}toy_arith/avg_at_k" in rows[-1]
    done = read_json(res / "done.json")
    assert done["final_step"] == steps and done["saved_steps"] == [0, 6, 12] and done["dump_steps"] == [6]
    assert (wd / "wandb_run_id").read_text().strip() == done["wandb_run_id"]
    prov = read_json(res / "provenance.json")
    assert prov["effective_batch_sizes"]["optimizer_steps_per_rollout"] == 4 and prov["seeds"]["torch"] == 0
    with np.load(wd / "rollouts" / "step6.npz") as z:
        assert tuple(z.files) == schema.ROLLOUT_ARRAYS
        n = cfg.train.prompts_per_step * cfg.rollout.n
        assert z["old_log_prob"].shape == z["log_prob"].shape == z["response_mask"].shape
        assert z["old_log_prob"].shape[0] == n and z["advantages"].shape == (n,)
        assert z["response_mask"].dtype == np.int8 and z["log_prob"].dtype == np.float32
    # step 0 is the init policy, bit for bit
    from safetensors.torch import load_file

    init = load_file(str(toy[1] / "model.safetensors"))
    step0 = load_file(str(wd / "checkpoints" / "step0" / "policy" / "model.safetensors"))
    assert all(torch.equal(init[k], step0[k]) for k in init)
    reward = [r[schema.REWARD_MEAN] for r in rows]
    first, last = float(np.mean(reward[:5])), float(np.mean(reward[-5:]))
    print(f"{run}: reward first5 {first:.3f} last5 {last:.3f}")
    # 12 steps of 32 binary rewards are too few to assert a rise (measured on the lr-3e-3 warm start: first 5 /
    # last 5 steps CTPO 0.156 / 0.181, GRPO 0.169 / 0.188, GSPO 0.181 / 0.212); that updates follow the rewards is
    # test_one_update_raises_the_rewarded_responses_likelihood's. Here: the policy still earns reward.
    assert last > 0.05, reward
    # a done run returns at once: it opens nothing and rewrites nothing
    from ctpo.train import trainer_setup

    mtime = (res / "metrics.jsonl").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_setup.Run, "open", classmethod(lambda *a, **k: pytest.fail("a done run was reopened")))
        assert local.main(cfg, res, wd, toy[1]) == 0
    assert (res / "metrics.jsonl").stat().st_mtime_ns == mtime


def test_log_ratios_move_off_zero_after_the_first_minibatch(toy):
    from ctpo.agent import load_policy
    from ctpo.data.problems import read_questions
    from ctpo.sandbox import SandboxLimits, SandboxPool

    data, policy, _ = toy
    cfg = load_run_config(_cfg_dict(data, "toy_ctpo"))
    model, tok = load_policy(str(policy))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    qs, gts = read_questions(cfg.data.train)
    with SandboxPool(concurrency=2, limits=SandboxLimits(timeout_s=30.0)) as pool:
        res = local.rl_step(model, opt, tok, cfg, qs, gts, list(range(8)), step=1, sandbox=pool)
    mb = res.minibatch_abs_log_ratio
    assert len(mb) == cfg.train.prompts_per_step // cfg.train.mini_batch_prompts
    assert mb[0] < 1e-4  # first update: the policy is still the behaviour policy
    assert all(x > 1e-3 for x in mb[1:]), mb  # then the ratios really drift from 1
    lr = (res.log_prob - res.old_log_prob) * res.response_mask
    rows = cfg.train.mini_batch_prompts * cfg.rollout.n
    assert lr[rows:].abs().max() > 1e-3 and lr[:rows].abs().max() < 1e-4


# one update moves the policy the way its rewards point, for every method; deterministic (fixed seeds), unlike a
# reward curve over a few steps (12 steps of 32 binary rewards: one step's mean has a standard error of ~0.07)
@pytest.mark.parametrize("run", ["toy_ctpo", *(pytest.param(r, marks=pytest.mark.variant)
                                              for r in ("toy_grpo", "toy_gspo", "toy_ctpo_fixed"))])
def test_one_update_raises_the_rewarded_responses_likelihood(toy, run):
    from ctpo.agent import load_policy
    from ctpo.data.problems import read_questions
    from ctpo.sandbox import SandboxLimits, SandboxPool
    from ctpo.train.rollout_batch import response_log_probs

    data, policy, _ = toy
    cfg = load_run_config(_cfg_dict(data, run))
    n = cfg.rollout.n
    model, tok = load_policy(str(policy))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    qs, gts = read_questions(cfg.data.train)
    idx = [i for i in range(cfg.train.prompts_per_step) for _ in range(n)]
    with SandboxPool(concurrency=2, limits=SandboxLimits(timeout_s=30.0)) as pool:
        episodes = local.sample_episodes(model, tok, cfg, [qs[i] for i in idx], step=1, sandbox=pool)
    rewards = local.score_episodes(episodes, [gts[i] for i in idx], cfg.reward.grader)
    batch, keep = local.pack_kept(episodes, tok.pad_token_id)
    mask = batch.response_mask
    adv = local.step_advantages(rewards, episodes, mask, n, cfg.train.norm_adv_by_std)

    def log_prob():  # (B, T) under the current weights
        with torch.no_grad():
            return response_log_probs(model, batch, cfg.rollout.temperature, with_entropy=False)[0]

    old_log_prob = log_prob()
    local.update_policy(model, opt, batch, old_log_prob, adv, None, cfg)  # 4 mini-batch AdamW steps
    gain = ((log_prob() - old_log_prob) * mask).sum(-1)  # (B,) change in each response's log-likelihood
    # the sign of each response's advantage, computed here: reward above / below its group's mean
    r = rewards.view(-1, n)
    above = (r > r.mean(-1, keepdim=True)).flatten() & (keep > 0)
    below = (r < r.mean(-1, keepdim=True)).flatten() & (keep > 0)
    assert above.sum() >= 3 and below.sum() >= 3, rewards  # the warm start earns rewards in some groups
    print(f"{run}: log-likelihood change above {gain[above].mean():.3f}, below {gain[below].mean():.3f}")
    # measured on the session's warm start (seed 0), above / below: CTPO +0.12 / -0.43, GRPO +0.13 / -0.46, GSPO
    # +0.08 / -0.34, CTPO-fixed +0.13 / -0.47 nats; on a less confident warm start (500 steps) every response's
    # likelihood fell, the rewarded ones 2.2-2.5 nats less, so only the difference is asserted
    assert gain[above].mean() > gain[below].mean() + 0.2, (gain[above], gain[below])


def _cli(cfg_path, res, wd, policy):
    return [sys.executable, "-m", "ctpo.train", "--config", str(cfg_path), "--results", str(res), "--workdir",
            str(wd), "--init", str(policy)]


def wait_for_pause(proc, workdir, step, limit_s=HANG_S):
    """Wait until the trainer, started with CTPO_PAUSE_AFTER_STEP=step, is blocked after that step. The trainer
    cannot get past the pause, so this wait races nothing; the limit only catches a hung or dead trainer."""
    marker, deadline = workdir / f"paused_after_step{step}", time.monotonic() + limit_s
    while not marker.exists():
        assert proc.poll() is None, f"trainer exited with {proc.returncode} before pausing after step {step}"
        assert time.monotonic() < deadline, f"no pause after step {step} within {limit_s} s"
        time.sleep(0.1)


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


@pytest.mark.e2e  # two training launches (minutes): `make test-e2e` (CI)
def test_sigkill_and_restart_ends_like_an_uninterrupted_run(toy, tmp_path):
    data, policy, _ = toy
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(_cfg_dict(data, "toy_ctpo", total_steps=6, save_freq=2)))
    env = {**os.environ, "WANDB_MODE": "offline"}
    ref = subprocess.Popen(_cli(cfg_path, tmp_path / "ref_r", tmp_path / "ref_w", policy), env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res, wd = tmp_path / "r", tmp_path / "w"
    # the victim stops after step 3 (newest checkpoint: step 2) and waits there, however slow the machine
    victim = subprocess.Popen(_cli(cfg_path, res, wd, policy), env={**env, local.PAUSE_ENV: "3"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_pause(victim, wd, 3)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (res / "done.json").exists()
    assert len(read_jsonl(res / "metrics.jsonl")) == 3
    again = subprocess.run(_cli(cfg_path, res, wd, policy), env=env, capture_output=True, text=True, timeout=HANG_S)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout
    assert ref.wait(timeout=HANG_S) == 0
    got, want = read_jsonl(res / "metrics.jsonl"), read_jsonl(tmp_path / "ref_r" / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 7))
    assert _strip(got) == _strip(want)  # bit-for-bit the same numbers
    assert read_json(res / "done.json")["wandb_run_id"] == (wd / "wandb_run_id").read_text().strip()
    ids = {p.name.rsplit("-", 1)[-1] for p in (wd / "wandb").glob("offline-run-*")}
    assert len(ids) == 1  # the restart reused the W&B run id


def test_resume_at_an_epoch_boundary_trains_the_remaining_steps(toy, tmp_path, capsys):
    import pandas as pd

    data, policy, _ = toy
    small = tmp_path / "data"
    small.mkdir()
    pd.read_parquet(data / "train.parquet").iloc[:8].to_parquet(small / "train.parquet")
    (small / "toy_arith.parquet").symlink_to(data / "toy_arith.parquet")
    res, wd = tmp_path / "r", tmp_path / "w"
    # 8 prompts, 4 per step: one epoch = 2 steps; the first run ends exactly at the epoch boundary
    d = _cfg_dict(small, "toy_grpo", prompts_per_step=4, mini_batch_prompts=2, total_steps=2, save_freq=2,
                  test_freq=2, dump_steps=[])
    assert local.main(load_run_config(d), res, wd, policy) == 0
    assert read_json(res / "done.json")["final_step"] == 2
    d["train"].update(total_steps=4, test_freq=4)
    capsys.readouterr()
    assert local.main(load_run_config(d), res, wd, policy) == 0
    log = capsys.readouterr().out  # progress: step k/N, elapsed, ETA from the resumed job's own pace
    assert re.search(r"^train: step 3/4 elapsed \S+ eta \S+ ", log, re.M), log
    assert re.search(r"^train: step 4/4 elapsed \S+ eta 0s ", log, re.M), log
    rows = read_jsonl(res / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    done = read_json(res / "done.json")
    assert done["final_step"] == 4 and done["saved_steps"] == [0, 2, 4]
    state = torch.load(wd / "checkpoints" / "step4" / "trainer_state.pt", weights_only=False)
    assert state["consumed_prompts"] == 16  # two full epochs


def test_changed_config_retrains_from_scratch_and_keeps_the_old_run(toy, tmp_path):
    data, policy, _ = toy
    res, wd = tmp_path / "r", tmp_path / "w"
    d = _cfg_dict(data, "toy_grpo", total_steps=1, save_freq=1, test_freq=1, dump_steps=[])
    assert local.main(load_run_config(d), res, wd, policy) == 0
    old_id = (wd / "wandb_run_id").read_text().strip()
    d["train"]["lr"] = 1e-5
    d["train"]["total_steps"] = 2
    assert local.main(load_run_config(d), res, wd, policy) == 0
    # the old checkpoints and W&B id were moved aside, not deleted, and the new config trained from step 0
    (old,) = list((wd / "superseded").iterdir())
    assert sorted(p.name for p in (old / "checkpoints").iterdir()) == ["step0", "step1"]
    assert (old / "wandb_run_id").read_text().strip() == old_id
    assert (wd / "wandb_run_id").read_text().strip() != old_id
    rows = [json.loads(x) for x in (res / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/reward_mean" in r] == [1, 2]
    assert json.loads((res / "provenance.json").read_text())["resumed_from_step"] is None


@pytest.mark.e2e  # two training launches (minutes): `make test-e2e` (CI)
def test_sigterm_checkpoints_and_exits_for_requeue(toy, tmp_path):
    data, policy, _ = toy
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(_cfg_dict(data, "toy_grpo", total_steps=5, save_freq=100, test_freq=5,
                                             dump_steps=[])))
    env = {**os.environ, "WANDB_MODE": "offline"}
    res, wd = tmp_path / "r", tmp_path / "w"
    p = subprocess.Popen(_cli(cfg_path, res, wd, policy), env={**env, local.PAUSE_ENV: "1"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_pause(p, wd, 1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=HANG_S)
    assert p.returncode == local.EXIT_PREEMPTED, err[-2000:]
    assert not (res / "done.json").exists()
    rows = read_jsonl(res / "metrics.jsonl")
    from ctpo.train.checkpoint import list_checkpoints

    assert list_checkpoints(wd)[-1] == rows[-1]["step"] == 1  # saved at the step it stopped after
    again = subprocess.run(_cli(cfg_path, res, wd, policy), env=env, capture_output=True, text=True, timeout=HANG_S)
    assert again.returncode == 0, again.stderr[-2000:]
    assert read_json(res / "done.json")["final_step"] == 5
