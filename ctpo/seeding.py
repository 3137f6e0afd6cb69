"""One seeding rule for every entry point (training, warm start, evaluation)."""
from __future__ import annotations

import random


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (torch's generator also drives sampling in the CPU generator)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
