# Figure 1 diagnostics on the rollout dumps the trainer wrote (runs/.../rollouts/step{N}.npz).


rule diagnostics:
    input:
        unpack(get_diag_inputs),
    output:
        bins=P["diag"],
        summary=P["diag_json"],
    params:
        dump=P["rollout"],
        bin_width=config["diagnostics"]["bin_width"],
        min_tokens=config["diagnostics"]["min_bin_tokens"],
    log:
        LOG("diagnostics", "step"),
    benchmark:
        BENCH("diagnostics", "step")
    conda:
        ENV_CPU
    resources:
        **get_resources("cpu"),
    shell:
        "python -m ctpo.diagnostics --dump {params.dump:q} --config {input.config:q} --bands {input.bands:q} "
        "--bin-width {params.bin_width:q} --min-bin-tokens {params.min_tokens:q} --out {output.bins:q} > {log:q} 2>&1"
