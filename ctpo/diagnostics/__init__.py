"""Log-ratio diagnostics (paper Sec. 3.3, Figure 1): streaming per-position std of log rho_cum, the
sigma_hat * sqrt(t) fit and clip rates under fixed and position-adaptive bands. numpy only (no torch).

  stream.py    PositionAccumulator (chunked count/mean/M2/clip counts per position), fit_sqrt_t
  dump.py      row-chunk reader for rollout dumps (.npz)
  bands.py     Figure 1's two bands of an experiment: `diagnostics.bands`, else the ablation pair's losses
  run.py       diagnose(dump, bands, bin_width) -> (bin columns, summary)
  __main__.py  python -m ctpo.diagnostics --dump ... --config ... --bands ... --bin-width W --out ...
"""
from ctpo.diagnostics.stream import ClipBands, PositionAccumulator, cumulative_log_ratio_np, fit_sqrt_t

__all__ = ["ClipBands", "PositionAccumulator", "cumulative_log_ratio_np", "fit_sqrt_t"]
