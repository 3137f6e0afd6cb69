"""Tables 1-3 from results/ as Markdown and LaTeX (booktabs), plus tables.json (numbers, for W&B).

Table 2: rows = experiment.evaluation.table2_runs (model x method), columns = table2_benchmarks + Average;
  cell = avg@k in % with a 95% CI (ctpo.eval.metrics.hierarchical_bootstrap). One seed: percentile
  bootstrap over problems (the Average's CI resamples problems within every benchmark and averages).
  Several seeds: mean over seeds and problems, with a two-level bootstrap (seeds, then problems) whose
  interval stays inside [0, 100]; the notes list each seed's value. Step = the last step every compared
  run evaluated.
Table 3: experiment.evaluation.table3_runs (adaptive CTPO, fixed-clip CTPO) and a row with their difference,
  paired by seed (seed s of both starts from the same warm start), then by problem.
Runs that learned nothing (ctpo.run_health: reward 0, or 1, at every step) are flagged in the caption;
  evaluation.exclude_degenerate: true leaves them out of the means and intervals, and the caption says so.
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
from ctpo.eval.metrics import hierarchical_bootstrap, paired_bootstrap
from ctpo.io import write_json, write_text
from ctpo.reports.load import (EXCLUDE_DEGENERATE, ReportInputError, Results, exclude_degenerate, label_tag,
                               run_title)
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


def _interval(boot: dict) -> dict:
    out = {"mean": boot["mean"], "ci95": boot["ci95"], "resampled": boot["resampled"]}
    if boot["n_seeds"] > 1:
        out["seed_values"] = boot["seed_means"]
    return out


def score_summary(per_bench: list[np.ndarray], seed: int = 0) -> dict:
    """Per-benchmark and average avg@k with 95% CIs from per-bench (S, P) score arrays
    (ctpo.eval.metrics.hierarchical_bootstrap: problems for one seed; seeds, then problems for several)."""
    return {
        "bench": [_interval(hierarchical_bootstrap([s], N_BOOT, seed + i)) for i, s in enumerate(per_bench)],
        "average": _interval(hierarchical_bootstrap(per_bench, N_BOOT, seed)),
    }


def _ci_kind(n_seeds: int) -> str:
    if n_seeds == 1:
        return "bootstrap over problems"
    return (f"two-level bootstrap over {n_seeds} seeds, then problems: every resample averages observed "
            "accuracies, so the interval stays inside [0, 100], where a Student-t interval over a few seeds "
            "does not; with few seeds it still understates the seed-to-seed spread")


def _seed_counts(per_run_seeds: dict[str, list[int]]) -> int:
    """The seed count the caption names (the most any run kept)."""
    return max((len(s) for s in per_run_seeds.values()), default=0)


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


def degenerate_runs(results: Results, runs: list[str], seeds: list[int]) -> dict[tuple[str, int], str]:
    """{(run, seed): why} for the runs that learned nothing (ctpo.run_health), from their metrics.jsonl."""
    out = {}
    for run in runs:
        for s in seeds:
            why = results.degenerate(run, s)
            if why:
                out[(run, s)] = why
    return out


def kept_seeds(exp: dict, runs: list[str], seeds: list[int], flagged: dict) -> dict[str, list[int]]:
    """Seeds each run is averaged over: all of them, unless evaluation.exclude_degenerate leaves out flagged ones."""
    if not exclude_degenerate(exp):
        return {r: list(seeds) for r in runs}
    return {r: [s for s in seeds if (r, s) not in flagged] for r in runs}


def degenerate_note(exp: dict, flagged: dict) -> str:
    """The caption's flag: which (run, seed) learned nothing, and whether the table includes them."""
    if not flagged:
        return ""
    listed = "; ".join(f"{run} seed {s}: {why}" for (run, s), why in sorted(flagged.items()))
    if exclude_degenerate(exp):
        return (f" EXCLUDED, learned nothing ({listed}): left out of every mean and interval, as the experiment's "
                f"evaluation.{EXCLUDE_DEGENERATE}: true says.")
    return (f" WARNING, learned nothing ({listed}): included in the means and intervals above (set "
            f"evaluation.{EXCLUDE_DEGENERATE}: true in the experiment file to leave them out, stated here).")


def _seed_values_note(exp: dict, run: str, summary: dict) -> str | None:
    if "seed_values" not in summary["average"]:
        return None
    return f"{run_title(exp, run)} Average per seed: " + ", ".join(_pct(v) for v in summary["average"]["seed_values"])


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
    flagged = degenerate_runs(results, runs, seeds)
    use = kept_seeds(exp, runs, seeds, flagged)
    k = results.eval_result(runs[0], seeds[0], step, benches[0]).k
    rows, data, notes = [], [], []
    for run in runs:
        if not use[run]:
            rows.append([run_title(exp, run), *["excluded"] * (len(benches) + 2)] + (["n/a"] * bool(ref)))
            data.append({"run": run, "step": step, "k": k, "seeds": [], "excluded": True})
            continue
        per_bench = [results.seed_scores(run, use[run], step, b) for b in benches]
        s = score_summary(per_bench)
        row = [run_title(exp, run), *(_cell(b["mean"], b["ci95"]) for b in s["bench"])]
        row.append(_cell(s["average"]["mean"], s["average"]["ci95"]))
        other_avg = float(np.mean([results.seed_scores(run, use[run], step, b, grading.correct_column(other)).mean()
                                   for b in benches]))
        row.append(_pct(other_avg))
        if ref:
            row.append(f"{ref[run]:.1f}" if run in ref else "n/a")
        rows.append(row)
        data.append({"run": run, "step": step, "k": k, "seeds": use[run], "benchmarks": dict(zip(benches, s["bench"])),
                     "average": s["average"], "grader": grader, "average_by_grader": {other: other_avg},
                     "paper_average": ref.get(run),
                     "degenerate": {str(sd): flagged[(run, sd)] for sd in seeds if (run, sd) in flagged}})
        notes += [n for n in [_seed_values_note(exp, run, s)] if n]
    n_seeds = _seed_counts(use)
    caption = (f"Table 2 [{tag}]: avg@{k} (%) at step {step}, 95% CI ({_ci_kind(n_seeds)}), seeds {seeds}."
               + grader_note(grader, other)
               + (" 'paper, reported' = the paper's Table 2 averages, not our runs." if ref else "")
               + _seed_note(seeds) + degenerate_note(exp, flagged) + assumptions_note(exp))
    return Table("table2", caption, cols, rows, data, notes)


def table3(exp: dict, results: Results) -> Table:
    ev, seeds = exp["evaluation"], list(exp["seeds"])
    runs, benches = ev["table3_runs"], ev["table2_benchmarks"]
    if len(runs) != 2:
        raise ValueError(f"experiment evaluation.table3_runs: expected [adaptive_run, fixed_run], got {runs}")
    step = results.final_step(runs, seeds)
    ref = exp["paper_reference"].get("table3_average", {})
    tag = label_tag(exp)
    cols = ["Clipping", *benches, f"Average ({tag})"] + (["Average (paper, reported)"] if ref else [])
    flagged = degenerate_runs(results, runs, seeds)
    use = kept_seeds(exp, runs, seeds, flagged)
    k = results.eval_result(runs[0], seeds[0], step, benches[0]).k
    rows, data, notes = [], [], []
    for run in runs:
        if not use[run]:
            rows.append([run_title(exp, run), *["excluded"] * (len(benches) + 1)] + (["n/a"] * bool(ref)))
            data.append({"run": run, "step": step, "seeds": [], "excluded": True})
            continue
        s = score_summary([results.seed_scores(run, use[run], step, b) for b in benches])
        row = [run_title(exp, run), *(_cell(b["mean"], b["ci95"]) for b in s["bench"]),
               _cell(s["average"]["mean"], s["average"]["ci95"])]
        if ref:
            row.append(f"{ref[run]:.1f}" if run in ref else "n/a")
        rows.append(row)
        data.append({"run": run, "step": step, "seeds": use[run], "benchmarks": dict(zip(benches, s["bench"])),
                     "average": s["average"],
                     "degenerate": {str(sd): flagged[(run, sd)] for sd in seeds if (run, sd) in flagged}})
        notes += [n for n in [_seed_values_note(exp, run, s)] if n]
    a_run, f_run = runs
    pair = [sd for sd in use[a_run] if sd in use[f_run]]  # paired by seed: both runs kept
    if pair:
        a_f = [(results.seed_scores(a_run, pair, step, b), results.seed_scores(f_run, pair, step, b)) for b in benches]
        diffs = [paired_bootstrap(a, f, n_boot=N_BOOT, seed=i) for i, (a, f) in enumerate(a_f)]
        avg_boot = hierarchical_bootstrap([a - f for a, f in a_f], N_BOOT, len(benches))  # B x (S, P) differences
        avg = {"mean_diff": avg_boot["mean"], "ci95": avg_boot["ci95"], "frac_le_0": avg_boot["frac_le_0"],
               "seed_diffs": avg_boot["seed_means"], "n_seeds": avg_boot["n_seeds"], "resampled": avg_boot["resampled"]}
        row = [f"Difference (paired bootstrap{' by seed, then problem' if len(pair) > 1 else ''})",
               *(_cell(d["mean_diff"], d["ci95"]) for d in [*diffs, avg])]
        if len(pair) > 1:
            notes.append(f"Difference Average per seed {pair}: " + ", ".join(_pct(v) for v in avg["seed_diffs"]))
    else:
        diffs, avg = [], {"mean_diff": None, "ci95": None, "frac_le_0": None}
        row = ["Difference: no seed left to pair", *["excluded"] * (len(benches) + 1)]
    if ref:
        row.append(f"{ref[a_run] - ref[f_run]:.1f}" if a_run in ref and f_run in ref else "n/a")
    rows.append(row)
    data.append({"difference": f"{a_run} - {f_run}", "seeds": pair, "benchmarks": dict(zip(benches, diffs)),
                 "average": avg})
    how = ("paired bootstrap over seeds (each seed's two runs start from its warm start), then problems"
           if len(pair) > 1 else "paired bootstrap over problems")
    p_le_0 = f"{avg['frac_le_0']:.3f}" if avg["frac_le_0"] is not None else "n/a"
    caption = (f"Table 3 [{tag}]: position-adaptive vs fixed clipping, avg@{k} (%) at step {step}, 95% CI "
               f"({_ci_kind(_seed_counts(use))}); last row: {a_run} - {f_run}, {how} "
               f"(P(diff <= 0) for the average = {p_le_0})."
               + f" Grader: {table_grader(results, runs, seeds, step, benches, 'Table 3')}."
               + (" 'paper, reported' = the paper's Table 3 averages, not our runs." if ref else "")
               + fixed_dual_clip_note(exp, f_run)
               + _seed_note(seeds) + degenerate_note(exp, flagged) + assumptions_note(exp))
    return Table("table3", caption, cols, rows, data, notes)


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
