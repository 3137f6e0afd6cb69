# avg@k evaluation of one checkpoint on one benchmark. Which (run, seed, step, benchmark) tuples run
# is planned by ctpo.configure.eval_targets from the experiment's `evaluation:` section.


rule eval:
    input:
        unpack(get_eval_inputs),
    output:
        records=P["eval"],
        summary=P["eval_json"],
    params:
        checkpoint=get_checkpoint_dir,
        benchmark=lambda wc: benchmark_file(wc.bench),
        backend=lambda wc: eval_backend(run_cfg(wc)),  # vllm for a GPU run (required), auto for the toy
    log:
        LOG("eval", "bench"),
    benchmark:
        BENCH("eval", "bench")
    conda:
        ENV_ACCEL
    resources:
        **get_resources("eval"),
    shell:
        "OMP_NUM_THREADS={threads} python -m ctpo.eval --config {input.config:q} --checkpoint {params.checkpoint:q} "
        "--benchmark {params.benchmark:q} --step {wildcards.step:q} --backend {params.backend:q} "
        "--out {output.records:q} > {log:q} 2>&1"


rule table2:
    input:
        table_evals(config["evaluation"]["table2_runs"]),


rule table3_ablation:
    input:
        table_evals(config["evaluation"]["table3_runs"]),
