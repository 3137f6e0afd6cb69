# Table 1 (Monte-Carlo study), Tables 1-3 and Figures 1-2. Outputs carry report() so
# `snakemake --report report.html` embeds every table and figure.


rule table1:
    input:
        P["experiment"],
    output:
        P["table1"],
    log:
        LOG("table1"),
    benchmark:
        BENCH("table1")
    conda:
        ENV_CPU
    resources:
        **get_resources("cpu"),
    shell:
        "python -m ctpo.reports table1 --out {output:q} > {log:q} 2>&1"


rule tables:
    input:
        unpack(get_tables_inputs),
    output:
        [
            report(P["table"].format(name=n, ext=ext), caption=f"../report/{n}.rst", category="Tables", subcategory=ext)
            for n in layout.TABLE_NAMES
            for ext in layout.TABLE_FORMATS
        ],
    params:
        out=P["tables"],
        results=P["results"],
    log:
        LOG("tables"),
    benchmark:
        BENCH("tables")
    conda:
        ENV_CPU
    resources:
        **get_resources("cpu"),
    shell:
        "python -m ctpo.reports tables --experiment {input.experiment:q} --results {params.results:q} --out {params.out:q} > {log:q} 2>&1"


rule figures:
    input:
        unpack(get_figures_inputs),
    output:
        [
            report(P["figure"].format(name=n, ext=ext), caption=f"../report/{n}.rst", category="Figures", subcategory=ext)
            for n in layout.FIGURE_NAMES
            for ext in layout.FIGURE_FORMATS
        ],
    params:
        out=P["figures"],
        results=P["results"],
    log:
        LOG("figures"),
    benchmark:
        BENCH("figures")
    conda:
        ENV_CPU
    resources:
        **get_resources("cpu"),
    shell:
        "python -m ctpo.reports figures --experiment {input.experiment:q} --results {params.results:q} --out {params.out:q} > {log:q} 2>&1"


rule wandb_reports:
    """Eval curves (one W&B run per run x seed over train_step), tables and figures; in `all` only when
    the experiment's W&B mode resolves online (a key is configured). A localrule: it needs the network."""
    input:
        unpack(get_tables_inputs),
        tables=rules.tables.output,
        figures=rules.figures.output,
    output:
        P["wandb"],
    params:
        results=P["results"],
        tables=P["tables"],
        figures=P["figures"],
    log:
        LOG("wandb_reports"),
    benchmark:
        BENCH("wandb_reports")
    conda:
        ENV_CPU
    shell:
        "python -m ctpo.reports wandb --experiment {input.experiment:q} --results {params.results:q} "
        "--tables {params.tables:q} --figures {params.figures:q} --out {output:q} > {log:q} 2>&1"
