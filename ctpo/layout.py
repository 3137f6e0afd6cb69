"""The one layout of results/, runs/, data/, logs/ and figures/: path templates, the training done marker
(`done.json`) and the saved-steps rule. Every stage builds its paths here; the Snakemake rules build their
`P` from `templates(exp)` (workflow/rules/common.smk), and tests/test_layout.py checks that they agree.

Templates are relative to the repository root (names below are the keys of `TEMPLATES`, and of `P`);
wildcards: {exp} experiment, {run}, {seed}, {step}, {bench} benchmark, {model} hub model key, {partition}
(the preflight's, always `gpu`: one preflight on the slurm profile's GPU partition), {attempt}
(a verl launch, 1-based).

results/{exp}/  (Snakemake outputs; copied between machines, enough for every table and figure)
  experiment.json                              experiment        the experiment config (canonical JSON)
  configs/{run}/seed{seed}.json                run_config        resolved RunConfig
  configs/sft/seed{seed}.json                  sft_config        the toy warm start's config
  configs/data.json                            data_config       the experiment's data section
  configs/figure1_bands.json                   bands_config      Figure 1's clip bands (ctpo.diagnostics.bands)
  data/toy.json | deepscaler.json | benchmarks.json   data_*     checksum manifests of the data/ files
  data/model_{model}.json                      data_model        hub model fetched (rule prepare_model)
  preflight/{partition}.json                   preflight         GPU node checks passed (ctpo.preflight)
  sft/seed{seed}/done.json                     sft_done          warm start marker (ctpo.train.sft)
  train/{run}/seed{seed}/                      train_dir         TRAIN_FILES: metrics.jsonl (schema.TRAIN_KEYS),
                                                                 provenance.json, done.json (TrainDone)
  merged/{run}/seed{seed}/step{step}.json      merged            verl -> HF merge marker
  eval/{run}/seed{seed}/step{step}/{bench}.parquet  eval         per-sample records (schema.EVAL_COLUMNS)
  eval/{run}/seed{seed}/step{step}/{bench}.json     eval_json    summary + provenance
  diagnostics/{run}/seed{seed}/step{step}.parquet   diag         per-position bins (schema.DIAG_COLUMNS)
  diagnostics/{run}/seed{seed}/step{step}.json      diag_json    sigma_hat, R^2, totals
  table1.json, tables/, wandb.json             table1, tables, wandb
  benchmarks/<rule>/...tsv                     rule_benchmarks   Snakemake `benchmark:` files
figures/{exp}/figure{1,2}.{pdf,png}            figures
logs/{exp}/<rule>/...log                       logs
runs/{exp}/  (never Snakemake outputs, never committed: training must resume)
  {run}/seed{seed}/                            workdir           WORKDIR_FILES (checkpoints, rollouts, W&B id, ...)
  sft/seed{seed}/policy/                       sft_workdir, sft_policy
  reports/                                     reports_wandb     W&B dir of `python -m ctpo.reports wandb`
data/  (inputs, never outputs)
  toy/train.parquet, toy/{bench}.parquet       toy_train, toy_bench
  deepscaler/train.parquet                     deepscaler_train
  benchmarks/{bench}.parquet                   benchmark_file
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ctpo.io import read_json, write_json

RESULTS = "results/{exp}"
RUNS = "runs/{exp}"
TABLE_NAMES, TABLE_FORMATS = ("table1", "table2", "table3"), ("md", "tex")
FIGURE_NAMES, FIGURE_FORMATS = ("figure1", "figure2"), ("pdf", "png")
POLICY = "policy"  # an HF policy dir (save_pretrained + tokenizer) inside a checkpoint or the warm start

# relative to results/{exp}/
RESULTS_FILES = {
    "experiment": "experiment.json",
    "run_config": "configs/{run}/seed{seed}.json",
    "sft_config": "configs/sft/seed{seed}.json",
    "data_config": "configs/data.json",
    "bands_config": "configs/figure1_bands.json",  # ctpo.diagnostics.bands.experiment_bands
    "data_toy": "data/toy.json",
    "data_deepscaler": "data/deepscaler.json",
    "data_benchmarks": "data/benchmarks.json",
    "data_model": "data/model_{model}.json",
    "preflight": "preflight/{partition}.json",  # ctpo.preflight's report (GPU stack, driver, sandbox, model, disk)
    "sft_done": "sft/seed{seed}/done.json",
    "train_dir": "train/{run}/seed{seed}",
    "merged": "merged/{run}/seed{seed}/step{step}.json",
    "eval_dir": "eval/{run}/seed{seed}",
    "eval_step_dir": "eval/{run}/seed{seed}/step{step}",
    "eval": "eval/{run}/seed{seed}/step{step}/{bench}.parquet",
    "eval_json": "eval/{run}/seed{seed}/step{step}/{bench}.json",
    "diag": "diagnostics/{run}/seed{seed}/step{step}.parquet",
    "diag_json": "diagnostics/{run}/seed{seed}/step{step}.json",
    "table1": "table1.json",
    "tables": "tables",
    "table": "tables/{name}.{ext}",  # name in TABLE_NAMES, ext in TABLE_FORMATS (ctpo.reports.tables)
    "wandb": "wandb.json",
    "report": "report.html",  # `snakemake --report` (make demo)
    "rule_benchmarks": "benchmarks",
}
# relative to a run's train_dir, results/{exp}/train/{run}/seed{seed}/ (the trainers' --results)
TRAIN_FILES = {
    "metrics": "metrics.jsonl",
    "provenance": "provenance.json",
    "train_done": "done.json",
}
# relative to runs/{exp}/
RUNS_FILES = {
    "workdir": "{run}/seed{seed}",
    "sft_workdir": "sft/seed{seed}",
    "sft_policy": f"sft/seed{{seed}}/{POLICY}",
    "reports_wandb": "reports",
}
# relative to a run's workdir, runs/{exp}/{run}/seed{seed}/ (the trainers' --workdir)
WORKDIR_FILES = {
    "checkpoints": "checkpoints",
    "checkpoint": "checkpoints/step{step}",  # local backend: policy/ + trainer_state.pt (ctpo.train.checkpoint)
    "policy": f"checkpoints/step{{step}}/{POLICY}",  # local backend: what evaluation loads
    "verl_actor": "checkpoints/global_step_{step}/actor",  # verl's FSDP checkpoint
    "verl_latest": "checkpoints/latest_checkpointed_iteration.txt",  # verl: the last saved step
    "hf": "hf/step{step}",  # verl: the merged HF model evaluation loads
    "rollouts": "rollouts",
    "rollout": "rollouts/step{step}.npz",  # schema.ROLLOUT_ARRAYS, read by the diagnostics
    "rollout_shards": "rollout_dumps",  # verl: per-rank shards, rollout_dumps/step{N}/rank{R}.npz
    "wandb_run_id": "wandb_run_id",
    "wandb_dir": "wandb",
    "verl_logs": "verl_logs",  # verl: one file-logger output and one command per launch
    "verl_log": "verl_logs/attempt{attempt}.jsonl",
    "verl_cmd": "verl_logs/attempt{attempt}.cmd",
    "agent_loop": "verl/agent_loop.yaml",  # verl: the run's agent-loop config
    "save_request": "verl/save_request",  # verl: the launcher asks verl's driver to save (ctpo.train.verl_preempt)
    "run_identity": "run_identity",  # ctpo.workdir
    "superseded": "superseded",  # ctpo.workdir: state of an earlier config
    "writer_lock": "writer.lock",  # ctpo.runlock: the one trainer writing this run (host, pid, SLURM job)
}
# relative to the repository root
DATA_FILES = {
    "toy_dir": "data/toy",
    "toy_train": "data/toy/train.parquet",
    "toy_bench": "data/toy/{bench}.parquet",
    "deepscaler_train": "data/deepscaler/train.parquet",
    "benchmark_file": "data/benchmarks/{bench}.parquet",
}


def _build() -> dict[str, str]:
    t = {"results": RESULTS, "runs": RUNS, "logs": "logs/{exp}", "figures": "figures/{exp}",
         "figure": "figures/{exp}/{name}.{ext}"}  # name in FIGURE_NAMES, ext in FIGURE_FORMATS
    t.update({k: f"{RESULTS}/{v}" for k, v in RESULTS_FILES.items()})
    t.update({k: f"{t['train_dir']}/{v}" for k, v in TRAIN_FILES.items()})
    t.update({k: f"{RUNS}/{v}" for k, v in RUNS_FILES.items()})
    t.update({k: f"{t['workdir']}/{v}" for k, v in WORKDIR_FILES.items()})
    t.update(DATA_FILES)
    n_names = 5 + sum(map(len, (RESULTS_FILES, TRAIN_FILES, RUNS_FILES, WORKDIR_FILES, DATA_FILES)))
    assert len(t) == n_names, "ctpo.layout: two tables use the same name"
    return t


TEMPLATES = _build()


def report_files(exp: str) -> tuple[list[str], list[str]]:
    """(tables, figures): every table and figure file of experiment `exp`."""
    t = templates(exp)
    return ([t["table"].format(name=n, ext=e) for n in TABLE_NAMES for e in TABLE_FORMATS],
            [t["figure"].format(name=n, ext=e) for n in FIGURE_NAMES for e in FIGURE_FORMATS])


def templates(exp: str) -> dict[str, str]:
    """Every template with {exp} filled in and the other wildcards left for Snakemake (`P` in the rules)."""
    return {k: v.replace("{exp}", exp) for k, v in TEMPLATES.items()}


def path(name: str, **wildcards) -> Path:
    """One path relative to the repository root, e.g. `path("eval", exp=..., run=..., seed=0, step=10, bench=...)`."""
    return Path(_format(TEMPLATES, name, wildcards))


def _format(table: dict[str, str], name: str, wildcards: dict) -> str:
    try:
        return table[name].format(**wildcards)
    except KeyError as e:
        if name not in table:
            raise KeyError(f"ctpo.layout: no path named '{name}' (have: {sorted(table)})") from None
        raise KeyError(f"ctpo.layout: path '{name}' ({table[name]}) needs wildcard {e}") from None


class Dir:
    """A directory of the layout given by its path on disk: `Dir(root, TABLE).path(name, **wildcards) -> Path`."""

    def __init__(self, root: str | Path, table: dict[str, str]) -> None:
        self.root, self._table = Path(root), table

    def path(self, name: str, **wildcards) -> Path:
        return self.root / _format(self._table, name, wildcards)

    def steps(self, name: str, **wildcards) -> list[int]:
        """The steps N for which path `name` exists (its other wildcards given), ascending."""
        template = _format(self._table, name, {**wildcards, "step": "{step}"})
        rx = re.compile(re.escape(template).replace(re.escape("{step}"), r"(\d+)"))
        paths = self.root.glob(template.replace("{step}", "*"))
        found = (rx.fullmatch(p.relative_to(self.root).as_posix()) for p in paths)
        return sorted({int(m.group(1)) for m in found if m})


def results(root: str | Path) -> Dir:
    """results/{exp}/ given its path (reports, the synthetic generator): `results(r).path("eval", run=...)`."""
    return Dir(root, {**RESULTS_FILES, **{k: f"{RESULTS_FILES['train_dir']}/{v}" for k, v in TRAIN_FILES.items()}})


def train_dir(root: str | Path) -> Dir:
    """A run's results/{exp}/train/{run}/seed{seed}/ given its path (the trainers' --results)."""
    return Dir(root, TRAIN_FILES)


def workdir(root: str | Path) -> Dir:
    """A run's runs/{exp}/{run}/seed{seed}/ given its path (the trainers' --workdir)."""
    return Dir(root, WORKDIR_FILES)


# the wildcard part of a rule's log and `benchmark:` file names (rule_log / rule_benchmark)
JOB_KEYS = {
    "seed": "seed{seed}",
    "run": "{run}/seed{seed}",
    "step": "{run}/seed{seed}/step{step}",
    "bench": "{run}/seed{seed}/step{step}/{bench}",
    "model": "{model}",
    "partition": "{partition}",
}


def _job(rule: str, key: str | None) -> str:
    return f"{rule}/{JOB_KEYS[key]}" if key else rule


def rule_log(exp: str, rule: str, key: str | None = None) -> str:
    """logs/{exp}/<rule>[/<job key>].log, wildcards left for Snakemake (key: a JOB_KEYS name)."""
    return f"{templates(exp)['logs']}/{_job(rule, key)}.log"


def rule_benchmark(exp: str, rule: str, key: str | None = None) -> str:
    """results/{exp}/benchmarks/<rule>[/<job key>].tsv: Snakemake's per-job time and memory."""
    return f"{templates(exp)['rule_benchmarks']}/{_job(rule, key)}.tsv"


def benchmark_file(data_kind: str, bench: str) -> Path:
    """The parquet of one benchmark: data/toy/{bench}.parquet for toy data, else data/benchmarks/{bench}.parquet."""
    return path("toy_bench" if data_kind == "toy" else "benchmark_file", bench=bench)


def dumped_steps(root: str | Path) -> list[int]:
    """Steps with a rollout dump (`rollouts/step{N}.npz`) in the run workdir `root`, ascending."""
    return workdir(root).steps("rollout")


# ----------------------------------------------------------------------------- saved steps


def is_saved_step(step: int, total_steps: int, save_freq: int) -> bool:
    """The one checkpoint rule of both backends, verl's (`fit`): `save_freq > 0 and (is_last_step or
    global_steps % save_freq == 0)`."""
    return save_freq > 0 and (step == total_steps or step % save_freq == 0)


def saved_steps(total_steps: int, save_freq: int) -> list[int]:
    """Steps a run checkpoints (and Figure 2 evaluates): save_freq, 2 save_freq, ... <= total_steps, and
    total_steps. (The local backend also saves step 0, the init policy; it is never evaluated.)"""
    return [s for s in range(1, total_steps + 1) if is_saved_step(s, total_steps, save_freq)]


# ----------------------------------------------------------------------------- done.json


@dataclass
class TrainDone:
    """`results/{exp}/train/{run}/seed{seed}/done.json`, one shape for both backends, written last.

    A null field is one the backend does not know (the local trainer counts no launches)."""

    experiment: str
    run: str
    seed: int
    backend: str  # "local" | "verl"
    final_step: int
    total_steps: int
    saved_steps: list[int]  # checkpoints on disk (local: includes step 0, the init policy)
    dump_steps: list[int]  # rollouts/step{N}.npz on disk
    metrics_rows: int  # rows in metrics.jsonl
    wandb_run_id: str | None
    config_hash: str | None
    checkpoints: str  # the checkpoints directory
    wandb_mode: str | None = None
    attempts: int | None = None  # verl: launches, resumes included
    final: dict = field(default_factory=dict)  # the last metrics.jsonl row
    degenerate: str | None = None  # ctpo.run_health.degenerate_reward: e.g. "reward 0 at every step (30 steps)"


# keys of older done.json files, read as today's (results trees written before the shapes were unified)
_OLD_KEYS = {"rollout_dumps": "dump_steps"}


def write_done(file: str | Path, done: TrainDone) -> dict:
    """Write `done` atomically; returns the record written."""
    record = asdict(done)
    write_json(file, record)
    return record


def read_done(file: str | Path) -> TrainDone:
    """A done.json of either backend, old shapes included (missing fields read as null / empty)."""
    raw = read_json(file)
    if not isinstance(raw, dict) or "final_step" not in raw:
        raise ValueError(f"{file}: expected a done marker with 'final_step', got {type(raw).__name__}")
    raw = {_OLD_KEYS.get(k, k): v for k, v in raw.items()}
    names = {f.name for f in fields(TrainDone)}
    known = {k: v for k, v in raw.items() if k in names}
    defaults = {"experiment": None, "run": None, "seed": None, "backend": None, "total_steps": None,
                "saved_steps": [], "dump_steps": [], "metrics_rows": None, "wandb_run_id": None,
                "config_hash": None, "checkpoints": None, "degenerate": None}
    return TrainDone(**{**defaults, **known})
