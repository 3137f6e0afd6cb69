"""The verl plugin: registration, verl's real Hydra config, and parity with verl's own losses (CPU)."""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
from functools import lru_cache

import numpy as np
import pytest
import torch

pytest.importorskip("verl")
from hydra import compose, initialize_config_dir  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402

import ctpo.verl_plugin as plugin  # noqa: E402
from ctpo import schema  # noqa: E402
from ctpo.config import LossConfig, method_loss  # noqa: E402
from ctpo.losses import compute_policy_loss  # noqa: E402

VERL_CONFIG_DIR = os.path.join(os.path.dirname(core_algos.__file__), "..", "config")


@lru_cache(maxsize=None)
def actor_config(*overrides: str):
    """verl's ppo_trainer config composed offline with `overrides`, as verl's ActorConfig dataclass."""
    with initialize_config_dir(config_dir=os.path.abspath(VERL_CONFIG_DIR), version_base=None):
        cfg = compose("ppo_trainer", overrides=[*overrides, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1"])
    return cfg.actor_rollout_ref.model.external_lib, omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def method_cfg(method: str, **over) -> LossConfig:
    """LossConfig from configs/methods/<method>.yaml (what runs use), plus overrides."""
    return method_loss(method, **over)


def batch(seed, B=6, T=16, scale=0.3):
    g = np.random.default_rng(seed)
    lp = -np.abs(g.normal(1, 0.5, (B, T)))
    olp = lp + g.normal(0, scale, (B, T))
    mask = g.random((B, T)) > 0.2
    adv = np.repeat(g.normal(size=(B, 1)), T, axis=1) * mask
    is_w = np.repeat(g.uniform(0.5, 1.5, (B, 1)), T, axis=1)
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return f(olp), f(lp), f(adv), torch.tensor(mask), f(is_w)


def loss_and_grad(fn, olp, lp, adv, mask, **kw):
    x = lp.clone().requires_grad_()
    loss, metrics = fn(olp, x, adv, mask, **kw)
    loss.backward()
    return loss.detach(), x.grad, metrics


def test_import_registers_ours_and_keeps_verls():
    reg = core_algos.POLICY_LOSS_REGISTRY
    for name in ("ctpo", "ctpo_fixed", "full_seq", "verl_vanilla", "verl_gspo"):
        assert reg[name].__module__ == "ctpo.verl_plugin"
        assert core_algos.get_policy_loss_fn(name) is reg[name]
    assert reg["vanilla"] is core_algos.compute_policy_loss_vanilla
    assert reg["gspo"] is core_algos.compute_policy_loss_gspo


def test_reimport_is_idempotent_and_a_foreign_name_clash_raises(monkeypatch):
    before = set(core_algos.POLICY_LOSS_REGISTRY)
    importlib.reload(plugin)
    assert set(core_algos.POLICY_LOSS_REGISTRY) == before
    monkeypatch.setitem(core_algos.POLICY_LOSS_REGISTRY, "ctpo", core_algos.compute_policy_loss_vanilla)
    with pytest.raises(RuntimeError, match="'ctpo' is already registered by verl"):
        plugin.register()


@pytest.mark.parametrize("method", ["ctpo", "ctpo_fixed", "full_seq"])
def test_composed_verl_config_runs_our_loss_like_the_direct_call(method):
    cfg = method_cfg(method)
    lib, actor = actor_config(*plugin.verl_overrides(cfg))
    assert lib == "ctpo.verl_plugin"
    assert actor.policy_loss.loss_mode == method
    fn = core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode)
    olp, lp, adv, mask, is_w = batch(0)
    for w in (None, is_w):
        v_loss, v_grad, v_m = loss_and_grad(fn, olp, lp, adv, mask, loss_agg_mode=actor.loss_agg_mode, config=actor,
                                            rollout_is_weights=w)
        d_loss, d_grad, d_m = loss_and_grad(compute_policy_loss, olp, lp, adv, mask, cfg=cfg, rollout_is_weights=w)
        torch.testing.assert_close(v_loss, d_loss, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(v_grad, d_grad, rtol=1e-6, atol=1e-9)
    for k in (schema.CLIP_FRAC, schema.CLIP_FRAC_LOW, schema.CLIP_FRAC_HIGH, schema.LOG_RHO_CUM_MEAN):
        assert v_m[k] == d_m[k]
    # a micro-batch's std and max are not averageable: logged as token sums / a labelled lower bound
    assert schema.LOG_RHO_CUM_STD not in v_m and schema.LOG_RATIO_ABS_MAX not in v_m
    assert v_m[schema.LOG_RATIO_ABS_MAX_LB] == d_m[schema.LOG_RATIO_ABS_MAX]
    assert v_m["ctpo/sum/tokens"].item() == mask.sum().item()
    assert v_m["actor/pg_clipfrac"] == pytest.approx((d_m[schema.CLIP_FRAC_LOW] + d_m[schema.CLIP_FRAC_HIGH]).item())
    assert v_m["actor/ppo_kl"].item() == pytest.approx(-d_m[schema.LOG_RATIO_MEAN].item())
    if method != "full_seq":
        assert actor.policy_loss.eps_low == cfg.eps_low and actor.policy_loss.dual_clip_c == cfg.dual_clip_c
        assert actor.policy_loss.fixed_dual_clip == cfg.fixed_dual_clip
        assert v_m["actor/pg_clipfrac_lower"] == d_m[schema.DUAL_CLIP_FRAC]
        # and the direct call with the same knobs and another aggregation
        c_loss, c_grad, _ = loss_and_grad(compute_policy_loss, olp, lp, adv, mask,
                                          cfg=dataclasses.replace(cfg, loss_agg_mode="token-mean"))
        v_loss, v_grad, _ = loss_and_grad(fn, olp, lp, adv, mask, loss_agg_mode="token-mean", config=actor)
        torch.testing.assert_close(v_loss, c_loss, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(v_grad, c_grad, rtol=1e-6, atol=1e-9)


def test_verl_global_batch_info_scales_like_verls_own_losses():
    cfg = method_cfg("ctpo", loss_agg_mode="token-mean")  # verl's global token-mean scaling
    _, actor = actor_config(*plugin.verl_overrides(cfg))
    olp, lp, adv, mask, _ = batch(1)
    fn = core_algos.get_policy_loss_fn("ctpo")
    n = int(mask.sum())
    actor.global_batch_info.update(dp_size=2, batch_num_tokens=3 * n, global_batch_size=None)
    try:
        loss, _, _ = loss_and_grad(fn, olp, lp, adv, mask, loss_agg_mode="token-mean", config=actor)
    finally:
        actor.global_batch_info.clear()
    direct, _, _ = loss_and_grad(compute_policy_loss, olp, lp, adv, mask, cfg=cfg)
    assert loss.item() == pytest.approx(direct.item() * n / (3 * n) * 2, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["grpo", "gspo"])
def test_our_baselines_equal_verls_vanilla_and_gspo(method, seed):
    over = dict(clip_ratio_low=0.05, clip_ratio_high=0.08) if method == "gspo" else dict(clip_ratio_high=0.28)
    cfg = method_cfg(method, **over)
    overrides = plugin.verl_overrides(cfg)
    verl_name = "vanilla" if method == "grpo" else "gspo"
    assert f"actor_rollout_ref.actor.policy_loss.loss_mode=verl_{verl_name}" in overrides
    _, actor = actor_config(*overrides)
    verl_fn = core_algos.get_policy_loss_fn(verl_name)  # verl's own loss, called directly
    olp, lp, adv, mask, is_w = batch(seed, scale=0.3 if method == "grpo" else 0.05)
    lp[0, :3] = olp[0, :3] + 25.0  # beyond verl's [-20, 20] clamp
    v_loss, v_grad, v_m = loss_and_grad(verl_fn, olp, lp, adv, mask, loss_agg_mode=actor.loss_agg_mode,
                                        config=actor, rollout_is_weights=is_w)
    o_loss, o_grad, o_m = loss_and_grad(compute_policy_loss, olp, lp, adv, mask, cfg=cfg, rollout_is_weights=is_w)
    torch.testing.assert_close(o_loss, v_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(o_grad, v_grad, rtol=1e-6, atol=1e-6)
    # verl's pg_clipfrac (clipped branch active) is our CLIP_FRAC_ACTIVE = CLIP_FRAC_LOW + CLIP_FRAC_HIGH
    assert (o_m[schema.CLIP_FRAC_LOW] + o_m[schema.CLIP_FRAC_HIGH]).item() == pytest.approx(v_m["actor/pg_clipfrac"])
    assert o_m[schema.CLIP_FRAC_ACTIVE].item() == pytest.approx(v_m["actor/pg_clipfrac"])
    assert o_m[schema.CLIP_FRAC].item() > 0
    # the registered loss the run selects: verl's loss and gradient unchanged, plus the one clip fraction
    w_loss, w_grad, w_m = loss_and_grad(core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode), olp, lp, adv,
                                        mask, loss_agg_mode=actor.loss_agg_mode, config=actor, rollout_is_weights=is_w)
    assert torch.equal(w_loss, v_loss) and torch.equal(w_grad, v_grad)
    assert w_m["actor/pg_clipfrac"] == v_m["actor/pg_clipfrac"]
    for k in (schema.CLIP_FRAC, schema.CLIP_FRAC_ACTIVE, schema.CLIP_FRAC_LOW, schema.CLIP_FRAC_HIGH):
        assert w_m[k].item() == pytest.approx(o_m[k].item()), k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ctpo_with_extra_terms_neutralised_equals_verl_vanilla(seed):
    # power 0 (constant log bounds), every prefix on-policy except each row's last model token
    # => rho_cum_t = r_t everywhere, and CTPO's log-space clip / dual clip = vanilla's ratio clip / dual clip
    low, high, c = 0.2, 0.28, 3.0
    olp, lp, adv, mask, _ = batch(seed)
    last = mask.long().cumsum(-1).argmax(-1)  # index of each row's last model token
    off = lp.clone()
    off[:] = olp
    rows = torch.arange(lp.shape[0])
    off[rows, last] = lp[rows, last]
    ctpo_cfg = LossConfig(method="ctpo", loss_agg_mode="token-mean", eps_low=-math.log(1 - low),
                          eps_high=math.log(1 + high), power=0.0, dual_clip_c=math.log(c))
    vanilla_cfg = method_cfg("grpo", clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=c)
    _, actor = actor_config(*plugin.verl_overrides(vanilla_cfg))
    v_loss, v_grad, _ = loss_and_grad(core_algos.compute_policy_loss_vanilla, olp, off, adv, mask,
                                      loss_agg_mode="token-mean", config=actor)
    c_loss, c_grad, c_m = loss_and_grad(compute_policy_loss, olp, off, adv, mask, cfg=ctpo_cfg)
    torch.testing.assert_close(c_loss, v_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c_grad, v_grad, rtol=1e-6, atol=1e-6)


def test_verl_overrides_select_and_parameterise_each_method():
    grpo = plugin.verl_overrides(method_cfg("grpo"))
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=verl_vanilla" in grpo
    assert "actor_rollout_ref.actor.clip_ratio_low=0.2" in grpo and "actor_rollout_ref.actor.clip_ratio_c=3.0" in grpo
    gspo = plugin.verl_overrides(method_cfg("gspo"))
    assert {"actor_rollout_ref.actor.policy_loss.loss_mode=verl_gspo", "actor_rollout_ref.actor.clip_ratio_low=0.0003",
            "actor_rollout_ref.actor.clip_ratio_high=0.0004",
            "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean"} <= set(gspo)
    _, actor = actor_config(*gspo)
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.loss_agg_mode) == (3e-4, 4e-4, "seq-mean-token-mean")
    fixed = plugin.verl_overrides(method_cfg("ctpo_fixed"))
    assert "+actor_rollout_ref.actor.policy_loss.fixed_bounds=[0.5,5.0]" in fixed
    _, actor = actor_config(*fixed)
    assert list(actor.policy_loss.fixed_bounds) == [0.5, 5.0] and actor.policy_loss.dual_clip_c is None
    assert actor.policy_loss.fixed_dual_clip == 5.0  # constant dual clip at the upper bound
    with pytest.raises(ValueError, match="loss.clip_ratio_c"):
        plugin.verl_overrides(method_cfg("grpo", clip_ratio_c=None))


def test_ctpo_loss_mode_without_our_config_class_fails_clearly():
    _, actor = actor_config("actor_rollout_ref.actor.policy_loss.loss_mode=ctpo")
    olp, lp, adv, mask, _ = batch(0)
    with pytest.raises(ValueError, match="policy_loss._target_"):
        core_algos.get_policy_loss_fn("ctpo")(olp, lp, adv, mask, "token-mean", actor, None)


def test_loss_calls_feed_the_rollout_dump_writer(tmp_path, monkeypatch):
    from ctpo.diagnostics import verl_dumps

    monkeypatch.setattr(verl_dumps, "_WRITER", None)
    for k, v in {"CTPO_DUMP_DIR": str(tmp_path), "CTPO_DUMP_STEPS": "2", "CTPO_DUMP_START_STEP": "1",
                 "CTPO_DUMP_CALLS_PER_STEP": "2", "RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    _, actor = actor_config(*plugin.verl_overrides(method_cfg("ctpo")))
    fn = core_algos.get_policy_loss_fn("ctpo")
    batches = [batch(seed) for seed in range(4)]  # 2 loss calls per step: step 1, then step 2 (dumped)
    for olp, lp, adv, mask, _ in batches:
        fn(olp, lp.clone().requires_grad_(), adv, mask, "token-mean", actor, None)
    shards = sorted(tmp_path.rglob("*.npz"))
    assert [p.relative_to(tmp_path).as_posix() for p in shards] == ["step2/rank0.npz"]
    with np.load(shards[0]) as z:
        np.testing.assert_allclose(z["log_prob"], torch.cat([b[1] for b in batches[2:]]).numpy())
        np.testing.assert_allclose(z["old_log_prob"], torch.cat([b[0] for b in batches[2:]]).numpy())
        np.testing.assert_array_equal(z["response_mask"], torch.cat([b[3] for b in batches[2:]]).numpy())
