"""Tables 1-3 from results/ as Markdown and LaTeX (booktabs), plus tables.json (numbers, for W&B).

Table 2: rows = experiment.evaluation.table2_runs (model x method), columns = table2_benchmarks + Average;
  cell = avg@k in % with a 95% CI. One seed: percentile bootstrap over problems (the Average's CI
  resamples problems within every benchmark and averages). Several seeds: mean over seeds and a Student-t
  CI across seeds (ctpo.eval.metrics.aggregate_seeds). Step = the last step every compared run evaluated.
Table 3: experiment.evaluation.table3_runs (adaptive CTPO, fixed-clip CTPO) and a row with their paired-
  bootstrap difference (same problem resamples for both; per-problem scores averaged over seeds).
Table 1: the Monte-Carlo study (results/{exp}/table1.json, ctpo.reports.table1) beside the paper's
  qualitative table, rebuilt from its prose (its body is missing from our copy).
The paper's reported averages (experiment.paper_reference) appear in their own column, labelled as the
paper's; non-paper labels (toy, synthetic) are carried in every caption and header.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ctpo import grading
from ctpo.eval.metrics import CI_LEVEL, aggregate_seeds, bootstrap_ci, bootstrap_means, paired_bootstrap
from ctpo.io import write_json, write_text
from ctpo.reports.load import ReportInputError, Results, label_tag, run_title
from ctpo.reports.table1 import ESTIMATORS

N_BOOT = 2000  # bootstrap resamples for table CIs (the eval sidecars carry 10k-resample CIs per checkpoint)


@dataclass
class Table:
    name: str
    caption: str
    columns: list[str]
    rows: list[list[str]]
    data: list[dict] = field(default_factory=list)  # the numbers behind the cells
    notes: list[str] = field(default_factory=list)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell(mean: float, ci: list[float] | None) -> str:
    return _pct(mean) if ci is None else f"{_pct(mean)} [{_pct(ci[0])}, {_pct(ci[1])}]"


def _quantile_ci(samples: np.ndarray) -> list[float]:
    a = 1 - CI_LEVEL
    return [float(x) for x in np.quantile(samples, [a / 2, 1 - a / 2])]


def score_summary(per_bench: list[np.ndarray], seed: int = 0) -> dict:
    """Per-benchmark and average avg@k with 95% CIs from per-bench (S, P) score arrays."""
    out = {"bench": []}
    n_seeds = per_bench[0].shape[0]
    for i, s in enumerate(per_bench):
        if n_seeds == 1:
            out["bench"].append({"mean": float(s[0].mean()), "ci95": bootstrap_ci(s[0], N_BOOT, seed + i)})
        else:
            agg = aggregate_seeds(s.mean(axis=1))
            out["bench"].append({"mean": agg["mean"], "ci95": agg["ci95"]})
    if n_seeds == 1:
        boots = np.mean([bootstrap_means(s[0], N_BOOT, seed + i) for i, s in enumerate(per_bench)], axis=0)
        out["average"] = {"mean": float(np.mean([s[0].mean() for s in per_bench])), "ci95": _quantile_ci(boots)}
    else:
        agg = aggregate_seeds(np.mean([s.mean(axis=1) for s in per_bench], axis=0))
        out["average"] = {"mean": agg["mean"], "ci95": agg["ci95"]}
    return out


def _ci_kind(seeds: list[int]) -> str:
    return "bootstrap over problems" if len(seeds) == 1 else f"Student-t over {len(seeds)} seeds"


def assumptions_note(exp: dict) -> str:
    """The experiment's labelled assumptions (where paper and release are silent), for table captions."""
    items = exp.get("assumptions") or {}
    if not items:
        return ""
    return " Assumptions (paper and release silent): " + "; ".join(f"{k}: {v}" for k, v in items.items()) + "."


def _seed_note(seeds: list[int]) -> str:
    """One seed: the CI is over problems only and says nothing about run-to-run (seed / CPU) variation."""
    if len(seeds) == 1:
        return (" One training seed: the CI covers the sampling of problems only, not run-to-run variation "
                "(another seed, or the same seed on another CPU, trains a different policy); for an across-seed "
                "CI train several seeds (toy: make demo-seeds).")
    return ""


def table_grader(results: Results, runs: list[str], seeds: list[int], step: int, benches: list[str],
                 table: str = "Table 2") -> str:
    """The one grader whose verdicts the compared evaluations count (their sidecars'); mixed or unknown fails."""
    found = {results.eval_grader(r, s, step, b) for r in runs for s in seeds for b in benches}
    if len(found) != 1 or None in found:
        raise ReportInputError(f"{table}: evaluations at step {step} name graders {sorted(map(str, found))}; "
                               f"expected one (rerun the evaluations with ctpo.eval)")
    return found.pop()


def grader_note(grader: str, other: str) -> str:
    return (f" Grader: {grader} ({grading.DESCRIPTIONS[grader]}). 'Average ({other} grader)' = the same samples "
            f"graded by the {other} grader ({grading.DESCRIPTIONS[other]}), mean only.")


def fixed_dual_clip_note(exp: dict, fixed_run: str) -> str:
    """Table 3: the fixed-clip run's dual clip is our assumption; the caption names it and the alternative."""
    from ctpo.config import method_loss

    cfg = method_loss(exp["runs"][fixed_run]["method"])
    if cfg.method != "ctpo_fixed":
        return ""
    lo, hi = cfg.fixed_bounds
    return (f" Assumption (ours; the paper does not state the ablation's dual clip): {fixed_run} caps the loss of "
            f"A < 0 tokens at -A x {cfg.fixed_dual_clip:g} at every position (configs/methods/ctpo_fixed.yaml). "
            f"Alternative reading of the release: its non-adaptive cum-token-cumprod loss with bounds [{lo:g}, {hi:g}] "
            f"and verl's default dual clip 3.")


def table2(exp: dict, results: Results) -> Table:
    ev, seeds = exp["evaluation"], list(exp["seeds"])
    runs, benches = ev["table2_runs"], ev["table2_benchmarks"]
    step = results.final_step(runs, seeds)
    ref = exp["paper_reference"].get("table2_average", {})
    tag = label_tag(exp)
    grader = table_grader(results, runs, seeds, step, benches)
    other = grading.other(grader)
    cols = (["Model / method", *benches, f"Average ({tag})", f"Average ({other} grader)"]
            + (["Average (paper, reported)"] if ref else []))
    rows, data, k = [], [], None
    for run in runs:
        per_bench = [results.seed_scores(run, seeds, step, b) for b in benches]
        k = results.eval_result(run, seeds[0], step, benches[0]).k
        s = score_summary(per_bench)
        row = [run_title(exp, run), *(_cell(b["mean"], b["ci95"]) for b in s["bench"])]
        row.append(_cell(s["average"]["mean"], s["average"]["ci95"]))
        other_avg = float(np.mean([results.seed_scores(run, seeds, step, b, grading.correct_column(other)).mean()
                                   for b in benches]))
        row.append(_pct(other_avg))
        if ref:
            row.append(f"{ref[run]:.1f}" if run in ref else "n/a")
        rows.append(row)
        data.append({"run": run, "step": step, "k": k, "benchmarks": dict(zip(benches, s["bench"])),
                     "average": s["average"], "grader": grader, "average_by_grader": {other: other_avg},
                     "paper_average": ref.get(run)})
    caption = (f"Table 2 [{tag}]: avg@{k} (%) at step {step}, 95% CI ({_ci_kind(seeds)}), seeds {seeds}."
               + grader_note(grader, other)
               + (" 'paper, reported' = the paper's Table 2 averages, not our runs." if ref else "")
               + _seed_note(seeds) + assumptions_note(exp))
    return Table("table2", caption, cols, rows, data)


def table3(exp: dict, results: Results) -> Table:
    ev, seeds = exp["evaluation"], list(exp["seeds"])
    runs, benches = ev["table3_runs"], ev["table2_benchmarks"]
    if len(runs) != 2:
        raise ValueError(f"experiment evaluation.table3_runs: expected [adaptive_run, fixed_run], got {runs}")
    step = results.final_step(runs, seeds)
    ref = exp["paper_reference"].get("table3_average", {})
    tag = label_tag(exp)
    cols = ["Clipping", *benches, f"Average ({tag})"] + (["Average (paper, reported)"] if ref else [])
    scores = {r: [results.seed_scores(r, seeds, step, b) for b in benches] for r in runs}
    k = results.eval_result(runs[0], seeds[0], step, benches[0]).k
    rows, data = [], []
    for run in runs:
        s = score_summary(scores[run])
        row = [run_title(exp, run), *(_cell(b["mean"], b["ci95"]) for b in s["bench"]),
               _cell(s["average"]["mean"], s["average"]["ci95"])]
        if ref:
            row.append(f"{ref[run]:.1f}" if run in ref else "n/a")
        rows.append(row)
        data.append({"run": run, "step": step, "benchmarks": dict(zip(benches, s["bench"])), "average": s["average"]})
    a_run, f_run = runs
    diffs, boots = [], []
    for i, b in enumerate(benches):
        a, f = scores[a_run][i].mean(axis=0), scores[f_run][i].mean(axis=0)  # (P,) averaged over seeds
        diffs.append(paired_bootstrap(a, f, n_boot=N_BOOT, seed=i))
        boots.append(bootstrap_means(a - f, N_BOOT, i))
    avg_boot = np.mean(boots, axis=0)
    avg = {"mean_diff": float(np.mean([d["mean_diff"] for d in diffs])), "ci95": _quantile_ci(avg_boot),
           "frac_le_0": float(np.mean(avg_boot <= 0))}
    row = ["Difference (paired bootstrap)", *(_cell(d["mean_diff"], d["ci95"]) for d in [*diffs, avg])]
    if ref:
        row.append(f"{ref[a_run] - ref[f_run]:.1f}" if a_run in ref and f_run in ref else "n/a")
    rows.append(row)
    data.append({"difference": f"{a_run} - {f_run}", "benchmarks": dict(zip(benches, diffs)), "average": avg})
    caption = (f"Table 3 [{tag}]: position-adaptive vs fixed clipping, avg@{k} (%) at step {step}, 95% CI "
               f"({_ci_kind(seeds)}); last row: {a_run} - {f_run}, paired bootstrap over problems "
               f"(P(diff <= 0) for the average = {avg['frac_le_0']:.3f})."
               + f" Grader: {table_grader(results, runs, seeds, step, benches, 'Table 3')}."
               + (" 'paper, reported' = the paper's Table 3 averages, not our runs." if ref else "")
               + fixed_dual_clip_note(exp, f_run)
               + _seed_note(seeds) + assumptions_note(exp))
    return Table("table3", caption, cols, rows, data)


def table1(study: dict) -> Table:
    c = study["config"]
    cols = ["Ratio", "Paper: bias", "Paper: variance", "|bias| exact (rel.)", "|bias| MC +- s.e.",
            "mean_t Var(w_t)", "tr Cov(g)"]
    rows = []
    for name in ESTIMATORS:
        e, p = study["estimators"][name], study["paper_table1"][name]
        rows.append([p["method"], p["bias"], p["variance"], f"{e['bias_exact']:.2e} ({e['rel_bias']:.1e})",
                     f"{e['bias_mc']:.2e} +- {e['mc_se']:.1e}", f"{e['weight_var_mean']:.4g}",
                     f"{e['grad_var_trace']:.4g}"])
    ind = study["prop2"]["independent"]
    last = ind["near_on_policy"][-1]
    notes = [
        f"Prop. 2 (i): Var(rho_seq) = {study['prop2']['i']['var_seq']:.4g} > Var(rho_cum_t) for all t < H: "
        f"{study['prop2']['i']['holds']}.",
        f"Prop. 2 (ii), independent tokens: enumeration vs prod(1 + chi^2) - 1, max rel. error {ind['max_rel_err']:.1e}.",
        f"Near on-policy (perturb {last['perturb']}): Var(rho_seq)/Var(rho_cum_t) = "
        + ", ".join(f"{x:.3g}" for x in last["ratio_by_t"]) + " vs H/t = "
        + ", ".join(f"{x:.3g}" for x in last["h_over_t"]) + ".",
    ]
    caption = (f"Table 1 (measured; Monte-Carlo study, not a training run): tabular policy pair V={c['vocab']}, "
               f"H={c['horizon']}, behaviour logits perturbed by {c['perturb']}, {c['n_samples']} samples; "
               f"|grad J| = {study['true_grad_norm']:.3g}. 'Paper' columns = the paper's qualitative Table 1 rebuilt from its prose (Sec. 3.2; the table's "
               "body is missing from our copy of the paper).")
    return Table("table1", caption, cols, rows, [study["estimators"]], notes)


# ----------------------------------------------------------------------------- rendering


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def to_markdown(t: Table) -> str:
    lines = [f"**{t.caption}**", "", _md_row(t.columns), "|" + "|".join(["---"] + [":-:"] * (len(t.columns) - 1)) + "|"]
    lines += [_md_row(r) for r in t.rows]
    if t.notes:
        lines += [""] + [f"- {n}" for n in t.notes]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "%": r"\%", "_": r"\_", "&": r"\&", "#": r"\#", "$": r"\$",
        "{": r"\{", "}": r"\}", "^": r"\^{}", "~": r"\~{}", "|": r"$|$"}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in s).replace("+-", r"$\pm$")


def to_latex(t: Table) -> str:
    spec = "l" + "c" * (len(t.columns) - 1)
    lines = [r"% generated by python -m ctpo.reports tables; needs \usepackage{booktabs}", r"\begin{table}[t]",
             r"\centering", r"\small", rf"\caption{{{tex_escape(t.caption)}}}", rf"\label{{tab:{t.name}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(tex_escape(c) for c in t.columns) + r" \\",
             r"\midrule"]
    for i, r in enumerate(t.rows):
        if t.name == "table3" and i == len(t.rows) - 1:
            lines.append(r"\midrule")
        lines.append(" & ".join(tex_escape(c) for c in r) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if t.notes:
        lines.append(r"\par\smallskip\footnotesize " + r" \\ ".join(tex_escape(n) for n in t.notes))
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def write_tables(exp: dict, results: Results, out_dir: str | Path) -> list[Path]:
    """Tables 1-3 as .md and .tex under out_dir, plus tables.json; returns the written paths."""
    out_dir = Path(out_dir)
    tables = [table1(results.table1()), table2(exp, results), table3(exp, results)]
    paths = []
    for t in tables:
        for suffix, render in ((".md", to_markdown), (".tex", to_latex)):
            p = out_dir / f"{t.name}{suffix}"
            write_text(p, render(t))
            paths.append(p)
    meta = {"experiment": exp["experiment"], "label": exp["label"], "tables": [asdict(t) for t in tables]}
    write_json(out_dir / "tables.json", meta)
    return paths + [out_dir / "tables.json"]
