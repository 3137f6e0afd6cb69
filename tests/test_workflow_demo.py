"""ctpo.demo: the Snakemake command it runs and the closing summary (no Snakemake run here)."""
from __future__ import annotations

import sys

import ctpo.demo as demo


def test_snakemake_command_uses_this_interpreter_cores_and_experiment():
    cmd = demo.snakemake_cmd("configs/experiments/toy.yaml", 2, "--report", "results/toy/report.html")
    assert cmd[:3] == [sys.executable, "-m", "snakemake"]
    assert cmd[cmd.index("--cores") + 1] == "2"
    assert cmd[cmd.index("--configfile") + 1] == "configs/experiments/toy.yaml"
    assert cmd[-2:] == ["--report", "results/toy/report.html"]


def test_summary_lists_outputs_wandb_dirs_and_table_bodies(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "REPO_ROOT", tmp_path)
    tables, figures = tmp_path / "results/toy/tables", tmp_path / "figures/toy"
    tables.mkdir(parents=True)
    figures.mkdir(parents=True)
    (tables / "table2.md").write_text("| method | toy_arith |\n|---|---|\n| CTPO | 41.0 |\n")
    (tables / "table3.md").write_text("| ablation | avg |\n|---|---|\n| fixed | 30.5 |\n")
    (figures / "figure1.png").write_bytes(b"png")
    (tmp_path / "runs/toy/toy_ctpo/seed0/wandb/offline-run-20260101_000000-abc").mkdir(parents=True)
    report = tmp_path / "results/toy/report.html"
    text = demo.summary("toy", report, 125.0)
    assert "finished in 2.1 min" in text
    assert "results/toy/tables/  (table2.md, table3.md)" in text
    assert "figures/toy/  (figure1.png)" in text
    assert "report : results/toy/report.html" in text
    assert "1 offline run dir(s), e.g. runs/toy/toy_ctpo/seed0/wandb/offline-run-20260101_000000-abc" in text
    assert "| CTPO | 41.0 |" in text and "| fixed | 30.5 |" in text


def test_bad_jobs_and_missing_experiment_fail_with_a_clear_message(capsys):
    assert demo.main(["--jobs", "0"]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err
    assert demo.main(["--experiment", "configs/experiments/nope.yaml"]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_seeds_option_becomes_the_config_override_the_dag_expands(capsys):
    # test_dag.test_seeds_are_a_wildcard checks that this override trains every run once per seed
    cmd = demo.snakemake_cmd("configs/experiments/toy.yaml", 2, seeds=[0, 1, 2])
    assert cmd[cmd.index("--config") + 1] == "seeds=[0,1,2]"
    assert "--config" not in demo.snakemake_cmd("configs/experiments/toy.yaml", 2)
    assert demo.main(["--seeds", "0", "0"]) == 2
    assert "--seeds must be distinct" in capsys.readouterr().err
