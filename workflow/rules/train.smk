# Toy warm start, RL training per (run, seed), verl -> HF merge. Training is idempotent: its only
# output is the done marker (written last); checkpoints, rollout dumps and the W&B run id live in
# runs/ (never an output, never deleted here), so a rerun, a retry or a SLURM requeue resumes.


rule warmstart:
    input:
        config=P["sft_config"],
        data=get_data_marker(),
    output:
        P["sft_done"],
    params:
        workdir=P["sft_workdir"],
    log:
        LOG("warmstart", "seed"),
    benchmark:
        BENCH("warmstart", "seed")
    conda:
        ENV_CPU
    resources:
        **get_resources("cpu"),
    shell:
        "OMP_NUM_THREADS={threads} python -m ctpo.train.sft --config {input.config:q} --out {params.workdir:q} "
        "--done {output:q} > {log:q} 2>&1"


rule train:
    input:
        unpack(get_train_inputs),
    output:
        P["train_done"],
    params:
        results=P["train_dir"],
        workdir=P["workdir"],
        init=get_init_arg,
        keep=get_keep_arg,
    log:
        LOG("train", "run"),
    benchmark:
        BENCH("train", "run")
    conda:
        ENV_ACCEL
    resources:
        **train_resources(),
    shell:
        "OMP_NUM_THREADS={threads} python -m ctpo.train --config {input.config:q} --results {params.results:q} "
        "--workdir {params.workdir:q} {params.init:q} {params.keep:q} > {log:q} 2>&1"


rule merge:
    input:
        train=P["train_done"],
    output:
        P["merged"],
    params:
        workdir=P["workdir"],
    log:
        LOG("merge", "step"),
    benchmark:
        BENCH("merge", "step")
    conda:
        ENV_CPU
    resources:
        **get_resources("merge"),
    shell:
        "python -m ctpo.train.verl_backend merge --workdir {params.workdir:q} --step {wildcards.step:q} "
        "--done {output:q} > {log:q} 2>&1"


for _run in RUNS:

    rule:
        name:
            f"run_{_run}"
        input:
            train_done_files([_run]),
