# Shared parse-time state: config validation, the resolved run configs, path templates,
# wildcard constraints and the get_<x>(wildcards) input functions. Plans come from ctpo.configure.
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from ctpo import layout
from ctpo.config import canonical_json
from ctpo.runlock import describe as describe_holder, live_holder
from ctpo.tracking import resolve_mode
from ctpo.configure import (
    check_experiment,
    check_schema,
    eval_backend,
    eval_targets,
    keep_steps,
    on_gpu,
    resolve_runs,
    warmstart_config,
)
from ctpo.diagnostics.bands import experiment_bands
from ctpo.slurm import check_request, query_sinfo


# Config values are data: names and revisions match the schema's patterns (one-line error naming the key),
# and every value a rule puts in a shell command is quoted (`{x:q}`; flags are lists, quoted item by item).
check_schema(config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")
validate(config, schema="../schemas/config.schema.yaml", set_default=False)

EXP = config["experiment"]
SEEDS = [int(s) for s in config["seeds"]]
RUNS = list(config["runs"])
CONFIG_DIR = Path(workflow.basedir) / "configs"  # this checkout's models/ and methods/
RESOLVED = resolve_runs(config, CONFIG_DIR)  # {(run, seed): RunConfig dict}; a bad key fails here, naming it
check_experiment(config, RESOLVED, CONFIG_DIR)
EVALS = eval_targets(config, RESOLVED)  # [(run, seed, step, bench)]
FIGURE1_BANDS = experiment_bands(config, RESOLVED)  # diagnostics.bands, else the ablation pair's losses
WANDB_ONLINE = resolve_mode(config["wandb"]["mode"]) == "online"  # from the environment only, no network
# hub models (kind: hf) by model name: fetched by `prepare_model` on the login node, offline elsewhere
def hub_key(name):
    return name.lower().replace("-", "_")


HUB_MODELS = {
    hub_key(c["model"]["name"]): c["model"]
    for c in RESOLVED.values()
    if c["model"]["kind"] == "hf"
}
LOCAL_RUNS = [r for r in RUNS if RESOLVED[(r, SEEDS[0])]["train"]["backend"] == "local"]
ENV_CPU = "../../envs/cpu.yaml"
ENV_GPU = "../../envs/gpu.yaml"
# The GPU rule family (train, eval, preflight) gets the GPU env when some run of this experiment trains with verl;
# every other rule (merges included: verl's merger runs on CPU torch) the CPU env. Used with the `slurm` profile's
# software-deployment-method: conda; a plain `snakemake` ignores `conda:`.
ENV_ACCEL = ENV_GPU if len(LOCAL_RUNS) < len(RUNS) else ENV_CPU

# Paths: every template comes from ctpo.layout (the one layout; tests/test_layout.py checks the DAG against
# it). Checkpoints and rollout dumps live under runs/ and are never outputs: Snakemake deletes a rule's
# outputs before rerunning it, and training must resume.
P = layout.templates(EXP)


def LOG(rule, key=None):
    return layout.rule_log(EXP, rule, key)


def BENCH(rule, key=None):
    return layout.rule_benchmark(EXP, rule, key)


wildcard_constraints:
    run="|".join(re.escape(r) for r in RUNS),
    seed=r"\d+",
    step=r"\d+",
    bench="|".join(re.escape(b) for b in config["data"]["benchmarks"]),
    model="|".join(re.escape(m) for m in HUB_MODELS) or "(?!x)x",
    partition=r"[A-Za-z0-9_.+-]+",


def get_resources(group):
    """Job resources of a rule group (train, merge, eval, cpu) from the experiment's `resources:`."""
    return config["resources"].get(group, {})


def _resource_values(resources):
    """{name: value} of Snakemake Resource objects (default-/set-resources; a profile's strings are expressions
    evaluated here as for a job), the ones that need a job (input sizes, attempt) left out."""
    out = {}
    for name, res in (resources or {}).items():
        try:
            if hasattr(res, "is_evaluable") and res.is_evaluable():
                res = res.evaluate(wildcards={}, input=[], attempt=1, threads=1, rulename="", async_run=None)
            value = res.value if hasattr(res, "value") else res
        except Exception:
            continue
        if not callable(value):
            out[name] = value
    return out


def check_cluster_requests():
    """When jobs go to SLURM partitions (the `slurm` profile), every submitted rule's request (Snakemake's own merge
    of default-resources, the rule's resources and set-resources) is checked against `sinfo` before anything is
    submitted; one that cannot run there stops the workflow with one line. Called once every rule is defined, on
    the submitting side only (a job step already runs where it was placed)."""
    if workflow.remote_exec:
        return
    local = getattr(workflow, "_localrules", set())
    partitions = None
    for rule in workflow.rules:
        if rule.norun or rule.name in local:
            continue
        res = _resource_values(rule.resources)
        if not res.get("slurm_partition"):
            continue
        partitions = partitions or query_sinfo()
        if partitions is None:
            return  # no sinfo here (not a SLURM login node): nothing to check against
        problem = check_request(f"rule {rule.name}", res, partitions)
        if problem:
            raise WorkflowError(f"this job request cannot run on the cluster: {problem}")


def run_cfg(wildcards):
    return RESOLVED[(wildcards.run, int(wildcards.seed))]


def n_nodes(wildcards):
    return int(run_cfg(wildcards)["train"]["n_nodes"])


def train_resources():
    """The experiment's `resources.train` for each run, with `nodes` = `train.n_nodes`. `gpu` is the GPUs per node;
    the GPU type is the slurm profile's (set-resources). One node is submitted as the SLURM plugin builds it
    (`--nodes=1 --gpus=<type>:<gpu>`); more than one, the `ctpo-slurm` executor asks for `--nodes=N
    --gres=gpu:<type>:<gpu> --ntasks-per-node=1` (GPUs per node, one task per node for the Ray workers' `srun`
    step, ctpo.train.ray_cluster) instead of the plugin's `--gpus`, which is a job total."""
    res = dict(get_resources("train"))
    res["nodes"] = n_nodes
    return res


def is_local(wildcards):
    return run_cfg(wildcards)["train"]["backend"] == "local"


def needs_warmstart(wildcards):
    """The toy model starts from the SFT warm start on either backend (verl: `--init` = its model path)."""
    return run_cfg(wildcards)["model"]["kind"] == "toy"


def get_data_marker(wildcards=None):
    """The done marker of the training data (a checksum manifest in results/, copied with results)."""
    return P["data_toy"] if config["data"]["kind"] == "toy" else P["data_deepscaler"]


def deepscaler_pins():
    """[--split, S, --revision, R, --expected-rows, N] from data.deepscaler (each only when set); a list,
    so `{params.pins:q}` quotes each item."""
    ds, flags = config["data"]["deepscaler"], []
    for key, flag in (("split", "--split"), ("revision", "--revision"), ("expected_rows", "--expected-rows")):
        if ds.get(key) is not None:
            flags += [flag, str(ds[key])]
    return flags


def get_benchmark_marker(wildcards=None):
    return P["data_toy"] if config["data"]["kind"] == "toy" else P["data_benchmarks"]


def benchmark_file(bench):
    return str(layout.benchmark_file(config["data"]["kind"], bench))


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
        inputs["model"] = P["data_model"].format(model=hub_key(model["name"]))
    inputs["preflight"] = get_preflight_marker("train")(wildcards)  # GPU runs: the GPU node checks (preflight.smk)
    return inputs


def get_init_arg(wildcards):
    """[--init, POLICY_DIR] for a toy-model run, else [] (a list: `{params.init:q}` quotes each item)."""
    return ["--init", P["sft_policy"].format(seed=wildcards.seed)] if needs_warmstart(wildcards) else []


def get_keep_arg(wildcards):
    """verl: [--keep-steps, STEP, ...] = the steps evaluation reads (the trainer deletes other checkpoints as it
    goes), else [] (a list: `{params.keep:q}` quotes each item)."""
    if is_local(wildcards):
        return []
    return ["--keep-steps", *(str(s) for s in keep_steps(EVALS, wildcards.run, int(wildcards.seed)))]


def get_checkpoint_dir(wildcards):
    """Local: the trainer's policy dir; verl: the HF dir written by the merge rule."""
    return P["policy" if is_local(wildcards) else "hf"].format(run=wildcards.run, seed=wildcards.seed, step=wildcards.step)


def get_eval_inputs(wildcards):
    inputs = {
        "config": P["run_config"].format(run=wildcards.run, seed=wildcards.seed),
        "train": P["train_done"].format(run=wildcards.run, seed=wildcards.seed),
        "benchmarks": get_benchmark_marker(),
    }
    if not is_local(wildcards):
        inputs["merged"] = P["merged"].format(**wildcards)
    inputs["preflight"] = get_preflight_marker("eval")(wildcards)
    return inputs


def get_diag_inputs(wildcards):
    """Run config, training marker and Figure 1's bands (rule bands_config: a changed band reruns the diagnostics
    and so Figure 1)."""
    return {
        "config": P["run_config"].format(run=wildcards.run, seed=wildcards.seed),
        "train": P["train_done"].format(run=wildcards.run, seed=wildcards.seed),
        "bands": P["bands_config"],
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


def still_training():
    """run -> holder, for the runs whose training holds its writer lock in a live job (ctpo.runlock): after a
    controller restart, a training still running in SLURM is not submitted again (the SLURM executor plugin
    tracks jobs by its per-invocation run id only, so a new controller cannot see the old one's jobs)."""
    out = {}
    for (run, seed), cfg in sorted(RESOLVED.items()):
        wd = P["workdir"].format(run=run, seed=seed)
        holder = live_holder(wd) if not Path(P["train_done"].format(run=run, seed=seed)).exists() else None
        if holder:
            out[run] = holder
            print(f"ctpo: {run} seed {seed} is still training as {describe_holder(holder)} ({wd}/writer.lock); "
                  f"not submitted again, nor what needs it: rerun snakemake after that job ends", file=sys.stderr)
    return out


def get_final_outputs():
    tables, figures = layout.report_files(EXP)
    wandb = [P["wandb"]] if WANDB_ONLINE else []  # `python -m ctpo.reports wandb` when online
    busy = still_training()
    if busy:  # everything that does not need a running training: other trainings, their evaluations, diagnostics
        free = [r for r in RUNS if r not in busy]
        diag = diag_files() if config["diagnostics"]["run"] in free else []
        return train_done_files(free) + eval_files(lambda run, step, bench: run in free) + diag
    return tables + figures + train_done_files(RUNS) + wandb
