# Table 1 (Monte-Carlo study), Tables 1-3 and Figures 1-2. Outputs carry report() so
# `snakemake --report report.html` embeds every table and figure.
TABLE_NAMES = ("table1", "table2", "table3")
FIGURE_NAMES = ("figure1", "figure2")


rule table1:
    input:
        P["experiment"],
    output:
        P["table1"],
    log:
        f"{L}/table1.log",
    benchmark:
        f"{B}/table1.tsv"
    conda:
        ENV_CPU
    resources:
        **get_resources("cpu"),
    shell:
        "python -m ctpo.reports table1 --out {output} > {log} 2>&1"


rule tables:
    input:
        unpack(get_tables_inputs),
    output:
        [
            report(f"{P['tables']}/{n}.{ext}", caption=f"../report/{n}.rst", category="Tables", subcategory=ext)
            for n in TABLE_NAMES
            for ext in ("md", "tex")
        ],
    params:
        out=lambda wc, output: os.path.dirname(output[0]),
        results=lambda wc, input: os.path.dirname(input.experiment),
    log:
        f"{L}/tables.log",
    benchmark:
        f"{B}/tables.tsv"
    conda:
        ENV_CPU
    resources:
        **get_resources("cpu"),
    shell:
        "python -m ctpo.reports tables --experiment {input.experiment} --results {params.results} --out {params.out} > {log} 2>&1"


rule figures:
    input:
        unpack(get_figures_inputs),
    output:
        [
            report(f"{P['figures']}/{n}.{ext}", caption=f"../report/{n}.rst", category="Figures", subcategory=ext)
            for n in FIGURE_NAMES
            for ext in ("pdf", "png")
        ],
    params:
        out=lambda wc, output: os.path.dirname(output[0]),
        results=lambda wc, input: os.path.dirname(input.experiment),
    log:
        f"{L}/figures.log",
    benchmark:
        f"{B}/figures.tsv"
    conda:
        ENV_CPU
    resources:
        **get_resources("cpu"),
    shell:
        "python -m ctpo.reports figures --experiment {input.experiment} --results {params.results} --out {params.out} > {log} 2>&1"


rule wandb_reports:
    """Eval curves (one W&B run per run x seed over train_step), tables and figures; in `all` only when
    the experiment's W&B mode resolves online (a key is configured). A localrule: it needs the network."""
    input:
        unpack(get_tables_inputs),
        tables=rules.tables.output,
        figures=rules.figures.output,
    output:
        f"{R}/wandb.json",
    params:
        results=R,
        tables=P["tables"],
        figures=P["figures"],
    log:
        f"{L}/wandb_reports.log",
    benchmark:
        f"{B}/wandb_reports.tsv"
    conda:
        ENV_CPU
    shell:
        "python -m ctpo.reports wandb --experiment {input.experiment} --results {params.results} "
        "--tables {params.tables} --figures {params.figures} --out {output} > {log} 2>&1"
