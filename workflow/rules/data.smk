# Data and configs. Data files live under data/ (never outputs); each data rule's output is a
# checksum manifest in results/, so a copied results tree (without data/) never re-prepares data or
# retrains.


rule experiment_config:
    output:
        P["experiment"],
    params:
        cfg=canonical_json(config),
    log:
        f"{L}/experiment_config.log",
    benchmark:
        f"{B}/experiment_config.tsv"
    conda:
        ENV_CPU
    shell:
        "python -m ctpo.configure --json {params.cfg:q} --out {output} > {log} 2>&1"


rule run_config:
    output:
        P["run_config"],
    params:
        cfg=lambda wc: canonical_json(run_cfg(wc)),
    log:
        f"{L}/run_config/{{run}}/seed{{seed}}.log",
    benchmark:
        f"{B}/run_config/{{run}}/seed{{seed}}.tsv"
    conda:
        ENV_CPU
    shell:
        "python -m ctpo.configure --json {params.cfg:q} --out {output} > {log} 2>&1"


rule sft_config:
    output:
        P["sft_config"],
    params:
        cfg=lambda wc: canonical_json(warmstart_config(config, int(wc.seed), CONFIG_DIR)),
    log:
        f"{L}/sft_config/seed{{seed}}.log",
    benchmark:
        f"{B}/sft_config/seed{{seed}}.tsv"
    conda:
        ENV_CPU
    shell:
        "python -m ctpo.configure --json {params.cfg:q} --out {output} > {log} 2>&1"


rule prepare_toy_data:
    output:
        P["data_toy"],
    params:
        toy=config["data"].get("toy"),
        files=" ".join(["data/toy/train.parquet"] + [benchmark_file(b) for b in config["data"]["benchmarks"]]),
    log:
        f"{L}/prepare_toy_data.log",
    benchmark:
        f"{B}/prepare_toy_data.tsv"
    conda:
        ENV_CPU
    resources:
        **get_resources("cpu"),
    shell:
        "python -m ctpo.data toy --out-dir data/toy --n-train {params.toy[n_train]} --n-test {params.toy[n_test]} "
        "--seed {params.toy[seed]} > {log} 2>&1 && "
        "python -m ctpo.configure --checksums {params.files} --out {output} >> {log} 2>&1"


rule prepare_deepscaler:
    output:
        P["data_deepscaler"],
    params:
        ds=config["data"].get("deepscaler"),
        out="data/deepscaler/train.parquet",
        pins=lambda wc: deepscaler_pins(),
    log:
        f"{L}/prepare_deepscaler.log",
    benchmark:
        f"{B}/prepare_deepscaler.tsv"
    conda:
        ENV_CPU
    resources:
        **get_resources("cpu"),
    shell:
        "python -m ctpo.data deepscaler --source {params.ds[source]:q} --out {params.out} {params.pins} > {log} 2>&1 && "
        "python -m ctpo.configure --checksums {params.out} --out {output} >> {log} 2>&1"


rule data_config:
    output:
        P["data_config"],
    params:
        cfg=canonical_json({k: config[k] for k in ("experiment", "label", "data")}),
    log:
        f"{L}/data_config.log",
    benchmark:
        f"{B}/data_config.tsv"
    conda:
        ENV_CPU
    shell:
        "python -m ctpo.configure --json {params.cfg:q} --out {output} > {log} 2>&1"


rule prepare_benchmarks:
    input:
        P["data_config"],
    output:
        P["data_benchmarks"],
    log:
        f"{L}/prepare_benchmarks.log",
    benchmark:
        f"{B}/prepare_benchmarks.tsv"
    conda:
        ENV_CPU
    resources:
        **get_resources("cpu"),
    shell:
        "python -m ctpo.data benchmarks --experiment {input} --out {output} > {log} 2>&1"


rule prepare_model:
    """Hub model weights + tokenizer into the HF cache, on the login node (compute nodes run offline)."""
    output:
        f"{R}/data/model_{{model}}.json",
    params:
        path=lambda wc: HUB_MODELS[wc.model]["path"],
        revision=lambda wc: f"--revision {HUB_MODELS[wc.model]['revision']}" if HUB_MODELS[wc.model]["revision"] else "",
    log:
        f"{L}/prepare_model/{{model}}.log",
    benchmark:
        f"{B}/prepare_model/{{model}}.tsv"
    conda:
        ENV_CPU
    shell:
        "python -m ctpo.hub fetch --model {params.path:q} {params.revision} --out {output} > {log} 2>&1"


rule prepare:
    """Everything fetched from a hub, once, where the network is: `snakemake --profile slurm prepare`."""
    input:
        get_data_marker(),
        get_benchmark_marker(),
        [f"{R}/data/model_{m}.json" for m in HUB_MODELS],
