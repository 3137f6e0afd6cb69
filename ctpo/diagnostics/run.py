"""One rollout dump -> per-position-bin table (ctpo.schema.DIAG_COLUMNS) + summary (sigma_hat, R^2, totals)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from ctpo.config import CONFIG_DIR, LossConfig, RunConfig
from ctpo.diagnostics.dump import dump_step, iter_row_chunks
from ctpo.diagnostics.stream import ClipBands, PositionAccumulator, fit_sqrt_t
from ctpo.schema import DIAG_COLUMNS

ADAPTIVE_METHODS = ("ctpo",)  # runs whose own loss uses the position-adaptive band


def ctpo_default_loss() -> LossConfig:
    """The CTPO loss as configured in configs/methods/ctpo.yaml (merged onto LossConfig's defaults)."""
    cfg = OmegaConf.merge(OmegaConf.structured(LossConfig), OmegaConf.load(CONFIG_DIR / "methods" / "ctpo.yaml"))
    return OmegaConf.to_object(cfg)


def bands_for_run(cfg: RunConfig, fixed_bounds: tuple[float, float]) -> ClipBands:
    """Fixed band from the caller (paper: [0.5, 5]); adaptive band from the run's loss when it is CTPO,
    else CTPO's configured defaults (the band CTPO would have applied to these rollouts)."""
    loss = cfg.loss if cfg.loss.method in ADAPTIVE_METHODS else ctpo_default_loss()
    return ClipBands(fixed_bounds[0], fixed_bounds[1], loss.eps_low, loss.eps_high, loss.power)


def diagnose(dump: str | Path, bands: ClipBands, bin_width: int, chunk_rows: int = 256) -> tuple[dict, dict]:
    """Stream `dump` in row chunks. Returns (columns {DIAG_COLUMNS: (B,) arrays}, summary dict)."""
    step = dump_step(dump)
    acc = PositionAccumulator(bands)
    for chunk in iter_row_chunks(dump, chunk_rows):
        acc.update(chunk["old_log_prob"], chunk["log_prob"], chunk["response_mask"])
    cols = acc.binned(bin_width)
    if cols["n_tokens"].size == 0:
        raise ValueError(f"{dump}: no model tokens (response_mask is all 0)")
    sigma_hat, r2 = fit_sqrt_t(cols["t_mid"], cols["std_log_rho_cum"], cols["n_tokens"])
    summary = {
        "step": step,
        "sigma_hat": sigma_hat,
        "r2": r2,
        "n_sequences": int(acc.n_sequences),
        "n_tokens": int(np.sum(cols["n_tokens"])),
        "max_t": int(acc.count.size),
        "bin_width": int(bin_width),
        "fixed_bounds": [bands.fixed_lo, bands.fixed_hi],
        "adaptive": {"eps_low": bands.eps_low, "eps_high": bands.eps_high, "power": bands.power},
        "clip_rate_fixed": float(np.sum(acc.clip_fixed) / max(np.sum(acc.count), 1)),
        "clip_rate_adaptive": float(np.sum(acc.clip_adaptive) / max(np.sum(acc.count), 1)),
        "source": str(dump),
    }
    assert tuple(cols) == DIAG_COLUMNS, "binned columns drifted from ctpo.schema.DIAG_COLUMNS"
    return cols, summary
