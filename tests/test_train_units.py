"""Fast unit tests of the local trainer's parts: data order, packing and log-probs, IS weights,
checkpoints, W&B tracking, config checks. (The RL runs themselves are in test_train_local.py.)"""
import dataclasses
import re
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ctpo.config import ConfigError, ModelConfig, load_experiment, load_run_config, resolve_run
from ctpo.tokenizer import CharTokenizer
from ctpo.train import checkpoint as ckpt
from ctpo.train.local import draw_prompts, rollout_is_weights
from ctpo.train.rollout_batch import pack_episodes, response_log_probs
from ctpo.train.toy_model import build_toy_model


def _toy_cfg(**train):
    d = resolve_run(load_experiment("configs/experiments/toy.yaml"), "toy_grpo", 0)
    d["train"].update(train)
    return load_run_config(d)


def test_draw_prompts_crosses_epoch_boundary_into_a_new_permutation():
    n, seed = 10, 3
    order = draw_prompts(n, consumed=0, count=25, seed=seed)
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert order[:10] != order[10:20]  # a fresh permutation per epoch
    # the order is a function of the cursor: resuming at any point (an epoch boundary included) continues it
    for cut in (0, 4, 10, 13, 20):
        assert draw_prompts(n, consumed=cut, count=25 - cut, seed=seed) == order[cut:]
    expected_epoch1 = list(np.random.default_rng([seed, 1]).permutation(n))
    assert order[10:20] == expected_epoch1


def _episode(prompt, response, mask, lps=None):
    return SimpleNamespace(prompt_ids=prompt, response_ids=response, response_mask=mask,
                           response_logprobs=lps if lps is not None else [0.0] * len(response))


def test_response_log_probs_match_a_per_sequence_forward():
    tok = CharTokenizer()
    model = build_toy_model(ModelConfig(name="t", hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                        intermediate_size=64), tok, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    eps = []
    for p_len, r_len in ((5, 7), (9, 3), (2, 11)):
        p = torch.randint(5, 100, (p_len,), generator=g).tolist()
        r = torch.randint(5, 100, (r_len,), generator=g).tolist()
        eps.append(_episode(p, r, [1, 0] * (r_len // 2) + [1] * (r_len % 2)))
    batch = pack_episodes(eps, tok.pad_token_id)
    T = max(len(e.response_ids) for e in eps)
    assert batch.response_ids.shape == (3, T)
    temp = 0.7
    with torch.no_grad():
        lp, ent = response_log_probs(model, batch, temp, with_entropy=True)
        for b, e in enumerate(eps):  # independent: one unpadded sequence at a time, plain loop over positions
            ids = torch.tensor([e.prompt_ids + e.response_ids])
            logits = model(input_ids=ids).logits[0] / temp
            for j, tok_id in enumerate(e.response_ids):
                row = torch.log_softmax(logits[len(e.prompt_ids) - 1 + j], -1)
                assert lp[b, j].item() == pytest.approx(row[tok_id].item(), abs=1e-4)
                assert ent[b, j].item() == pytest.approx(-(row.exp() * row).sum().item(), abs=1e-4)
            assert batch.response_mask[b, len(e.response_ids):].sum() == 0
            assert batch.response_mask[b, : len(e.response_ids)].tolist() == [float(x) for x in e.response_mask]


def test_pack_rejects_misaligned_mask():
    with pytest.raises(ValueError, match="response_mask has 2 entries for 3 response ids"):
        pack_episodes([_episode([1, 2], [3, 4, 5], [1, 1])], pad_id=0)


def test_rollout_is_weights_sequence_and_token_truncation():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    roll = torch.tensor([[-1.5, -2.0, -3.0], [-0.9, -1.1, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    thr = 5.0
    seq = rollout_is_weights(old, roll, mask, "sequence", thr)
    for b in range(2):
        s = sum((old[b, t] - roll[b, t]).item() for t in range(3) if mask[b, t])
        w = min(math.exp(s), thr)
        for t in range(3):
            assert seq[b, t].item() == pytest.approx(w * mask[b, t].item(), rel=1e-6)
    tokw = rollout_is_weights(old, roll, mask, "token", 1.2)
    assert tokw[0, 0].item() == pytest.approx(min(math.exp(0.5), 1.2))
    assert tokw[1, 1].item() == pytest.approx(math.exp(0.1), rel=1e-6)
    assert tokw[0, 2].item() == 0.0
    assert rollout_is_weights(old, roll, mask, None, thr) is None


def test_checkpoint_roundtrip_and_incomplete_dirs_ignored(tmp_path):
    tok = CharTokenizer()
    model = build_toy_model(ModelConfig(name="t", hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                        intermediate_size=64), tok, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
    opt.step()
    torch.manual_seed(123)
    state = ckpt.TrainerState(step=4, consumed_prompts=17, optimizer=opt.state_dict(), rng=ckpt.capture_rng(),
                              fingerprint="abc", config={"x": 1}, metrics_rows=[{"step": 1}])
    expected_draw = torch.rand(3)
    ckpt.save_checkpoint(tmp_path, model, tok, state)
    (tmp_path / "checkpoints" / ".step8.partial").mkdir()  # a save killed midway
    (tmp_path / "checkpoints" / "step6").mkdir()  # no state file: incomplete
    assert ckpt.list_checkpoints(tmp_path) == [4]
    loaded = ckpt.load_trainer_state(tmp_path, 4)
    assert loaded.consumed_prompts == 17 and loaded.metrics_rows == [{"step": 1}]
    ckpt.restore_rng(loaded.rng)
    assert torch.equal(torch.rand(3), expected_draw)
    from ctpo.agent import load_policy

    m2, tok2 = load_policy(str(ckpt.checkpoint_dir(tmp_path, 4) / "policy"))
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert tok2.vocab == tok.vocab


def test_tracking_offline_run_dir_and_resumed_run_reuses_id(tmp_path, monkeypatch):
    from ctpo.tracking import RUN_ID_FILE, run_id_for, start_tracking

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = dataclasses.asdict(_toy_cfg())
    t1 = start_tracking(cfg, tmp_path)
    assert t1.mode == "offline" and t1.run is not None
    from ctpo.workdir import run_identity

    assert t1.run_id == run_id_for("toy", "toy_grpo", 0, run_identity(cfg)[0])
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == t1.run_id
    t1.log({"train/reward_mean": 0.5}, step=1)
    run_dir = t1.run_dir
    t1.finish()
    assert run_dir.is_dir() and t1.run_id in run_dir.name
    t2 = start_tracking(cfg, tmp_path)  # a resumed run: the same id, never a second one
    assert t2.run_id == t1.run_id
    t2.finish()
    # offline-run-<date>_<time>-<run id>[-<n>]: W&B adds -<n> when a resumed run starts in the same second
    ids = {re.match(r"offline-run-\d{8}_\d{6}-([0-9a-f]+)", p.name).group(1)
           for p in (tmp_path / "wandb").glob("offline-run-*")}
    assert ids == {t1.run_id}
    assert run_id_for("toy", "toy_grpo", 1) != t1.run_id


def test_tracking_never_required(tmp_path, monkeypatch):
    import wandb

    from ctpo.tracking import start_tracking

    def broken_init(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: never the real internet
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = dataclasses.asdict(_toy_cfg())
    cfg["wandb"]["mode"] = "online"
    t = start_tracking(cfg, tmp_path)
    assert t.run is None and t.mode == "failed"
    t.log({"a": 1.0}, step=1)  # no-ops, no exceptions
    t.finish()


def test_auto_mode_is_online_only_with_a_key(tmp_path, monkeypatch):
    from ctpo.tracking import resolve_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    assert resolve_mode("offline") == "offline"
    with pytest.raises(ValueError, match="wandb.mode must be one of"):
        resolve_mode("sometimes")


@pytest.mark.parametrize(
    "train, rollout, message",
    [
        ({}, {"n": 1}, "rollout.n must be >= 2"),
        ({"dump_steps": [0, 5]}, {}, r"train.dump_steps \[0\] outside"),
        ({"save_freq": 0}, {}, "train.save_freq must be >= 1"),
        ({"rollout_is": "batch"}, {}, "train.rollout_is must be one of"),
    ],
)
def test_local_config_rejects_inconsistent_values(train, rollout, message):
    d = resolve_run(load_experiment("configs/experiments/toy.yaml"), "toy_grpo", 0)
    d["train"].update(train)
    d["rollout"].update(rollout)
    with pytest.raises(ConfigError, match=message):
        load_run_config(d)  # ctpo.config.validate_run_config: every cross-key check, once


def test_cli_rejects_bad_batch_arithmetic_before_starting(tmp_path):
    import json
    import subprocess
    import sys

    d = resolve_run(load_experiment("configs/experiments/toy.yaml"), "toy_grpo", 0)
    d["train"]["mini_batch_prompts"] = 5  # 16 prompts do not split into mini-batches of 5
    cfg_path = tmp_path / "c.json"
    cfg_path.write_text(json.dumps(d))
    p = subprocess.run([sys.executable, "-m", "ctpo.train", "--config", str(cfg_path), "--results",
                        str(tmp_path / "r"), "--workdir", str(tmp_path / "w")], capture_output=True, text=True,
                       env={**os.environ, "WANDB_MODE": "offline"})
    assert p.returncode == 78
    assert "must be divisible by train.mini_batch_prompts (5)" in p.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()


def test_workdir_claim_sets_aside_state_of_a_changed_config_only(tmp_path):
    from ctpo.workdir import claim, run_identity

    cfg = {"train": {"lr": 1e-3, "total_steps": 10, "save_freq": 5, "test_freq": 5, "dump_steps": [5]},
           "wandb": {"mode": "offline"}, "loss": {"method": "ctpo"}}
    wd = tmp_path / "w"
    assert claim(wd, cfg) is None
    (wd / "checkpoints").mkdir()
    (wd / "checkpoints" / "marker").write_text("x")
    # schedule and W&B changes keep the identity: a resume, nothing moves
    longer = {**cfg, "train": {**cfg["train"], "total_steps": 20}, "wandb": {"mode": "disabled"}}
    assert run_identity(longer)[0] == run_identity(cfg)[0]
    assert claim(wd, longer) is None and (wd / "checkpoints" / "marker").is_file()
    # a changed loss is a different run: old state moves to superseded/, the directory is fresh
    other = {**cfg, "loss": {"method": "grpo"}}
    moved = claim(wd, other)
    assert moved is not None and (tmp_path / "w" / "superseded").is_dir()
    assert (wd / "superseded").joinpath(moved.split("/")[-1], "checkpoints", "marker").read_text() == "x"
    assert not (wd / "checkpoints").exists()
    assert (wd / "run_identity").read_text().strip() == run_identity(other)[0]
