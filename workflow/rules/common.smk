# Shared parse-time state: config validation, the resolved run configs, path templates,
# wildcard constraints and the get_<x>(wildcards) input functions. Plans come from ctpo.configure.
import re
from pathlib import Path

from snakemake.utils import validate

from ctpo.config import canonical_json
from ctpo.tracking import resolve_mode
from ctpo.configure import check_experiment, eval_targets, resolve_runs, warmstart_config


validate(config, schema="../schemas/config.schema.yaml", set_default=False)

EXP = config["experiment"]
SEEDS = [int(s) for s in config["seeds"]]
RUNS = list(config["runs"])
CONFIG_DIR = Path(workflow.basedir) / "configs"  # this checkout's models/ and methods/
RESOLVED = resolve_runs(config, CONFIG_DIR)  # {(run, seed): RunConfig dict}; a bad key fails here, naming it
check_experiment(config, RESOLVED, CONFIG_DIR)
EVALS = eval_targets(config, RESOLVED)  # [(run, seed, step, bench)]
WANDB_ONLINE = resolve_mode(config["wandb"]["mode"]) == "online"  # from the environment only, no network
# hub models (kind: hf) by model name: fetched by `prepare_model` on the login node, offline elsewhere
HUB_MODELS = {
    c["model"]["name"].lower().replace("-", "_"): c["model"]
    for c in RESOLVED.values()
    if c["model"]["kind"] == "hf"
}
LOCAL_RUNS = [r for r in RUNS if RESOLVED[(r, SEEDS[0])]["train"]["backend"] == "local"]
ENV_CPU = "../../envs/cpu.yaml"
ENV_GPU = "../../envs/gpu.yaml"
# GPU stages get the GPU env only when some run of this experiment trains with verl.
ENV_ACCEL = ENV_GPU if len(LOCAL_RUNS) < len(RUNS) else ENV_CPU

# Paths (ctpo.schema documents the layout). Checkpoints and rollout dumps live under runs/ and are
# never outputs: Snakemake deletes a rule's outputs before rerunning it, and training must resume.
R = f"results/{EXP}"
L = f"logs/{EXP}"
B = f"results/{EXP}/benchmarks"
W = f"runs/{EXP}"
P = {
    "experiment": f"{R}/experiment.json",
    "run_config": f"{R}/configs/{{run}}/seed{{seed}}.json",
    "sft_config": f"{R}/configs/sft/seed{{seed}}.json",
    "data_config": f"{R}/configs/data.json",
    "data_toy": f"{R}/data/toy.json",
    "data_deepscaler": f"{R}/data/deepscaler.json",
    "data_benchmarks": f"{R}/data/benchmarks.json",
    "sft_done": f"{R}/sft/seed{{seed}}/done.json",
    "train_done": f"{R}/train/{{run}}/seed{{seed}}/done.json",
    "merged": f"{R}/merged/{{run}}/seed{{seed}}/step{{step}}.json",
    "eval": f"{R}/eval/{{run}}/seed{{seed}}/step{{step}}/{{bench}}.parquet",
    "eval_json": f"{R}/eval/{{run}}/seed{{seed}}/step{{step}}/{{bench}}.json",
    "diag": f"{R}/diagnostics/{{run}}/seed{{seed}}/step{{step}}.parquet",
    "diag_json": f"{R}/diagnostics/{{run}}/seed{{seed}}/step{{step}}.json",
    "table1": f"{R}/table1.json",
    "tables": f"{R}/tables",
    "figures": f"figures/{EXP}",
    "workdir": f"{W}/{{run}}/seed{{seed}}",
    "sft_workdir": f"{W}/sft/seed{{seed}}",
}


wildcard_constraints:
    run="|".join(re.escape(r) for r in RUNS),
    seed=r"\d+",
    step=r"\d+",
    bench="|".join(re.escape(b) for b in config["data"]["benchmarks"]),
    model="|".join(re.escape(m) for m in HUB_MODELS) or "(?!x)x",


def get_resources(group):
    """Job resources of a rule group (train, merge, eval, cpu) from the experiment's `resources:`."""
    return config["resources"].get(group, {})


def run_cfg(wildcards):
    return RESOLVED[(wildcards.run, int(wildcards.seed))]


def is_local(wildcards):
    return run_cfg(wildcards)["train"]["backend"] == "local"


def needs_warmstart(wildcards):
    """The toy model starts from the SFT warm start on either backend (verl: `--init` = its model path)."""
    return run_cfg(wildcards)["model"]["kind"] == "toy"


def get_data_marker(wildcards=None):
    """The done marker of the training data (a checksum manifest in results/, copied with results)."""
    return P["data_toy"] if config["data"]["kind"] == "toy" else P["data_deepscaler"]


def deepscaler_pins():
    """--split, --revision and --expected-rows flags from data.deepscaler (each only when set)."""
    ds, flags = config["data"]["deepscaler"], []
    for key, flag in (("split", "--split"), ("revision", "--revision"), ("expected_rows", "--expected-rows")):
        if ds.get(key) is not None:
            flags.append(f"{flag} {ds[key]}")
    return " ".join(flags)


def get_benchmark_marker(wildcards=None):
    return P["data_toy"] if config["data"]["kind"] == "toy" else P["data_benchmarks"]


def benchmark_file(bench):
    return f"data/toy/{bench}.parquet" if config["data"]["kind"] == "toy" else f"data/benchmarks/{bench}.parquet"


def get_train_inputs(wildcards):
    """Run config, data marker and (local backend) the warm start's config and done marker."""
    inputs = {
        "config": P["run_config"].format(**wildcards),
        "data": get_data_marker(),
    }
    if needs_warmstart(wildcards):
        inputs["sft"] = P["sft_done"].format(seed=wildcards.seed)
    model = run_cfg(wildcards)["model"]
    if model["kind"] == "hf":
        inputs["model"] = f"{R}/data/model_{model['name'].lower().replace('-', '_')}.json"
    return inputs


def get_init_arg(wildcards):
    return f"--init {P['sft_workdir'].format(seed=wildcards.seed)}/policy" if needs_warmstart(wildcards) else ""


def get_checkpoint_dir(wildcards):
    """Local: the trainer's policy dir; verl: the HF dir written by the merge rule."""
    wdir = P["workdir"].format(run=wildcards.run, seed=wildcards.seed)
    if is_local(wildcards):
        return f"{wdir}/checkpoints/step{wildcards.step}/policy"
    return f"{wdir}/hf/step{wildcards.step}"


def get_eval_inputs(wildcards):
    inputs = {
        "config": P["run_config"].format(run=wildcards.run, seed=wildcards.seed),
        "train": P["train_done"].format(run=wildcards.run, seed=wildcards.seed),
        "benchmarks": get_benchmark_marker(),
    }
    if not is_local(wildcards):
        inputs["merged"] = P["merged"].format(**wildcards)
    return inputs


def get_diag_inputs(wildcards):
    return {
        "config": P["run_config"].format(run=wildcards.run, seed=wildcards.seed),
        "train": P["train_done"].format(run=wildcards.run, seed=wildcards.seed),
    }


def train_done_files(runs):
    return [P["train_done"].format(run=r, seed=s) for r in runs for s in SEEDS]


def eval_files(keep=lambda run, step, bench: True):
    """Eval parquet + sidecar of every planned evaluation that `keep(run, step, bench)` selects."""
    out = []
    for run, seed, step, bench in EVALS:
        if keep(run, step, bench):
            fmt = dict(run=run, seed=seed, step=step, bench=bench)
            out += [P["eval"].format(**fmt), P["eval_json"].format(**fmt)]
    return out


def table_evals(runs):
    ev = config["evaluation"]
    return eval_files(
        lambda run, step, bench: run in runs
        and bench in ev["table2_benchmarks"]
        and step == RESOLVED[(run, SEEDS[0])]["train"]["total_steps"]
    )


def figure2_evals():
    ev = config["evaluation"]
    return eval_files(lambda run, step, bench: run in ev["figure2_runs"] and bench == ev["figure2_benchmark"])


def diag_files():
    d = config["diagnostics"]
    return [P["diag"].format(run=d["run"], seed=s, step=t) for s in SEEDS for t in d["steps"]]


def get_tables_inputs(wildcards):
    ev = config["evaluation"]
    runs = sorted(set(ev["table2_runs"]) | set(ev["table3_runs"]))
    return {
        "experiment": P["experiment"],
        "table1": P["table1"],
        "train": train_done_files(runs),
        "evals": table_evals(runs),
    }


def get_figures_inputs(wildcards):
    d = config["diagnostics"]
    return {
        "experiment": P["experiment"],
        "train": train_done_files(sorted(set(config["evaluation"]["figure2_runs"]) | {d["run"]})),
        "evals": figure2_evals(),
        "diagnostics": diag_files(),
    }


def get_final_outputs():
    names = ("table1", "table2", "table3")
    tables = [f"{P['tables']}/{n}.{ext}" for n in names for ext in ("md", "tex")]
    figures = [f"{P['figures']}/{n}.{ext}" for n in ("figure1", "figure2") for ext in ("pdf", "png")]
    wandb = [f"{R}/wandb.json"] if WANDB_ONLINE else []  # `python -m ctpo.reports wandb` when online
    return tables + figures + train_done_files(RUNS) + wandb
