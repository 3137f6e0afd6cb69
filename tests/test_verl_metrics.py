"""verl's actor metric path end to end on CPU: the plugin's loss through verl's own `ppo_loss` per
micro-batch, verl's Metric / aggregate_dp / append_to_dict / rename_dict("actor/") / reduce_metrics as its
worker and trainer apply them, the file-logger line, then our converter. The converted row must hold the
step's token-weighted statistics, computed here independently over all the step's tokens."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("verl")
from hydra import compose, initialize_config_dir  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.utils.metric import Metric, reduce_metrics  # noqa: E402
from verl.utils.py_functional import append_to_dict, rename_dict  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

import ctpo.verl_plugin as plugin  # noqa: E402
from ctpo import schema  # noqa: E402
from ctpo.config import method_loss  # noqa: E402
from ctpo.losses import compute_policy_loss  # noqa: E402
from ctpo.train.verl_metrics import convert_logs  # noqa: E402

P, R = 3, 12  # prompt and response lengths


def loss_config(method):
    return method_loss(method)  # configs/methods/<method>.yaml


def actor_config(method):
    d = os.path.abspath(os.path.join(os.path.dirname(core_algos.__file__), "..", "config"))
    with initialize_config_dir(config_dir=d, version_base=None):
        cfg = compose("ppo_trainer", overrides=[*plugin.verl_overrides(loss_config(method)),
                                                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"])
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def micro_batch(g, b, keep):
    """One micro-batch of b responses; `keep` = probability a response position is a model token."""
    lp = -np.abs(g.normal(1.0, 0.5, (b, R)))
    olp = lp + g.normal(0, 0.3, (b, R))
    mask = (g.random((b, R)) < keep).astype(np.float32)
    adv = np.repeat(g.normal(size=(b, 1)), R, axis=1)
    return lp, olp, mask, adv


def verl_ppo_loss(actor, lp, olp, mask, adv):
    """verl's ppo_loss on one micro-batch, the model output in verl's no-padding layout (log-prob of the
    token at position p stored at p - 1)."""
    b = lp.shape[0]
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    td = TensorDict({"prompts": torch.ones(b, P, dtype=torch.long), "responses": torch.ones(b, R, dtype=torch.long),
                     "attention_mask": torch.ones(b, P + R, dtype=torch.long), "response_mask": f(mask),
                     "old_log_probs": f(olp), "advantages": f(adv)}, batch_size=[b])
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    flat = torch.zeros(b, P + R)
    flat[:, P - 1:P + R - 1] = f(lp)
    _, metrics = ppo_loss(actor, {"log_probs": flat.reshape(-1)}, td)
    return metrics


# grpo / gspo: verl's own vanilla / gspo through our verl_vanilla / verl_gspo wrappers (the same metrics path)
@pytest.mark.parametrize("method", ["ctpo", "ctpo_fixed", "grpo", "gspo"])
def test_converted_metrics_are_the_steps_token_statistics(tmp_path, method):
    actor = actor_config(method)
    g = np.random.default_rng(7)
    # 2 mini-batches x 3 micro-batches of very different sizes (token counts 2..20): micro-batch means differ
    steps = [[micro_batch(g, 2, keep) for keep in (0.1, 0.5, 0.9)] for _ in range(2)]
    per_mini = {}
    for mini in steps:  # verl: engine collects per-micro-batch Metrics, worker aggregate_dp, append_to_dict
        collected: dict = {}
        for mb in mini:
            append_to_dict(collected, verl_ppo_loss(actor, *mb))
        assert all(isinstance(m, Metric) for m in collected.values())  # verl merges them into one Metric
        append_to_dict(per_mini, {k: Metric.aggregate_dp([m]) for k, m in collected.items()})  # one dp rank
    data = reduce_metrics(rename_dict(per_mini, "actor/"))  # verl trainer_base: rename_dict(..., "actor/")
    assert "actor/ctpo/sum/tokens" in data and "ctpo/clip_frac" not in data
    log = tmp_path / "attempt1.jsonl"
    log.write_text(json.dumps({"step": 1, "data": {k: float(v) for k, v in data.items()}}) + "\n")
    convert_logs([log], tmp_path / "metrics.jsonl")
    row = json.loads((tmp_path / "metrics.jsonl").read_text())

    # independent: every model token of the step at once
    lr = [(lp - olp) * m for mini in steps for lp, olp, m, _ in mini]
    cum = np.concatenate([np.cumsum(x, axis=1)[m > 0] for x, (_, _, m, _) in zip(lr, [mb for mi in steps for mb in mi])])
    toks = np.concatenate([x[m > 0] for x, (_, _, m, _) in zip(lr, [mb for mi in steps for mb in mi])])
    assert row[schema.LOG_RHO_CUM_MEAN] == pytest.approx(cum.mean(), rel=1e-5)
    assert row[schema.LOG_RHO_CUM_STD] == pytest.approx(cum.std(), rel=1e-4)
    assert row[schema.LOG_RATIO_MEAN] == pytest.approx(toks.mean(), rel=1e-5)
    # clip fractions: counts over the step's model tokens (per-micro-batch counts from the loss itself)
    cfg = loss_config(method)
    counts = {k: 0.0 for k in (schema.CLIP_FRAC, schema.CLIP_FRAC_LOW, schema.CLIP_FRAC_HIGH)}
    mb_std = []
    for lp, olp, m, adv in (mb for mi in steps for mb in mi):
        t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
        _, mm = compute_policy_loss(t(olp), t(lp), t(adv), t(m).bool(), cfg)
        for k in counts:
            counts[k] += mm[k].item() * max(m.sum(), 1)
        mb_std.append(mm[schema.LOG_RHO_CUM_STD].item())
    for k, c in counts.items():
        assert row[k] == pytest.approx(c / len(toks), rel=1e-5, abs=1e-9), k
    assert row[schema.CLIP_FRAC] > 0
    # what verl's own averaging would have called the std is not the std: the test has teeth
    assert abs(np.mean(mb_std) - cum.std()) > 0.05 * cum.std()
    # no true max from means: null, and the lower bound is labelled as one
    assert row[schema.LOG_RATIO_ABS_MAX] is None
    assert 0 < row[schema.LOG_RATIO_ABS_MAX_LB] <= np.abs(toks).max()
