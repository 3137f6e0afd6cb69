# GPU preflight: one short job per GPU partition, before any training (ctpo.preflight): the GPU stack imports,
# the driver fits torch's CUDA build, the sandbox isolates, the pinned models are complete, runs/ has room.
# Every GPU run's training (and evaluation) depends on the preflight of its partition, so a node that cannot
# run them stops the DAG once, in one line (exit 78), before the trainings queue.


def gpu_partition_key(group):
    """The partition a GPU resource group runs on: `resources.<group>.slurm_partition` of the experiment when
    stated, else `gpu` (the slurm profile's GPU partition, its `set-resources` for train, eval and preflight)."""
    return get_resources(group).get("slurm_partition") or "gpu"


GPU_RUNS = sorted({r for (r, s), c in RESOLVED.items() if on_gpu(c)})
PREFLIGHT_KEYS = sorted({gpu_partition_key(g) for g in ("train", "eval")}) if GPU_RUNS else []
PARTITIONS_STATED = any(get_resources(g).get("slurm_partition") for g in ("train", "eval"))


def get_preflight_marker(group):
    """[the preflight marker of the group's partition] for a GPU run, else []."""

    def inner(wildcards):
        if not on_gpu(run_cfg(wildcards)):
            return []
        return [P["preflight"].format(partition=gpu_partition_key(group))]

    return inner


def preflight_runs(partition):
    groups = [g for g in ("train", "eval") if gpu_partition_key(g) == partition]
    return [(r, s) for r in GPU_RUNS for s in SEEDS] if groups else []


def preflight_plan(partition):
    """--plan of `python -m ctpo.preflight`: each GPU run's config and the steps its evaluation reads."""
    return {
        "runs": [
            {"config": P["run_config"].format(run=r, seed=s), "keep": keep_steps(EVALS, r, s)}
            for r, s in preflight_runs(partition)
        ]
    }


def get_preflight_inputs(wildcards):
    runs = preflight_runs(wildcards.partition)
    models = {hub_key(RESOLVED[(r, s)]["model"]["name"]) for r, s in runs if RESOLVED[(r, s)]["model"]["kind"] == "hf"}
    return {
        "configs": [P["run_config"].format(run=r, seed=s) for r, s in runs],
        "models": [P["data_model"].format(model=m) for m in sorted(models)],
    }


def preflight_resources():
    """One GPU of the training's node type for 30 minutes (train's gpu_model, CPUs per GPU, memory up to 64 GB)."""
    train = get_resources("train")
    res = {"nodes": 1, "gpu": 1, "runtime": 30, "mem_mb": min(int(train.get("mem_mb", 64000)), 64000)}
    res.update({k: train[k] for k in ("gpu_model", "cpus_per_gpu", "slurm_account") if k in train})
    if PARTITIONS_STATED:
        res["slurm_partition"] = lambda wc: wc.partition if wc.partition != "gpu" else get_resources("train").get("slurm_partition")
    return res


rule preflight:
    input:
        unpack(get_preflight_inputs),
    output:
        P["preflight"],
    params:
        plan=lambda wc: canonical_json(preflight_plan(wc.partition)),
        runs_dir=P["runs"],
    log:
        LOG("preflight", "partition"),
    benchmark:
        BENCH("preflight", "partition")
    conda:
        ENV_ACCEL
    resources:
        **preflight_resources(),
    shell:
        "python -m ctpo.preflight --plan {params.plan:q} --runs-dir {params.runs_dir:q} --out {output:q} > {log:q} 2>&1"
