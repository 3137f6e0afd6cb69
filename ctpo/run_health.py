"""Did a training run learn anything? A run whose mean reward is 0 at every step (or 1 at every step) had
no reward signal: every group's rewards are equal, so every GRPO-family advantage (R - mean) is 0 and the
policy gradient is zero throughout. Its evaluations then measure the starting policy, not the method.

`degenerate_reward(rows)` names that condition from a run's metrics.jsonl rows (ctpo.schema.TRAIN_KEYS); the
trainers write it into the run's done marker (`ctpo.layout.TrainDone.degenerate`, both backends), and the
tables (ctpo.reports.tables) flag it in their captions, which the HTML report embeds. No torch here.
"""
from __future__ import annotations

from typing import Iterable

from ctpo import schema

DEGENERATE_KEY = "run/degenerate"  # the W&B summary key the local trainer sets on such a run
CONSTANT_REWARDS = (0.0, 1.0)  # a reward stuck at either end of [0, 1] carries no signal
TOLERANCE = 1e-9


def degenerate_reward(rows: Iterable[dict]) -> str | None:
    """'reward 0 at every step (30 steps)' when the per-step mean reward (schema.REWARD_MEAN) is 0 at every
    step, likewise for 1; None when it moved, or when no row carries a reward."""
    rewards = [float(r[schema.REWARD_MEAN]) for r in rows if r.get(schema.REWARD_MEAN) is not None]
    rewards = [x for x in rewards if x == x]  # NaN: a step that logged no reward
    if not rewards:
        return None
    for value in CONSTANT_REWARDS:
        if all(abs(x - value) <= TOLERANCE for x in rewards):
            return f"reward {value:g} at every step ({len(rewards)} steps)"
    return None
