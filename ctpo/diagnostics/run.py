"""One rollout dump -> per-position-bin table (ctpo.schema.DIAG_COLUMNS) + summary (sigma_hat, R^2, totals)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ctpo.diagnostics.dump import dump_step, iter_row_chunks
from ctpo.diagnostics.stream import ClipBands, PositionAccumulator, fit_sqrt_t
from ctpo.schema import DIAG_COLUMNS


def diagnose(dump: str | Path, bands: ClipBands, bin_width: int, min_bin_tokens: int = 1,
             chunk_rows: int = 256) -> tuple[dict, dict]:
    """Stream `dump` in row chunks. Returns (columns {DIAG_COLUMNS: (B,) arrays}, summary dict).

    Every bin is kept in the columns with its token count; the sigma_hat * sqrt(t) fit (sigma_hat, r2) runs over
    the bins holding >= min_bin_tokens tokens, the ones Figure 1 draws (late bins with a handful of sequences
    jump between 0 and 100%); r2_all_bins is the fit over every bin, for comparison.
    """
    if min_bin_tokens < 1:
        raise ValueError(f"min_bin_tokens must be >= 1, got {min_bin_tokens}")
    step = dump_step(dump)
    acc = PositionAccumulator(bands)
    for chunk in iter_row_chunks(dump, chunk_rows):
        acc.update(chunk["old_log_prob"], chunk["log_prob"], chunk["response_mask"])
    cols = acc.binned(bin_width)
    if cols["n_tokens"].size == 0:
        raise ValueError(f"{dump}: no model tokens (response_mask is all 0)")
    kept = cols["n_tokens"] >= min_bin_tokens
    if not kept.any():
        raise ValueError(f"{dump}: no position bin holds >= {min_bin_tokens} tokens (diagnostics.min_bin_tokens; "
                         f"largest bin: {int(cols['n_tokens'].max())})")
    sigma_hat, r2 = fit_sqrt_t(cols["t_mid"][kept], cols["std_log_rho_cum"][kept], cols["n_tokens"][kept])
    _, r2_all = fit_sqrt_t(cols["t_mid"], cols["std_log_rho_cum"], cols["n_tokens"])
    n_kept = np.sum(cols["n_tokens"][kept])
    summary = {
        "step": step,
        "sigma_hat": sigma_hat,
        "r2": r2,
        "r2_all_bins": r2_all,
        "n_sequences": int(acc.n_sequences),
        "n_tokens": int(np.sum(cols["n_tokens"])),
        "max_t": int(acc.count.size),
        "bin_width": int(bin_width),
        "min_bin_tokens": int(min_bin_tokens),
        "n_bins": int(kept.size),
        "n_bins_kept": int(kept.sum()),
        "t_max_kept": int(cols["t_hi"][kept].max()),
        "fixed_bounds": [bands.fixed_lo, bands.fixed_hi],
        "adaptive": {"eps_low": bands.eps_low, "eps_high": bands.eps_high, "power": bands.power},
        "clip_rate_fixed": float(np.sum(acc.clip_fixed) / max(np.sum(acc.count), 1)),
        "clip_rate_adaptive": float(np.sum(acc.clip_adaptive) / max(np.sum(acc.count), 1)),
        # over the kept bins only (what Figure 1 draws)
        "clip_rate_fixed_kept": float(np.sum(cols["clip_rate_fixed"][kept] * cols["n_tokens"][kept]) / n_kept),
        "clip_rate_adaptive_kept": float(np.sum(cols["clip_rate_adaptive"][kept] * cols["n_tokens"][kept]) / n_kept),
        "source": str(dump),
    }
    assert tuple(cols) == DIAG_COLUMNS, "binned columns drifted from ctpo.schema.DIAG_COLUMNS"
    return cols, summary
