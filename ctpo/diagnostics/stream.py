"""Streaming per-position statistics of log rho_cum (paper Sec. 3.3 and Figure 1), numpy only.

For a rollout batch with per-token log-probs under the behaviour policy (`old_log_prob`) and under the
policy the loss saw (`log_prob`), both (N, T), and `response_mask` (N, T) with 1 = model token:

    log r_{i,j}        = clamp(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)   (model tokens)
    t_{i,j}            = number of model tokens in row i up to and including column j   (1-based)
    log rho_cum_{i,t}  = sum of log r over the first t model tokens of row i

Observation / padding tokens (mask 0) neither add to the sum nor advance t, exactly as the CTPO loss.
At each model-token position t the statistics run over the sequences still alive at t (those with at
least t model tokens). `PositionAccumulator.update` takes row chunks and merges per-position
count / mean / M2 (Chan et al.'s parallel update) and clip counts, so memory is O(T), never O(N T).

Clip rates per position:
    fixed     rho_cum outside [lo, hi]                     (Table 3's ctpo_fixed, paper: [0.5, 5])
    adaptive  log rho_cum outside [-eps_low t^p, eps_high t^p]   (CTPO's position-adaptive band)
A token counts as clipped when its ratio is outside the band, whatever the advantage's sign.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ctpo.losses.LOG_RATIO_CLAMP: the loss clamps each per-token log ratio to [-20, 20] before summing; the
# diagnostics must see the same numbers without importing torch (a test keeps the two equal).
LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class ClipBands:
    """Bounds for the two clip-rate curves. `fixed_lo/hi` are ratios; `eps_*`, `power` are log-space."""

    fixed_lo: float
    fixed_hi: float
    eps_low: float
    eps_high: float
    power: float

    def __post_init__(self) -> None:
        if not 0 < self.fixed_lo < 1 < self.fixed_hi:
            raise ValueError(f"fixed bounds must satisfy 0 < lo < 1 < hi, got [{self.fixed_lo}, {self.fixed_hi}]")
        if self.eps_low <= 0 or self.eps_high <= 0 or self.power <= 0:
            raise ValueError(f"adaptive bounds need eps_low, eps_high, power > 0, got {self}")


def cumulative_log_ratio_np(old_log_prob: np.ndarray, log_prob: np.ndarray, response_mask: np.ndarray):
    """log rho_cum and model-token positions for a chunk of rows.

    Args: old_log_prob, log_prob (n, T) float; response_mask (n, T) {0, 1}.
    Returns: (log_rho_cum (n, T) float64, t (n, T) int64); both are meaningful only where mask == 1
    (at mask-0 columns they carry the running value of the preceding model token).
    """
    mask = response_mask.astype(bool)
    lr = np.clip(log_prob.astype(np.float64) - old_log_prob.astype(np.float64), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    lr = np.where(mask, lr, 0.0)  # (n, T); observation tokens add nothing
    return np.cumsum(lr, axis=1), np.cumsum(mask, axis=1, dtype=np.int64)


class PositionAccumulator:
    """Per-position running count, mean, M2 and clip counts of log rho_cum over row chunks.

    Memory: five float64/int64 arrays of length max(t) seen so far.
    """

    def __init__(self, bands: ClipBands) -> None:
        self.bands = bands
        self.count = np.zeros(0, np.int64)  # (T_max,) sequences alive at t = index + 1
        self.mean = np.zeros(0, np.float64)
        self.m2 = np.zeros(0, np.float64)
        self.clip_fixed = np.zeros(0, np.int64)
        self.clip_adaptive = np.zeros(0, np.int64)
        self.n_sequences = 0

    def _grow(self, size: int) -> None:
        if size <= self.count.size:
            return
        pad = size - self.count.size
        self.count = np.concatenate([self.count, np.zeros(pad, np.int64)])
        self.mean = np.concatenate([self.mean, np.zeros(pad)])
        self.m2 = np.concatenate([self.m2, np.zeros(pad)])
        self.clip_fixed = np.concatenate([self.clip_fixed, np.zeros(pad, np.int64)])
        self.clip_adaptive = np.concatenate([self.clip_adaptive, np.zeros(pad, np.int64)])

    def update(self, old_log_prob: np.ndarray, log_prob: np.ndarray, response_mask: np.ndarray) -> None:
        """Add a chunk of rows; arrays (n, T) as in the rollout dump."""
        if not (old_log_prob.shape == log_prob.shape == response_mask.shape) or old_log_prob.ndim != 2:
            raise ValueError(
                f"old_log_prob {old_log_prob.shape}, log_prob {log_prob.shape}, response_mask "
                f"{response_mask.shape}: expected three (N, T) arrays of one shape"
            )
        self.n_sequences += old_log_prob.shape[0]
        log_rho, pos = cumulative_log_ratio_np(old_log_prob, log_prob, response_mask)
        sel = response_mask.astype(bool)
        x = log_rho[sel]  # (n_tok,) values at model tokens
        idx = pos[sel] - 1  # (n_tok,) 0-based position
        if x.size == 0:
            return
        size = int(idx.max()) + 1
        self._grow(size)
        n_b = np.bincount(idx, minlength=size)
        mean_b = np.bincount(idx, weights=x, minlength=size) / np.maximum(n_b, 1)
        m2_b = np.bincount(idx, weights=(x - mean_b[idx]) ** 2, minlength=size)
        # Chan et al. merge of (count, mean, M2) per position
        n_a, mean_a, m2_a = self.count[:size], self.mean[:size], self.m2[:size]
        n = n_a + n_b
        delta = mean_b - mean_a
        safe_n = np.maximum(n, 1)
        self.mean[:size] = mean_a + delta * n_b / safe_n
        self.m2[:size] = m2_a + m2_b + delta**2 * n_a * n_b / safe_n
        self.count[:size] = n
        b = self.bands
        t = (idx + 1).astype(np.float64)
        out_fixed = (x < np.log(b.fixed_lo)) | (x > np.log(b.fixed_hi))
        out_adapt = (x < -b.eps_low * t**b.power) | (x > b.eps_high * t**b.power)
        self.clip_fixed[:size] += np.bincount(idx, weights=out_fixed, minlength=size).astype(np.int64)
        self.clip_adaptive[:size] += np.bincount(idx, weights=out_adapt, minlength=size).astype(np.int64)

    def binned(self, bin_width: int) -> dict[str, np.ndarray]:
        """Per-bin columns (ctpo.schema.DIAG_COLUMNS) over positions 1..T_max, bins of `bin_width` positions.

        std_log_rho_cum is the pooled within-position std: sqrt(sum_t M2_t / sum_t n_t) over the bin's
        positions (for bin_width 1 it is the population std over sequences alive at t). t_mid is the
        token-weighted mean position in the bin, the t at which sigma * sqrt(t) predicts that pooled std.
        Empty bins (no alive sequence) are dropped.
        """
        if bin_width < 1:
            raise ValueError(f"bin_width must be >= 1, got {bin_width}")
        size = self.count.size
        if size == 0:
            return {c: np.zeros(0) for c in ("t_lo", "t_hi", "t_mid", "n_tokens", "std_log_rho_cum",
                                             "clip_rate_fixed", "clip_rate_adaptive")}
        starts = np.arange(0, size, bin_width)
        t = np.arange(1, size + 1, dtype=np.float64)
        n_tok = np.add.reduceat(self.count, starts)
        keep = n_tok > 0
        safe = np.maximum(n_tok, 1)

        def per_bin(a: np.ndarray) -> np.ndarray:
            return (np.add.reduceat(a, starts) / safe)[keep]

        cols = {
            "t_lo": (starts + 1)[keep],
            "t_hi": np.minimum(starts + bin_width, size)[keep],
            "t_mid": per_bin(self.count * t),
            "n_tokens": n_tok[keep],
            "std_log_rho_cum": np.sqrt(per_bin(self.m2)),
            "clip_rate_fixed": per_bin(self.clip_fixed),
            "clip_rate_adaptive": per_bin(self.clip_adaptive),
        }
        return cols


def fit_sqrt_t(t_mid: np.ndarray, std: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Weighted least-squares fit std ~ sigma_hat * sqrt(t); returns (sigma_hat, R^2).

    sigma_hat = sum w sqrt(t) s / sum w t  (minimises sum w (s - sigma sqrt(t))^2);
    R^2 = 1 - sum w (s - fit)^2 / sum w (s - s_bar_w)^2. Weights are tokens per bin, so bins with few
    alive sequences (late positions) count for little.
    """
    t_mid, std, w = (np.asarray(a, dtype=np.float64) for a in (t_mid, std, weights))
    if t_mid.size == 0 or w.sum() <= 0:
        raise ValueError("fit_sqrt_t: no positions with model tokens to fit")
    root = np.sqrt(t_mid)
    sigma_hat = float(np.sum(w * root * std) / np.sum(w * t_mid))
    resid = std - sigma_hat * root
    s_bar = np.sum(w * std) / np.sum(w)
    ss_tot = float(np.sum(w * (std - s_bar) ** 2))
    r2 = 1.0 - float(np.sum(w * resid**2)) / ss_tot if ss_tot > 0 else float("nan")
    return sigma_hat, r2
