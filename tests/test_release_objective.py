"""The release's loss averaging on both backends (issue 20, item 1).

The release (ctpo.sh + its verl fork) trains with the fork's legacy FSDP worker: one response per micro-batch
(`ppo_micro_batch_size_per_gpu=1`), `agg_loss` without global batch information (so `token-mean` is that
response's token mean), the loss scaled by 1 / gradient accumulation (`dp_actor.py`, `loss_scale_factor`), and
FSDP averaging gradients over data-parallel ranks. Its gradient on a mini-batch is therefore the mean over
responses of each response's token-mean loss gradient. Here that gradient is computed per response, as the release
does, and compared with what our verl path produces: the mini-batch split over data-parallel ranks
(`tu.chunk_tensordict`, as verl's dispatch) and micro-batches (`prepare_micro_batches`), each micro-batch's loss
from verl's own `ppo_loss` with the global batch information verl's engine sets, gradients summed over
micro-batches and averaged over ranks.
"""
from __future__ import annotations

import copy
import os
from functools import lru_cache

import numpy as np
import pytest
import torch

pytest.importorskip("verl")
from hydra import compose, initialize_config_dir  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.engine.utils import prepare_micro_batches  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

import ctpo.verl_plugin as plugin  # noqa: E402
from ctpo.config import CONFIG_DIR, load_experiment, method_loss, resolve_run  # noqa: E402
from ctpo.losses import compute_policy_loss  # noqa: E402

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

VERL_CONFIG_DIR = os.path.abspath(os.path.join(os.path.dirname(core_algos.__file__), "..", "config"))
METHODS = ("ctpo", "ctpo_fixed", "grpo")
LENGTHS = [3, 180, 7, 60, 1, 240, 12, 95]  # response lengths (tokens), very different on purpose
EMPTY = 6  # this response has no model token (all tool output): zero loss, still one of the responses averaged
PROMPTS = [5, 2, 9, 4, 3, 6, 1, 8]


@lru_cache(maxsize=None)
def actor_config(*overrides: str):
    """verl's ActorConfig from its own ppo_trainer config. ppo_loss rewrites all of `global_batch_info` on each call;
    the legacy configs of `release_grad` never go through ppo_loss."""
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        cfg = compose("ppo_trainer", overrides=[*overrides, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1"])
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def rollouts(seed: int):
    """Per response: old log-probs, advantage (one per response), model-token mask (with a tool span in the
    long responses), rollout IS weight (one per response)."""
    g = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(LENGTHS):
        mask = np.ones(n) if i != EMPTY else np.zeros(n)
        if n > 50:
            mask[n // 3 : n // 3 + 10] = 0  # a tool observation: not a model token
        out.append(dict(old=torch.tensor(-np.abs(g.normal(1, 0.5, n)), dtype=torch.float64),
                        new=torch.tensor(g.normal(0, 0.03, n), dtype=torch.float64),  # new - old
                        adv=float(g.normal()), mask=torch.tensor(mask, dtype=torch.float64),
                        isw=float(g.uniform(0.6, 1.4))))
    return out


def new_log_probs(rs) -> torch.Tensor:
    """The trainable log-probs: one leaf (B, T_max), row i's first |o_i| entries are response i's."""
    t = max(LENGTHS)
    theta = torch.zeros(len(rs), t, dtype=torch.float64)
    for i, r in enumerate(rs):
        theta[i, : len(r["old"])] = r["old"] + r["new"]
    return theta.requires_grad_()


def nested(xs):
    return torch.nested.as_nested_tensor(xs, layout=torch.jagged)


def verl_grad(actor, rs, dp: int, micro: int) -> torch.Tensor:
    """The gradient of our verl path: verl's split and verl's `ppo_loss`, summed over micro-batches, averaged
    over `dp` ranks (FSDP's gradient all-reduce is a mean)."""
    theta = new_log_probs(rs)
    full = lambda f: nested([f(i, r) for i, r in enumerate(rs)])  # noqa: E731
    td = tu.get_tensordict(
        {
            "row": torch.arange(len(rs)),
            "prompts": nested([torch.ones(p, dtype=torch.long) for p in PROMPTS]),
            "responses": full(lambda i, r: torch.ones(len(r["old"]), dtype=torch.long)),
            "response_mask": full(lambda i, r: r["mask"]),
            "old_log_probs": full(lambda i, r: r["old"]),
            "advantages": full(lambda i, r: r["adv"] * r["mask"]),
            "rollout_is_weights": full(lambda i, r: torch.full_like(r["old"], r["isw"])),
        },
        non_tensor_dict={
            "micro_batch_size_per_gpu": micro, "use_dynamic_bsz": False,
            # what verl sets: dp size and all-reduced token count (engine), the mini-batch's response count
            # (trainer: ppo_mini_batch_size * n)
            "dp_size": dp, "batch_num_tokens": int(sum(r["mask"].sum() for r in rs)), "global_batch_size": len(rs),
        },
    )
    n_micro = 0
    for rank in tu.chunk_tensordict(td, dp):  # verl's dispatch: contiguous equal chunks per dp rank
        micro_batches, _ = prepare_micro_batches(rank)
        for mb in micro_batches:
            n_micro += 1
            rows = mb["row"].tolist()
            # the model's output: one log-prob per token of prompt + response, shifted left by one
            flat = torch.cat([torch.cat([torch.zeros(PROMPTS[i] - 1, dtype=torch.float64),
                                         theta[i, : LENGTHS[i]], torch.zeros(1, dtype=torch.float64)]) for i in rows])
            loss, _ = ppo_loss(actor, {"log_probs": flat}, mb)
            loss.backward()
    assert n_micro == len(rs) // micro  # several micro-batches and ranks, as the engine runs them
    return theta.grad / dp


def release_grad(method: str, rs, dp: int) -> torch.Tensor:
    """The release's gradient: each response alone (micro-batch 1), its token-mean loss scaled by 1 / gradient
    accumulation (= responses per rank), summed per rank, averaged over ranks."""
    theta = new_log_probs(rs)
    per_rank = len(rs) // dp
    legacy = copy.deepcopy(actor_config(*plugin.verl_overrides(method_loss(method, loss_agg_mode="token-mean"))))
    legacy.global_batch_info.clear()  # the legacy worker passes none: token-mean over the micro-batch
    for i, r in enumerate(rs):
        if i == EMPTY:  # the fork's agg_loss clamps the token count at 1: zero loss, but counted in 1 / accumulation
            continue
        n = len(r["old"])
        old, new, mask = r["old"][None], theta[i : i + 1, :n], r["mask"][None]
        adv, isw = torch.full_like(old, r["adv"]) * mask, torch.full_like(old, r["isw"])
        if method == "grpo":  # verl's own vanilla, as the fork
            loss, _ = core_algos.compute_policy_loss_vanilla(old, new, adv, mask.bool(), "token-mean", legacy, isw)
        else:  # the release's cum-token-cumprod(-la), ours in value and gradient (tests/test_losses.py)
            loss, _ = compute_policy_loss(old, new, adv, mask.bool(), method_loss(method, loss_agg_mode="token-mean"),
                                          rollout_is_weights=isw)
        (loss / per_rank).backward()
    return theta.grad / dp


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dp,micro", [(2, 2), (4, 1)])
def test_verl_path_gradient_equals_the_releases(method, dp, micro):
    rs = rollouts(seed=len(method) * 7 + dp)
    actor = actor_config(*plugin.verl_overrides(method_loss(method)))
    assert actor.loss_agg_mode == "seq-mean-token-mean"
    got, want = verl_grad(actor, rs, dp, micro), release_grad(method, rs, dp)
    assert want.abs().max() > 1e-3  # a real gradient, not clipped away
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)  # ctpo.losses computes in fp32
    # verl 0.9.1's token-mean (all tokens of the mini-batch) is not the release: long responses weigh more
    token_mean = verl_grad(actor_config(*plugin.verl_overrides(method_loss(method, loss_agg_mode="token-mean"))),
                           rs, dp, micro)
    short = [i for i, n in enumerate(LENGTHS) if n < 10 and i != EMPTY]
    ratio = token_mean[short].abs().sum() / want[short].abs().sum()
    assert ratio < 0.2  # short responses' gradient shrinks by |o_i| / mean length under token-mean


@pytest.mark.parametrize("method", METHODS)
def test_local_backend_loss_is_the_releases(method):
    """The local trainer calls compute_policy_loss on a whole mini-batch with the method file's loss: its gradient
    is the release's with one rank and accumulation over the mini-batch's responses."""
    rs = rollouts(seed=3)
    theta = new_log_probs(rs)
    old = torch.stack([torch.nn.functional.pad(r["old"], (0, max(LENGTHS) - len(r["old"]))) for r in rs])
    mask = torch.stack([torch.nn.functional.pad(r["mask"], (0, max(LENGTHS) - len(r["mask"]))) for r in rs])
    adv = torch.tensor([r["adv"] for r in rs], dtype=torch.float64)[:, None] * mask
    isw = torch.tensor([r["isw"] for r in rs], dtype=torch.float64)[:, None].expand_as(mask)
    loss, _ = compute_policy_loss(old, theta, adv, mask.bool(), method_loss(method), rollout_is_weights=isw,
                                  global_batch_size=len(rs))  # what update_policy passes: every response counts
    loss.backward()
    torch.testing.assert_close(theta.grad, release_grad(method, rs, dp=1), rtol=1e-6, atol=1e-8)  # ctpo.losses computes in fp32


@pytest.mark.parametrize("experiment", ["paper", "toy"])
def test_every_run_but_gspo_trains_on_the_releases_averaging(experiment):
    exp = load_experiment(CONFIG_DIR / "experiments" / f"{experiment}.yaml")
    for run, spec in exp["runs"].items():
        if spec["method"] in METHODS:
            assert resolve_run(exp, run, 0)["loss"]["loss_agg_mode"] == "seq-mean-token-mean", run
