"""Diagnostics: log rho_cum per model-token position, the sigma*sqrt(t) fit, clip rates, streaming dumps."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctpo.config import load_experiment, resolve_run
from ctpo.diagnostics import ClipBands, PositionAccumulator, cumulative_log_ratio_np, fit_sqrt_t
from ctpo.diagnostics.bands import plan_bands
from ctpo.diagnostics.run import diagnose
from ctpo.io import write_json

REPO = Path(__file__).resolve().parent.parent
BANDS = ClipBands(0.5, 5.0, 0.025, 0.05, 0.5)


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _random_batch(rng, n=40, t=30, obs_frac=0.3):
    """Rows of random length with observation tokens (mask 0) sprinkled inside the response."""
    old = rng.normal(-1.0, 0.5, size=(n, t)).astype(np.float32)
    new = (old + rng.normal(0.0, 0.2, size=(n, t))).astype(np.float32)
    mask = (rng.random((n, t)) > obs_frac).astype(np.int8)
    lengths = rng.integers(1, t + 1, size=n)
    mask[np.arange(t)[None, :] >= lengths[:, None]] = 0  # padding
    return old, new, mask


def _loop_log_rho(old, new, mask):
    """Plain loops: {row: [(t, log rho_cum_t), ...]} over model tokens only."""
    out = {}
    for i in range(old.shape[0]):
        s, t, vals = 0.0, 0, []
        for j in range(old.shape[1]):
            if mask[i, j]:
                s += min(max(float(new[i, j]) - float(old[i, j]), -20.0), 20.0)
                t += 1
                vals.append((t, s))
        out[i] = vals
    return out


def test_cumulative_log_ratio_matches_prefix_sum_over_model_tokens():
    rng = np.random.default_rng(0)
    old, new, mask = _random_batch(rng)
    new[0, 0] = old[0, 0] + 50.0  # beyond the clamp
    mask[0, 0] = 1
    log_rho, pos = cumulative_log_ratio_np(old, new, mask)
    ref = _loop_log_rho(old, new, mask)
    for i, vals in ref.items():
        got = list(zip(pos[i][mask[i] == 1].tolist(), log_rho[i][mask[i] == 1].tolist()))
        assert [t for t, _ in got] == [t for t, _ in vals]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in vals], rtol=0, atol=1e-9)
    assert log_rho[0, 0] == pytest.approx(20.0)  # clamped like the loss


def test_cumulative_log_ratio_agrees_with_the_loss_implementation():
    losses = pytest.importorskip("ctpo.losses")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    old, new, mask = _random_batch(rng)
    ours, _ = cumulative_log_ratio_np(old, new, mask)
    theirs, t_theirs = losses.cumulative_log_ratio(
        log_prob=torch.from_numpy(new), old_log_prob=torch.from_numpy(old), response_mask=torch.from_numpy(mask)
    )
    _, t_ours = cumulative_log_ratio_np(old, new, mask)
    from ctpo.diagnostics import stream

    assert stream.LOG_RATIO_CLAMP == losses.LOG_RATIO_CLAMP  # one clamp, kept in step with the loss
    sel = mask == 1
    np.testing.assert_allclose(theirs.detach().double().numpy()[sel], ours[sel], atol=1e-4)
    np.testing.assert_array_equal(t_theirs.numpy()[sel], t_ours[sel])


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_per_position_std_and_clip_rates_match_loop_over_alive_sequences(chunk_rows):
    rng = np.random.default_rng(2)
    old, new, mask = _random_batch(rng, n=60, t=25)
    acc = PositionAccumulator(BANDS)
    for s in range(0, old.shape[0], chunk_rows):
        acc.update(old[s : s + chunk_rows], new[s : s + chunk_rows], mask[s : s + chunk_rows])
    cols = acc.binned(1)
    ref = _loop_log_rho(old, new, mask)
    by_t: dict[int, list[float]] = {}
    for vals in ref.values():
        for t, v in vals:
            by_t.setdefault(t, []).append(v)
    ts = sorted(by_t)
    np.testing.assert_array_equal(cols["t_lo"], ts)
    np.testing.assert_array_equal(cols["n_tokens"], [len(by_t[t]) for t in ts])
    np.testing.assert_allclose(cols["std_log_rho_cum"], [np.std(by_t[t]) for t in ts], atol=1e-9)
    fixed = [np.mean([(v < math.log(0.5)) or (v > math.log(5.0)) for v in by_t[t]]) for t in ts]
    adapt = [np.mean([(v < -0.025 * t**0.5) or (v > 0.05 * t**0.5) for v in by_t[t]]) for t in ts]
    np.testing.assert_allclose(cols["clip_rate_fixed"], fixed)
    np.testing.assert_allclose(cols["clip_rate_adaptive"], adapt)
    assert acc.n_sequences == 60


def test_binned_std_pools_within_position_variance():
    rng = np.random.default_rng(3)
    old, new, mask = _random_batch(rng, n=50, t=20, obs_frac=0.0)
    acc = PositionAccumulator(BANDS)
    acc.update(old, new, mask)
    cols = acc.binned(6)
    ref = _loop_log_rho(old, new, mask)
    for b in range(len(cols["t_lo"])):
        lo, hi = cols["t_lo"][b], cols["t_hi"][b]
        per_t = [[v for vals in ref.values() for t, v in vals if t == tt] for tt in range(lo, hi + 1)]
        per_t = [x for x in per_t if x]
        n = sum(len(x) for x in per_t)
        pooled = math.sqrt(sum(len(x) * np.var(x) for x in per_t) / n)
        t_mean = sum(tt * len(x) for tt, x in zip(range(lo, hi + 1), per_t)) / n
        assert cols["n_tokens"][b] == n
        assert cols["std_log_rho_cum"][b] == pytest.approx(pooled, abs=1e-9)
        assert cols["t_mid"][b] == pytest.approx(t_mean)


def test_iid_gaussian_log_ratios_recover_sigma_and_normal_tail_clip_rates():
    """Per-token log r ~ N(0, sigma^2) iid: std(log rho_cum_t) = sigma sqrt(t); clip rates are normal tails."""
    rng = np.random.default_rng(4)
    sigma, n, t_max = 0.1, 3000, 160
    old = np.zeros((n, t_max), np.float32)
    new = rng.normal(0.0, sigma, size=(n, t_max)).astype(np.float32)
    mask = np.ones((n, t_max), np.int8)
    mask[:, 1::7] = 0  # observation tokens: t advances only on model tokens
    acc = PositionAccumulator(BANDS)
    for s in range(0, n, 500):
        acc.update(old[s : s + 500], new[s : s + 500], mask[s : s + 500])
    cols = acc.binned(10)
    sigma_hat, r2 = fit_sqrt_t(cols["t_mid"], cols["std_log_rho_cum"], cols["n_tokens"])
    assert sigma_hat == pytest.approx(sigma, rel=0.03)
    assert r2 > 0.98
    for b in range(len(cols["t_lo"])):
        ts = np.arange(cols["t_lo"][b], cols["t_hi"][b] + 1)
        sd = sigma * np.sqrt(ts)
        p_fixed = np.mean([_phi(math.log(0.5) / s) + 1 - _phi(math.log(5.0) / s) for s in sd])
        p_adapt = _phi(-0.025 / sigma) + 1 - _phi(0.05 / sigma)  # the same at every t: the band scales as sqrt(t)
        assert cols["clip_rate_fixed"][b] == pytest.approx(p_fixed, abs=0.03)
        assert cols["clip_rate_adaptive"][b] == pytest.approx(p_adapt, abs=0.03)


def test_fit_sqrt_t_is_exact_on_noiseless_curve_and_r2_drops_on_linear_growth():
    t = np.arange(1, 101, dtype=float)
    s, r2 = fit_sqrt_t(t, 0.3 * np.sqrt(t), np.ones_like(t))
    assert s == pytest.approx(0.3) and r2 == pytest.approx(1.0)
    _, r2_lin = fit_sqrt_t(t, 0.01 * t**1.5, np.ones_like(t))
    assert r2_lin < 0.95


def _write_dump(path: Path, rng, n=80, t=40) -> tuple:
    old, new, mask = _random_batch(rng, n=n, t=t)
    np.savez_compressed(path, old_log_prob=old, log_prob=new, response_mask=mask, advantages=np.zeros(n, np.float32))
    return old, new, mask


def test_streamed_dump_equals_in_memory_accumulation(tmp_path):
    rng = np.random.default_rng(5)
    dump = tmp_path / "step20.npz"
    old, new, mask = _write_dump(dump, rng)
    cols, summary = diagnose(dump, BANDS, bin_width=4, chunk_rows=9)
    acc = PositionAccumulator(BANDS)
    acc.update(old, new, mask)
    ref = acc.binned(4)
    for c in ref:
        np.testing.assert_allclose(cols[c], ref[c], atol=1e-12)
    assert summary["step"] == 20 and summary["n_sequences"] == 80
    assert summary["n_tokens"] == int(mask.sum())


def test_sparse_bins_are_kept_with_counts_but_left_out_of_the_fit(tmp_path):
    rng = np.random.default_rng(7)
    dump = tmp_path / "step5.npz"
    old, new, mask = _write_dump(dump, rng, n=60, t=40)
    mask[:] = 1
    mask[2:, 24:] = 0  # from t = 25 on only 2 sequences are alive
    np.savez_compressed(dump, old_log_prob=old, log_prob=new, response_mask=mask, advantages=np.zeros(60, np.float32))
    cols, s = diagnose(dump, BANDS, bin_width=8, min_bin_tokens=40)
    assert list(cols["n_tokens"]) == [480, 480, 480, 16, 16]
    kept = cols["n_tokens"] >= 40
    assert list(kept) == [True, True, True, False, False]  # 2 sequences x 8 positions = 16 < 40
    from ctpo.diagnostics.stream import fit_sqrt_t

    sig, r2 = fit_sqrt_t(cols["t_mid"][kept], cols["std_log_rho_cum"][kept], cols["n_tokens"][kept])
    assert (s["sigma_hat"], s["r2"]) == (sig, r2)
    assert s["n_bins"] == 5 and s["n_bins_kept"] == 3 and s["t_max_kept"] == 24 and s["min_bin_tokens"] == 40
    with pytest.raises(ValueError, match=r"no position bin holds >= 100000 tokens"):
        diagnose(dump, BANDS, bin_width=8, min_bin_tokens=100000)


def test_dump_errors_name_the_file_and_the_missing_array(tmp_path):
    dump = tmp_path / "step3.npz"
    np.savez(dump, old_log_prob=np.zeros((2, 3), np.float32), log_prob=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"step3\.npz: missing array 'response_mask'"):
        diagnose(dump, BANDS, bin_width=1)
    badly_named = tmp_path / "rollouts.npz"
    _write_dump(badly_named, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"rollouts\.npz: rollout dump must be named step<N>\.npz"):
        diagnose(badly_named, BANDS, bin_width=1)


def _run_config(tmp_path: Path, run: str) -> Path:
    cfg = resolve_run(load_experiment(REPO / "configs/experiments/toy.yaml"), run, 0)
    p = tmp_path / f"{run}.json"
    write_json(p, cfg)
    return p


def _bands_file(tmp_path: Path) -> Path:
    """The toy experiment's Figure 1 bands, as the workflow's bands_config rule writes them."""
    p = tmp_path / "figure1_bands.json"
    write_json(p, plan_bands(load_experiment(REPO / "configs/experiments/toy.yaml")))
    return p


@pytest.mark.parametrize("run", ["toy_ctpo", "toy_grpo"])
def test_cli_writes_parquet_and_summary_with_ctpo_bands(tmp_path, run):
    rng = np.random.default_rng(6)
    dump = tmp_path / "step10.npz"
    _write_dump(dump, rng)
    out = tmp_path / "diag" / "step10.parquet"
    cmd = [sys.executable, "-m", "ctpo.diagnostics", "--dump", str(dump), "--config", str(_run_config(tmp_path, run)),
           "--bands", str(_bands_file(tmp_path)), "--bin-width", "5", "--min-bin-tokens", "1", "--out", str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    df = pd.read_parquet(out)
    from ctpo.schema import DIAG_COLUMNS

    assert tuple(df.columns) == DIAG_COLUMNS
    meta = json.loads(out.with_suffix(".json").read_text())
    assert {"sigma_hat", "r2", "n_sequences", "n_tokens", "step"} <= set(meta)
    assert meta["step"] == 10 and meta["run"] == run and meta["label"] == "toy"
    assert meta["adaptive"] == {"eps_low": 0.025, "eps_high": 0.05, "power": 0.5}  # configs/methods/ctpo.yaml


def test_cli_reports_a_missing_dump_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "ctpo.diagnostics", "--dump", str(tmp_path / "step1.npz"), "--config",
           str(_run_config(tmp_path, "toy_ctpo")), "--bands", str(_bands_file(tmp_path)), "--bin-width", "5",
           "--min-bin-tokens", "1", "--out", str(tmp_path / "o.parquet")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2
    assert "step1.npz: rollout dump not found" in res.stderr
