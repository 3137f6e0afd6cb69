# Data and configs. Data files live under data/ (never outputs); each data rule's output is a
# checksum manifest in results/, so a copied results tree (without data/) never re-prepares data or
# retrains.


rule experiment_config:
    output:
        P["experiment"],
    params:
        cfg=canonical_json(config),
    log:
        LOG("experiment_config"),
    benchmark:
        BENCH("experiment_config")
    conda:
        ENV_CPU
    shell:
        "python -m ctpo.configure --json {params.cfg:q} --out {output:q} > {log:q} 2>&1"


rule run_config:
    output:
        P["run_config"],
    params:
        cfg=lambda wc: canonical_json(run_cfg(wc)),
    log:
        LOG("run_config", "run"),
    benchmark:
        BENCH("run_config", "run")
    conda:
        ENV_CPU
    shell:
        "python -m ctpo.configure --json {params.cfg:q} --out {output:q} > {log:q} 2>&1"


rule bands_config:
    output:
        P["bands_config"],
    params:
        cfg=canonical_json(FIGURE1_BANDS),
    log:
        LOG("bands_config"),
    benchmark:
        BENCH("bands_config")
    conda:
        ENV_CPU
    shell:
        "python -m ctpo.configure --json {params.cfg:q} --out {output:q} > {log:q} 2>&1"


rule sft_config:
    output:
        P["sft_config"],
    params:
        cfg=lambda wc: canonical_json(warmstart_config(config, int(wc.seed), CONFIG_DIR)),
    log:
        LOG("sft_config", "seed"),
    benchmark:
        BENCH("sft_config", "seed")
    conda:
        ENV_CPU
    shell:
        "python -m ctpo.configure --json {params.cfg:q} --out {output:q} > {log:q} 2>&1"


rule prepare_toy_data:
    output:
        P["data_toy"],
    params:
        toy=config["data"].get("toy"),
        out_dir=P["toy_dir"],
        files=[P["toy_train"]] + [benchmark_file(b) for b in config["data"]["benchmarks"]],
    log:
        LOG("prepare_toy_data"),
    benchmark:
        BENCH("prepare_toy_data")
    conda:
        ENV_CPU
    resources:
        **get_resources("cpu"),
    shell:
        "python -m ctpo.data toy --out-dir {params.out_dir:q} --n-train {params.toy[n_train]:q} --n-test {params.toy[n_test]:q} "
        "--seed {params.toy[seed]:q} > {log:q} 2>&1 && "
        "python -m ctpo.configure --checksums {params.files:q} --out {output:q} >> {log:q} 2>&1"


rule prepare_deepscaler:
    output:
        P["data_deepscaler"],
    params:
        ds=config["data"].get("deepscaler"),
        out=P["deepscaler_train"],
        pins=lambda wc: deepscaler_pins(),
    log:
        LOG("prepare_deepscaler"),
    benchmark:
        BENCH("prepare_deepscaler")
    conda:
        ENV_CPU
    resources:
        **get_resources("cpu"),
    shell:
        "python -m ctpo.data deepscaler --source {params.ds[source]:q} --out {params.out:q} {params.pins:q} > {log:q} 2>&1 && "
        "python -m ctpo.configure --checksums {params.out:q} --out {output:q} >> {log:q} 2>&1"


rule data_config:
    output:
        P["data_config"],
    params:
        cfg=canonical_json({k: config[k] for k in ("experiment", "label", "data")}),
    log:
        LOG("data_config"),
    benchmark:
        BENCH("data_config")
    conda:
        ENV_CPU
    shell:
        "python -m ctpo.configure --json {params.cfg:q} --out {output:q} > {log:q} 2>&1"


rule prepare_benchmarks:
    input:
        P["data_config"],
    output:
        P["data_benchmarks"],
    log:
        LOG("prepare_benchmarks"),
    benchmark:
        BENCH("prepare_benchmarks")
    conda:
        ENV_CPU
    resources:
        **get_resources("cpu"),
    shell:
        "python -m ctpo.data benchmarks --experiment {input:q} --out {output:q} > {log:q} 2>&1"


rule prepare_model:
    """Hub model weights + tokenizer into the HF cache, on the login node (compute nodes run offline)."""
    output:
        P["data_model"],
    params:
        path=lambda wc: HUB_MODELS[wc.model]["path"],
        revision=lambda wc: ["--revision", HUB_MODELS[wc.model]["revision"]] if HUB_MODELS[wc.model]["revision"] else [],
    log:
        LOG("prepare_model", "model"),
    benchmark:
        BENCH("prepare_model", "model")
    conda:
        ENV_CPU
    shell:
        "python -m ctpo.hub fetch --model {params.path:q} {params.revision:q} --out {output:q} > {log:q} 2>&1"


rule prepare:
    """Everything fetched from a hub, once, where the network is: `snakemake --profile slurm prepare`."""
    input:
        get_data_marker(),
        get_benchmark_marker(),
        [P["data_model"].format(model=m) for m in HUB_MODELS],
