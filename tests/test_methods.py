"""ctpo.methods: a method is one registry entry plus its method file, and every reader follows the registry.

The throwaway method `half_ctpo` (CTPO's per-token loss halved, its own band values) is registered here with a
method file in a temporary copy of configs/, then followed through config validation, the loss dispatch, the
W&B config filter, Figure 1's adaptive band, verl's loss registry and a Table 2 row of a synthetic report.
"""
from __future__ import annotations

import copy
import inspect
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ctpo import methods, tracking
from ctpo.config import CONFIG_DIR, ConfigError, LossConfig, load_experiment, load_run_config, method_loss, resolve_run
from ctpo.diagnostics.bands import plan_bands
from ctpo.losses import compute_policy_loss, ctpo_token_losses

NAME = "half_ctpo"
KNOBS = dict(eps_low=0.1, eps_high=0.2, power=0.4)  # not CTPO's: the band must come from this file


def half_ctpo_token_losses(old_log_prob, log_prob, advantages, response_mask, *, eps_low, eps_high, power,
                           dual_clip_c):
    """Half of CTPO's per-token loss (B, T); CTPO's metrics."""
    loss, metrics = ctpo_token_losses(old_log_prob, log_prob, advantages, response_mask, eps_low=eps_low,
                                      eps_high=eps_high, power=power, dual_clip_c=dual_clip_c)
    return 0.5 * loss, metrics


@pytest.fixture
def throwaway(tmp_path):
    """(config dir holding configs/methods/half_ctpo.yaml, the toy experiment with a run of it)."""
    config_dir = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, config_dir)
    (config_dir / "methods" / f"{NAME}.yaml").write_text(
        f"method: {NAME}\nloss_agg_mode: token-mean\n" + "".join(f"{k}: {v}\n" for k, v in KNOBS.items())
        + "dual_clip_c: null\n")
    methods.register(methods.Method(NAME, "Half-CTPO (test)", half_ctpo_token_losses,
                                    ("eps_low", "eps_high", "power", "dual_clip_c")))
    exp = load_experiment(CONFIG_DIR / "experiments" / "toy.yaml")
    exp["runs"]["toy_half"] = {"model": "toy", "method": NAME}
    yield config_dir, exp
    methods.unregister(NAME)


def batch(seed, B=5, T=40):
    g = np.random.default_rng(seed)
    lp = -np.abs(g.normal(1, 0.5, (B, T)))
    olp = lp + g.normal(0, 0.2, (B, T))
    mask = g.random((B, T)) > 0.2
    adv = np.repeat(g.normal(size=(B, 1)), T, axis=1) * mask
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return f(olp), f(lp), f(adv), torch.tensor(mask)


def test_registered_methods_knobs_are_their_loss_functions_keyword_arguments():
    # a method's knobs are declared knobs (Method checks that) and are what its token loss reads: the function
    # is called with exactly these keywords, so a mismatch fails on the first call; this checks it without one
    for m in methods.all_methods():
        params = inspect.signature(m.loss_fn()).parameters.values()
        assert tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY) == m.knobs, m.name
        method_loss(m.name)  # every method has a method file that passes its own checks


def test_a_knob_is_declared_once_and_its_copies_are_derived():
    import dataclasses

    declared = list(methods.KNOBS)
    assert [f.name for f in dataclasses.fields(LossConfig)] == ["method", "loss_agg_mode", *declared]
    with pytest.raises(ValueError, match=r"knobs \['eps_wide'\] are not declared in ctpo.methods.KNOBS"):
        methods.Method("wide", "Wide", half_ctpo_token_losses, ("eps_low", "eps_wide"))
    pytest.importorskip("verl")
    import ctpo.verl_plugin as plugin

    node = {f.name for f in dataclasses.fields(plugin.CTPOPolicyLossConfig)}
    for k in methods.KNOBS.values():  # each knob sits once in verl's config: the actor's field or our node's
        assert (k.name in plugin.ACTOR_KNOBS) == (k.verl == "actor") == (k.name not in node - {"loss_mode"}), k.name


@pytest.mark.parametrize("key, value, match", [
    ("fixed_bounds", [2.0, 5.0], r"loss.fixed_bounds: expected \[lo, hi\] with 0 < lo < 1 < hi, got \[2.0, 5.0\]"),
    ("clip_ratio_c", 0.5, r"loss.clip_ratio_c: expected > 1"),
    ("eps_wide", 0.1, r"eps_wide"),
])
def test_a_bad_knob_value_or_unknown_knob_fails_in_one_line_naming_file_and_key(tmp_path, key, value, match):
    config_dir = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, config_dir)
    method = {"fixed_bounds": "ctpo_fixed", "clip_ratio_c": "grpo", "eps_wide": "ctpo"}[key]
    path = config_dir / "methods" / f"{method}.yaml"
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, key: value}))
    with pytest.raises(ConfigError, match=match) as e:
        method_loss(method, config_dir)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_new_method_flows_through_config_losses_wandb_and_diagnostics(throwaway):
    config_dir, exp = throwaway
    cfg_dict = resolve_run(exp, "toy_half", 0, config_dir)
    cfg = load_run_config(cfg_dict)
    assert cfg.loss.method == NAME and (cfg.loss.eps_low, cfg.loss.eps_high, cfg.loss.power) == (0.1, 0.2, 0.4)
    assert cfg.loss.clip_ratio_low is None and cfg.loss.fixed_bounds is None  # other methods' knobs stay null
    # the loss dispatch calls the registered function with the file's knobs: half of CTPO with the same knobs
    olp, lp, adv, mask = batch(0)
    x = lp.clone().requires_grad_()
    loss, metrics = compute_policy_loss(olp, x, adv, mask, cfg.loss)
    loss.backward()
    y = lp.clone().requires_grad_()
    ref, ref_metrics = compute_policy_loss(olp, y, adv, mask, LossConfig(method="ctpo", loss_agg_mode="token-mean",
                                                                         **KNOBS, dual_clip_c=None))
    ref.backward()
    assert loss.item() == pytest.approx(0.5 * ref.item(), rel=1e-6)
    torch.testing.assert_close(x.grad, 0.5 * y.grad)
    assert metrics.keys() == ref_metrics.keys()
    # W&B logs this method's knobs only
    assert set(tracking.run_config_for_wandb(cfg_dict)["loss"]) == {"method", "loss_agg_mode", *KNOBS, "dual_clip_c"}
    # Figure 1: as the first of the ablation pair its run sets the adaptive band; the fixed band is the twin's
    bands = plan_bands(dict(exp, evaluation=dict(exp["evaluation"], table3_runs=["toy_half", "toy_ctpo_fixed"])),
                       config_dir)
    assert bands["adaptive"] == KNOBS
    assert bands["fixed_bounds"] == method_loss("ctpo_fixed", config_dir).fixed_bounds


def test_a_new_methods_config_is_checked_against_its_entry(throwaway):
    config_dir, exp = throwaway
    bad = copy.deepcopy(exp)
    bad["runs"]["toy_half"]["overrides"] = {"loss": {"clip_ratio_low": 0.2}}  # a GRPO knob: would be ignored
    with pytest.raises(ConfigError, match="loss.clip_ratio_low: only for method grpo, gspo, full_seq"):
        resolve_run(bad, "toy_half", 0, config_dir)
    bad["runs"]["toy_half"]["overrides"] = {"loss": {"power": None}}
    with pytest.raises(ConfigError, match="loss.power: method half_ctpo needs a value"):
        resolve_run(bad, "toy_half", 0, config_dir)
    methods.unregister(NAME)
    with pytest.raises(ConfigError, match="loss.method: expected one of grpo, gspo, ctpo, ctpo_fixed, full_seq, got"):
        resolve_run(exp, "toy_half", 0, config_dir)


def test_a_new_method_gets_a_row_in_table2(throwaway, tmp_path):
    from ctpo.reports import tables
    from ctpo.reports.load import Results
    from ctpo.reports.synthetic import write_synthetic

    _, exp = throwaway
    exp = copy.deepcopy(exp)
    exp["runs"] = {r: exp["runs"][r] for r in ("toy_ctpo", "toy_ctpo_fixed", "toy_half")}
    exp["seeds"] = [0]
    exp["evaluation"].update(table2_runs=["toy_ctpo", "toy_half"], figure2_runs=["toy_ctpo", "toy_half"])
    exp["paper_reference"] = {}
    root = write_synthetic(exp, tmp_path / "half_synthetic", n_problems=6, n_diag_sequences=16)
    t = tables.table2(exp, Results(root))
    assert [row[0] for row in t.rows] == ["toy-qwen3 CTPO", "toy-qwen3 Half-CTPO (test)"]
    assert [d["run"] for d in t.data] == ["toy_ctpo", "toy_half"]


def test_the_verl_plugin_registers_a_new_method(throwaway):
    pytest.importorskip("verl")
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo import core_algos
    from verl.utils.config import omega_conf_to_dataclass

    import ctpo.verl_plugin as plugin

    cfg = method_loss(NAME, throwaway[0])
    over = plugin.verl_overrides(cfg)
    assert f"actor_rollout_ref.actor.policy_loss.loss_mode={NAME}" in over
    assert "+actor_rollout_ref.actor.policy_loss.eps_low=0.1" in over
    assert "actor_rollout_ref.actor.policy_loss._target_=ctpo.verl_plugin.CTPOPolicyLossConfig" in over
    try:
        plugin.register()
        fn = core_algos.get_policy_loss_fn(NAME)
        with initialize_config_dir(config_dir=str(Path(core_algos.__file__).parent.parent / "config"),
                                   version_base=None):
            composed = compose("ppo_trainer",
                               overrides=[*over, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1"])
        actor = omega_conf_to_dataclass(composed.actor_rollout_ref.actor)  # verl's ActorConfig, as its workers build it
        assert (actor.policy_loss.eps_low, actor.policy_loss.power) == (0.1, 0.4)
        olp, lp, adv, mask = batch(1)
        v_loss, _ = fn(olp, lp, adv, mask, "token-mean", actor, None)
        d_loss, _ = compute_policy_loss(olp, lp, adv, mask, cfg)
        assert v_loss.item() == pytest.approx(d_loss.item(), rel=1e-6)
    finally:
        core_algos.POLICY_LOSS_REGISTRY.pop(NAME, None)
        methods.unregister(NAME)
        plugin.register()  # back to the registered methods only
