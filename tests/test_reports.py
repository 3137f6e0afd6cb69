"""Reports: tables and figures from a small synthetic results tree, numbers checked against raw records."""
from __future__ import annotations

import copy
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ctpo import layout
from ctpo.config import load_experiment
from ctpo.io import write_json
from ctpo.reports import figures, tables
from ctpo.reports.load import ReportInputError, Results, read_experiment
from ctpo.reports.synthetic import write_synthetic
from ctpo.reports.table1 import QUICK, run_study

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def toy_tree(tmp_path_factory):
    """A synthetic tree for the toy experiment with two seeds (4 runs x 3 checkpoints x 2 benchmarks)."""
    exp = load_experiment(REPO / "configs/experiments/toy.yaml")
    exp["seeds"] = [0, 1]
    root = tmp_path_factory.mktemp("r") / "toy_synthetic"
    write_synthetic(exp, root, n_problems=12, n_diag_sequences=64)
    return exp, root


def _exp(toy_tree, seeds=(0,), label="toy", paper_reference=None):
    exp = copy.deepcopy(toy_tree[0])
    exp["seeds"], exp["label"] = list(seeds), label
    exp["paper_reference"] = paper_reference or {}
    return exp


def _raw_avg(root: Path, run: str, seed: int, step: int, bench: str) -> tuple[float, np.ndarray]:
    df = pd.read_parquet(root / "eval" / run / f"seed{seed}" / f"step{step}" / f"{bench}.parquet")
    per_problem = df.groupby("problem_id")["correct"].mean().sort_index().to_numpy()
    return float(per_problem.mean()), per_problem


def test_synthetic_tree_labels_every_file_synthetic(toy_tree):
    _, root = toy_tree
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    for p in files:
        if p.suffix == ".json" and p.name != "table1.json":
            assert json.loads(p.read_text())["synthetic"] is True, p
        elif p.name == "table1.json":
            assert json.loads(p.read_text())["synthetic_tree"] is True
        elif p.suffix == ".parquet":
            assert pq.read_schema(p).metadata[b"synthetic"] == b"true", p
        elif p.suffix == ".jsonl":
            assert all(json.loads(line)["synthetic"] for line in p.read_text().splitlines())
    assert json.loads((root / "experiment.json").read_text())["label"] == "synthetic"
    with pytest.raises(ValueError, match="must contain 'synthetic'"):
        write_synthetic(toy_tree[0], root.parent / "paper")


def test_table2_cells_are_avg_at_k_of_the_raw_records_with_bootstrap_ci(toy_tree):
    exp, root = _exp(toy_tree), toy_tree[1]
    t = tables.table2(exp, Results(root))
    benches = exp["evaluation"]["table2_benchmarks"]
    for rec in t.data:
        assert rec["step"] == 30  # last checkpoint every compared run evaluated
        means = []
        for b in benches:
            mean, per_problem = _raw_avg(root, rec["run"], 0, 30, b)
            got = rec["benchmarks"][b]
            assert got["mean"] == pytest.approx(mean)
            lo, hi = got["ci95"]
            assert per_problem.min() <= lo <= mean <= hi <= per_problem.max()
            means.append(mean)
        assert rec["average"]["mean"] == pytest.approx(np.mean(means))
        assert rec["average"]["ci95"][0] <= np.mean(means) <= rec["average"]["ci95"][1]
    assert "TOY" in t.caption and "Average (TOY)" in t.columns
    assert "the CI covers the sampling of problems only" in t.caption  # the toy tree has one seed


def test_table2_with_two_seeds_reports_seed_mean_and_two_level_bootstrap_interval(toy_tree):
    exp, root = _exp(toy_tree, seeds=(0, 1)), toy_tree[1]
    t2 = tables.table2(exp, Results(root))
    assert "two-level bootstrap over 2 seeds, then problems" in t2.caption and "problems only" not in t2.caption
    assert "Assumptions (paper and release silent): checkpoint: tables report the final checkpoint" in t2.caption
    rec = t2.data[0]
    b = exp["evaluation"]["table2_benchmarks"][0]
    per_seed = [_raw_avg(root, rec["run"], s, 30, b)[0] for s in (0, 1)]
    cell = rec["benchmarks"][b]
    assert cell["mean"] == pytest.approx(np.mean(per_seed)) and cell["seed_values"] == pytest.approx(per_seed)
    lo, hi = cell["ci95"]
    assert 0.0 <= lo <= cell["mean"] <= hi <= 1.0
    seeds_avg = [np.mean([_raw_avg(root, rec["run"], s, 30, bb)[0] for bb in exp["evaluation"]["table2_benchmarks"]])
                 for s in (0, 1)]
    assert any(n.endswith("Average per seed: " + ", ".join(f"{100 * v:.1f}" for v in seeds_avg)) for n in t2.notes)


def test_table3_difference_row_is_the_paired_mean_difference(toy_tree):
    exp, root = _exp(toy_tree), toy_tree[1]
    t = tables.table3(exp, Results(root))
    a_run, f_run = exp["evaluation"]["table3_runs"]
    diff = t.data[-1]
    for b in exp["evaluation"]["table2_benchmarks"]:
        _, a = _raw_avg(root, a_run, 0, 30, b)
        _, f = _raw_avg(root, f_run, 0, 30, b)
        d = diff["benchmarks"][b]
        assert d["mean_diff"] == pytest.approx(np.mean(a - f))
        assert d["ci95"][0] <= d["mean_diff"] <= d["ci95"][1]
    assert t.rows[-1][0].startswith("Difference (paired bootstrap)")
    # the fixed-clip ablation's dual clip is presented as our assumption, with the release-based alternative
    assert "Assumption (ours; the paper does not state the ablation's dual clip)" in t.caption
    assert "Grader: strict." in t.caption  # the toy tree's evaluations
    assert "-A x 5 at every position" in t.caption and "bounds [0.5, 5] and verl's default dual clip 3" in t.caption


def test_paper_reference_values_appear_labelled_as_the_papers(toy_tree):
    ref = {"table2_average": {"toy_ctpo": 51.4, "toy_gspo": 47.7}, "table3_average": {"toy_ctpo": 58.8,
                                                                                     "toy_ctpo_fixed": 55.7}}
    exp, root = _exp(toy_tree, paper_reference=ref), toy_tree[1]
    t2, t3 = tables.table2(exp, Results(root)), tables.table3(exp, Results(root))
    assert t2.columns[-1] == "Average (paper, reported)"
    by_run = {r[0]: r[-1] for r in t2.rows}
    assert by_run["toy-qwen3 CTPO"] == "51.4" and by_run["toy-qwen3 GRPO"] == "n/a"
    assert t3.rows[-1][-1] == "3.1"  # the paper's 58.8 - 55.7
    assert "the paper's Table 2 averages, not our runs" in t2.caption


def test_markdown_and_latex_files_are_written_for_all_three_tables(toy_tree, tmp_path):
    exp, root = _exp(toy_tree), toy_tree[1]
    paths = tables.write_tables(exp, Results(root), tmp_path)
    assert {p.name for p in paths} >= {f"table{i}.{e}" for i in (1, 2, 3) for e in ("md", "tex")}
    assert {p.name for p in paths} >= {Path(f).name for f in layout.report_files("x")[0]}  # what the rules expect
    tex = (tmp_path / "table2.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert "toy\\_arith" in tex and "TOY" in tex
    md = (tmp_path / "table1.md").read_text()
    assert "lower than seq" in md and "\\|bias\\|" in md  # pipes escaped inside Markdown cells
    assert md.count("\n|") == 2 + 4  # header + rule + one row per ratio


def test_missing_eval_file_raises_naming_the_file(toy_tree, tmp_path):
    exp, root = _exp(toy_tree), toy_tree[1]
    broken = tmp_path / "broken_synthetic"
    import shutil

    shutil.copytree(root, broken)
    missing = broken / "eval" / "toy_gspo" / "seed0" / "step30" / "toy_arith_hard.parquet"
    missing.unlink()
    with pytest.raises(ReportInputError, match=str(missing).replace(".", r"\.")):
        tables.table2(exp, Results(broken))
    (broken / "table1.json").unlink()
    with pytest.raises(ReportInputError, match="table1.json: missing report input"):
        tables.write_tables(exp, Results(broken), tmp_path / "t")


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_figures_are_labelled_and_written_as_pdf_and_png_at_paper_width(toy_tree, tmp_path):
    exp, root = _exp(toy_tree), toy_tree[1]
    import matplotlib.pyplot as plt

    fig1 = figures.build_figure1(exp, Results(root))
    assert fig1._suptitle.get_text().startswith("Figure 1 [TOY]")
    assert len(fig1.axes) == 9  # 2 x 3 panels + a tokens-per-bin axis under each bottom panel
    assert "bins with >= " in fig1._suptitle.get_text()
    assert fig1.get_size_inches()[0] == pytest.approx(7.0)
    fig2 = figures.build_figure2(exp, Results(root))
    assert fig2._suptitle.get_text().startswith("Figure 2 [TOY]") and len(fig2.axes) == 4
    n_lines = [len(ax.get_lines()) for ax in fig2.axes]
    assert n_lines == [3, 3, 3, 3]  # one line per figure2 run in each panel
    # (b) the clip-active fraction (the release's pg_clipfrac), (c) the out-of-band fraction; the caption says which
    assert "clip active" in fig2.axes[1].get_title() and "out-of-band" in fig2.axes[2].get_title()
    caption = " ".join(t.get_text() for t in fig2.texts)
    assert "actor/pg_clipfrac" in caption and "outside its clip range" in caption
    assert "averaged over all model tokens of a step" in caption
    plt.close("all")
    paths = figures.write_figures(exp, Results(root), tmp_path)
    assert sorted(p.name for p in paths) == ["figure1.pdf", "figure1.png", "figure2.pdf", "figure2.png"]
    assert sorted(p.name for p in paths) == sorted(Path(f).name for f in layout.report_files("x")[1])
    width, _ = _png_size(tmp_path / "figure1.png")
    assert 1200 < width < 1600  # ~7 in at 200 dpi
    assert (tmp_path / "figure1.pdf").read_bytes()[:4] == b"%PDF"


def _run_cli_without_torch(args: list[str]) -> subprocess.CompletedProcess:
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['ctpo.reports'] + {args!r}\n"
        "try:\n    runpy.run_module('ctpo.reports', run_name='__main__')\n"
        "except SystemExit as e:\n    rc = e.code\n"
        "assert 'torch' not in sys.modules, 'the report path imported torch'\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)


def test_reports_cli_builds_tables_and_figures_without_importing_torch(toy_tree, tmp_path):
    _, root = toy_tree
    exp_path = tmp_path / "exp.json"
    write_json(exp_path, _exp(toy_tree))
    for cmd in (["table1", "--quick", "--out", str(tmp_path / "t1.json")],
                ["tables", "--experiment", str(exp_path), "--results", str(root), "--out", str(tmp_path / "tab")],
                ["figures", "--experiment", str(exp_path), "--results", str(root), "--out", str(tmp_path / "fig")]):
        res = _run_cli_without_torch(cmd)
        assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "t1.json").read_text())["quick"] is True
    assert (tmp_path / "tab" / "table3.tex").exists() and (tmp_path / "fig" / "figure2.png").exists()


def test_reports_cli_reports_a_missing_results_dir_in_one_line(tmp_path):
    res = _run_cli_without_torch(["tables", "--experiment", str(REPO / "configs/experiments/toy.yaml"),
                                  "--results", str(tmp_path / "nope"), "--out", str(tmp_path / "t")])
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {tmp_path / 'nope'}: results directory not found"


def test_experiment_missing_a_section_is_a_named_error(tmp_path):
    exp = load_experiment(REPO / "configs/experiments/toy.yaml")
    del exp["evaluation"]["figure2_runs"]
    write_json(tmp_path / "e.json", exp)
    with pytest.raises(ReportInputError, match=r"e\.json: missing key 'evaluation\.figure2_runs'"):
        read_experiment(tmp_path / "e.json")


def test_wandb_offline_run_holds_tables_figures_and_summaries(toy_tree, tmp_path):
    pytest.importorskip("wandb")
    from ctpo.reports.wandb_log import log_reports

    exp, root = _exp(toy_tree), toy_tree[1]
    tables.write_tables(exp, Results(root), tmp_path / "tab")
    figures.write_figures(exp, Results(root), tmp_path / "fig")
    run_id = log_reports(exp, Results(root), tmp_path / "tab", tmp_path / "fig", mode="offline",
                         wandb_dir=tmp_path)
    assert run_id
    run_dir = next((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    media = {p.parent.name + "/" + p.name.split("_")[0] for p in (run_dir / "files" / "media").rglob("*.*")}
    assert {"figures/figure1", "figures/figure2", "tables/table1", "tables/table2", "tables/table3"} <= media
    table2 = json.loads(next((run_dir / "files" / "media" / "table" / "tables").glob("table2_*.json")).read_text())
    assert table2["columns"][0] == "Model / method" and len(table2["data"]) == 3


def test_wandb_summary_scalars_are_the_table_and_diagnostic_numbers(toy_tree, tmp_path):
    from ctpo.reports.wandb_log import summary_metrics

    exp, root = _exp(toy_tree), toy_tree[1]
    tables.write_tables(exp, Results(root), tmp_path)
    summary = summary_metrics(exp, Results(root), json.loads((tmp_path / "tables.json").read_text()))
    raw = [_raw_avg(root, "toy_ctpo", 0, 30, b)[0] for b in exp["evaluation"]["table2_benchmarks"]]
    assert summary["eval/toy_ctpo/average/avg_at_k"] == pytest.approx(np.mean(raw))
    diag = json.loads((root / "diagnostics" / "toy_ctpo" / "seed0" / "step20.json").read_text())
    assert summary["diag/step20/sigma_hat"] == diag["sigma_hat"]


def test_table1_cli_quick_study_matches_direct_run(tmp_path):
    res = _run_cli_without_torch(["table1", "--quick", "--out", str(tmp_path / "t1.json")])
    assert res.returncode == 0, res.stderr
    got = json.loads((tmp_path / "t1.json").read_text())
    want = run_study(QUICK)
    assert got["estimators"]["token"]["bias_exact"] == pytest.approx(want["estimators"]["token"]["bias_exact"])
    assert "paper: bias / variance" in res.stdout


def test_eval_curves_one_wandb_run_per_run_and_seed_over_train_step(toy_tree, monkeypatch):
    import wandb

    from ctpo.reports.wandb_log import log_eval_curves

    exp, root = _exp(toy_tree, seeds=(0, 1)), toy_tree[1]
    runs = []

    class FakeRun:
        def __init__(self, **kw):
            self.kw, self.rows, self.metrics, self.id = kw, [], {}, kw["id"]
            runs.append(self)

        def define_metric(self, name, step_metric=None):
            self.metrics[name] = step_metric

        def log(self, row):
            self.rows.append(row)

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun(**kw))
    ids = log_eval_curves(exp, Results(root), mode="offline")
    assert len(runs) == len(exp["runs"]) * 2 == len(set(ids))
    ctpo0 = next(r for r in runs if r.kw["name"] == "toy_ctpo-seed0-eval")
    assert ctpo0.kw["job_type"] == "eval" and ctpo0.metrics["eval/*"] == "train_step"
    steps = [r["train_step"] for r in ctpo0.rows]
    assert steps == sorted(steps) and len(steps) >= 2  # a curve, not one point
    for row in ctpo0.rows:
        for bench in exp["data"]["benchmarks"]:
            assert row[f"eval/{bench}/avg_at_k"] == pytest.approx(_raw_avg(root, "toy_ctpo", 0, row["train_step"], bench)[0])
    again = log_eval_curves(exp, Results(root), mode="offline")
    assert again == ids  # the same evaluations reopen the same runs: nothing doubles in a curve
