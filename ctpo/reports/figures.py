"""Figures 1-2 from results/ as PDF and PNG, sized for a paper page (7 in wide, fonts >= 8 pt).

Figure 1 (paper Sec. 4.3): experiment.diagnostics.run at diagnostics.steps, first seed. Top row: empirical
  std of log rho_cum vs model-token position t with the fit sigma_hat * sqrt(t); bottom row: clip rate vs t
  under the fixed band [lo, hi] and the position-adaptive band (ctpo.diagnostics.bands: the experiment's
  diagnostics.bands, else its Table 3 ablation pair), and (grey, right axis) the tokens in each bin. Only bins
  holding >= diagnostics.min_bin_tokens tokens are drawn (the fit uses the same bins).
Figure 2 (paper Sec. 4.5): one line per run in evaluation.figure2_runs, four panels. (a) avg@k on
  figure2_benchmark at every evaluated checkpoint with a 95% CI band (bootstrap over problems, or over seeds
  then problems); (b) the clip-active fraction per step (ctpo.schema.CLIP_FRAC_ACTIVE): what the release logs as
  actor/pg_clipfrac for every method, CTPO included (the clipped branch of the surrogate is active: A > 0 above
  the range or A < 0 below it), the paper's "clip fraction"; (c) the out-of-band fraction (ctpo.schema.CLIP_FRAC:
  the method-specific ratio outside its range, either advantage sign); (d) mean response length per step.
  Averaging of (b) and (c): over all model tokens of the step (token-weighted; ctpo.train.verl_metrics recovers
  it exactly on verl). The release's logged value is a mean over micro-batches of one response each, i.e. over
  responses of each response's fraction; the two differ when clipping correlates with length. The caption line
  says all this. Several seeds: the per-step mean over seeds.
Every input is required: a missing file raises ReportInputError naming it (no empty panels).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ctpo import schema
from ctpo.io import atomic_path
from ctpo.reports.load import ReportInputError, Results, label_tag, run_title
from ctpo.reports.tables import score_summary

WIDTH_IN = 7.0
METHOD_COLORS = {"grpo": "#1f77b4", "gspo": "#ff7f0e", "ctpo": "#d62728", "ctpo_fixed": "#9467bd",
                 "full_seq": "#2ca02c"}
RC = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8,
      "legend.fontsize": 8, "figure.titlesize": 9, "axes.spines.top": False, "axes.spines.right": False,
      "lines.linewidth": 1.2, "pdf.fonttype": 42}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def FuncFormatter(fn):  # noqa: N802 (matplotlib's names, imported lazily)
    from matplotlib.ticker import FuncFormatter as _FuncFormatter

    return _FuncFormatter(fn)


def FixedLocator(ticks):  # noqa: N802
    from matplotlib.ticker import FixedLocator as _FixedLocator

    return _FixedLocator(ticks)


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    paths = []
    for ext in ("pdf", "png"):
        p = out_dir / f"{name}.{ext}"
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format=ext, dpi=200, bbox_inches="tight")
        paths.append(p)
    return paths


def build_figure1(exp: dict, results: Results):
    """The matplotlib Figure (caller closes it)."""
    plt = _plt()
    diag, seed = exp["diagnostics"], exp["seeds"][0]
    steps = diag["steps"]
    data = [results.diagnostics(diag["run"], seed, s) for s in steps]
    with plt.rc_context(RC):
        fig, axes = plt.subplots(2, len(steps), figsize=(WIDTH_IN, 4.4), squeeze=False, sharex="col")
        for j, (step, (df, meta)) in enumerate(zip(steps, data)):
            top, bot = axes[0, j], axes[1, j]
            df = df[df["n_tokens"] >= meta["min_bin_tokens"]]  # late bins with a handful of tokens are noise
            t = df["t_mid"].to_numpy()
            top.plot(t, df["std_log_rho_cum"], "o", ms=2.2, color="#444444", label="empirical std")
            grid = np.linspace(0, t.max(), 200)
            top.plot(grid, meta["sigma_hat"] * np.sqrt(grid), "--", color="#d62728", label=r"fit $\hat\sigma\sqrt{t}$")
            top.text(0.04, 0.96, rf"$\hat\sigma$ = {meta['sigma_hat']:.3g}" + "\n" + rf"$R^2$ = {meta['r2']:.3f}",
                     transform=top.transAxes, ha="left", va="top")  # upper left: the curve rises to the right
            top.set_title(f"step {step}")
            top.set_ylim(bottom=0)
            lo, hi = meta["fixed_bounds"]
            a = meta["adaptive"]
            bot.plot(t, 100 * df["clip_rate_fixed"], color="#1f77b4", zorder=3, label=rf"fixed: $\rho^{{\mathrm{{cum}}}}_t \notin$ [{lo:g}, {hi:g}]")
            bot.plot(t, 100 * df["clip_rate_adaptive"], color="#d62728",
                     label=rf"adaptive: $\log\rho^{{\mathrm{{cum}}}}_t \notin$ [-{a['eps_low']:g}, {a['eps_high']:g}]$\cdot t^{{{a['power']:g}}}$")
            bot.set_xlabel("token position $t$ (model tokens)")
            bot.set_ylim(bottom=0)
            counts = bot.twinx()  # how many tokens each drawn bin holds
            counts.step(t, df["n_tokens"], where="mid", color="#999999", lw=0.7, label="tokens per bin (right axis)")
            counts.set_ylim(bottom=0, top=1.15 * float(df["n_tokens"].max()))
            counts.tick_params(axis="y", labelsize=6, colors="#777777")
            counts.spines["right"].set_visible(True)
        axes[0, 0].set_ylabel(r"std of $\log\rho^{\mathrm{cum}}_t$")
        axes[1, 0].set_ylabel("clip rate (%)")
        handles = [*axes[0, 0].get_legend_handles_labels()[0], *axes[1, 0].get_legend_handles_labels()[0],
                   *counts.get_legend_handles_labels()[0]]
        labels = [*axes[0, 0].get_legend_handles_labels()[1], *axes[1, 0].get_legend_handles_labels()[1],
                  *counts.get_legend_handles_labels()[1]]
        fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
        fig.suptitle(f"Figure 1 [{label_tag(exp)}]: " + r"$\log\rho^{\mathrm{cum}}_t$ across training, "
                     f"{run_title(exp, diag['run'])}, seed {seed}; bins with >= {data[0][1]['min_bin_tokens']} tokens")
        fig.tight_layout(rect=(0, 0.09, 1, 1))
    return fig


def _metric_over_steps(results: Results, run: str, seeds: list[int], key: str) -> pd.Series:
    """Per-step mean over seeds of one metrics.jsonl key (rows lacking it are skipped)."""
    series = []
    for s in seeds:
        df = results.metrics(run, s)
        if key not in df or df[key].isna().all():
            raise ReportInputError(f"{df.attrs['source']}: no row has the key '{key}'")
        series.append(df.dropna(subset=[key]).set_index("step")[key])
    return pd.concat(series, axis=1, join="inner").mean(axis=1)


FIG2_CLIP_CAPTION = ("(b) clip-active fraction, the paper's clip fraction (the release's actor/pg_clipfrac): model tokens "
                     "whose clipped surrogate term is active.\n(c) out-of-band fraction: the method-specific ratio "
                     "(GRPO r_t, GSPO s_i, CTPO rho_cum_t) outside its clip range, either advantage sign.\nBoth "
                     "averaged over all model tokens of a step (the release averages over micro-batches of one "
                     "response each).")


def build_figure2(exp: dict, results: Results):
    """The matplotlib Figure (caller closes it)."""
    plt = _plt()
    ev, seeds = exp["evaluation"], list(exp["seeds"])
    bench = ev["figure2_benchmark"]
    with plt.rc_context(RC):
        fig, ((ax_acc, ax_active), (ax_clip, ax_len)) = plt.subplots(2, 2, figsize=(WIDTH_IN, 4.6))
        k = None
        for run in ev["figure2_runs"]:
            method = exp["runs"][run]["method"]
            color = METHOD_COLORS.get(method)
            name = run_title(exp, run)
            steps = sorted(set.intersection(*(set(results.eval_steps(run, s)) for s in seeds)))
            mean, lo, hi = [], [], []
            for step in steps:
                summ = score_summary([results.seed_scores(run, seeds, step, bench)])["bench"][0]
                mean.append(summ["mean"])
                ci = summ["ci95"] or [summ["mean"], summ["mean"]]
                lo.append(ci[0])
                hi.append(ci[1])
            k = results.eval_result(run, seeds[0], steps[-1], bench).k
            ax_acc.plot(steps, 100 * np.array(mean), color=color, label=name)
            ax_acc.fill_between(steps, 100 * np.array(lo), 100 * np.array(hi), color=color, alpha=0.15, lw=0)
            for ax, key in ((ax_active, schema.CLIP_FRAC_ACTIVE), (ax_clip, schema.CLIP_FRAC)):
                frac = _metric_over_steps(results, run, seeds, key)
                ax.plot(frac.index, 100 * frac.to_numpy(), color=color, lw=0.9, label=name)
            length = _metric_over_steps(results, run, seeds, schema.RESPONSE_LENGTH)
            ax_len.plot(length.index, length.to_numpy(), color=color, lw=0.9, label=name)
        ax_acc.set_title(f"(a) {bench} avg@{k} (%), 95% CI")
        ax_active.set_title("(b) clip fraction (%): clip active (pg_clipfrac)")
        ax_clip.set_title("(c) out-of-band fraction (%): ratio outside its range")
        for ax in (ax_active, ax_clip):
            ax.set_yscale("symlog", linthresh=0.1)
            ax.yaxis.set_major_locator(FixedLocator([0, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax_len.set_title("(d) mean response length (tokens)")
        for ax in (ax_acc, ax_active, ax_clip, ax_len):
            ax.set_xlabel("training step")
        handles, labels = ax_acc.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.075), ncol=len(labels), frameon=False)
        fig.text(0.5, 0.005, FIG2_CLIP_CAPTION, ha="center", va="bottom", fontsize=6.5)
        fig.suptitle(f"Figure 2 [{label_tag(exp)}]: training dynamics, seeds {seeds}")
        fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def write_figures(exp: dict, results: Results, out_dir: str | Path) -> list[Path]:
    """figure1.{pdf,png} and figure2.{pdf,png} under out_dir."""
    plt = _plt()
    paths = []
    for name, build in (("figure1", build_figure1), ("figure2", build_figure2)):
        fig = build(exp, results)
        with plt.rc_context(RC):
            paths += _save(fig, Path(out_dir), name)
        plt.close(fig)
    return paths
