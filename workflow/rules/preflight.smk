# GPU preflight: one short job on the slurm profile's GPU partition (its `set-resources` for preflight, as for
# train and eval), before any training (ctpo.preflight): the GPU stack imports, the driver fits torch's CUDA build,
# the sandbox isolates, the pinned models are complete, runs/ has room. Every GPU run's training (and evaluation)
# depends on it, so a node that cannot run them stops the DAG once, in one line (exit 78), before the trainings
# queue. Its files keep the layout's `{partition}` name `gpu`.

PREFLIGHT = {"partition": "gpu"}
GPU_RUNS = sorted({r for (r, s), c in RESOLVED.items() if on_gpu(c)})


def get_preflight_marker(group):
    """[the preflight marker] for a GPU run, else [] (`group`: train or eval, the rule that asks)."""

    def inner(wildcards):
        return [P["preflight"].format(**PREFLIGHT)] if on_gpu(run_cfg(wildcards)) else []

    return inner


def preflight_plan():
    """--plan of `python -m ctpo.preflight`: each GPU run's config and the steps its evaluation reads."""
    return {
        "runs": [
            {"config": P["run_config"].format(run=r, seed=s), "keep": keep_steps(EVALS, r, s)}
            for r in GPU_RUNS
            for s in SEEDS
        ]
    }


def get_preflight_inputs(wildcards):
    runs = [(r, s) for r in GPU_RUNS for s in SEEDS]
    models = {hub_key(RESOLVED[(r, s)]["model"]["name"]) for r, s in runs if RESOLVED[(r, s)]["model"]["kind"] == "hf"}
    return {
        "configs": [P["run_config"].format(run=r, seed=s) for r, s in runs],
        "models": [P["data_model"].format(model=m) for m in sorted(models)],
    }


def preflight_resources():
    """One GPU for 30 minutes (memory up to 64 GB; the experiment's train GPU type and CPUs per GPU when it gives
    them); the slurm profile's set-resources for preflight (partition, GPU type, CPUs and memory per GPU) win."""
    train = get_resources("train")
    res = {"nodes": 1, "gpu": 1, "runtime": 30, "mem_mb": min(int(train.get("mem_mb", 64000)), 64000)}
    res.update({k: train[k] for k in ("gpu_model", "cpus_per_gpu") if k in train})
    return res


rule preflight:
    input:
        unpack(get_preflight_inputs),
    output:
        P["preflight"].format(**PREFLIGHT),
    params:
        plan=canonical_json(preflight_plan()),
        runs_dir=P["runs"],
    log:
        LOG("preflight", "partition").format(**PREFLIGHT),
    benchmark:
        BENCH("preflight", "partition").format(**PREFLIGHT)
    conda:
        ENV_ACCEL
    resources:
        **preflight_resources(),
    shell:
        "python -m ctpo.preflight --plan {params.plan:q} --runs-dir {params.runs_dir:q} --out {output:q} > {log:q} 2>&1"
