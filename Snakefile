# ctpo-repro: the CTPO paper's pipeline (arXiv 2605.07331) as a Snakemake DAG.
#
#   snakemake                       toy experiment on CPU (configs/experiments/toy.yaml, the default)
#   snakemake --profile slurm       the paper on a SLURM GPU cluster (configs/experiments/paper.yaml)
#   snakemake figures | table2 | table3_ablation | run_<run name>
#
# profiles/default (the workflow profile) is loaded automatically; README.md is the guide.
from snakemake.utils import min_version

min_version("9.0")


# The toy default only when no --configfile was given (Snakemake would otherwise merge both).
if not workflow.config_settings.configfiles:

    configfile: "configs/experiments/toy.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/preflight.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/diagnostics.smk"
include: "workflow/rules/report.smk"


localrules:
    all,
    prepare,
    prepare_model,
    prepare_deepscaler,
    prepare_benchmarks,
    wandb_reports,
    experiment_config,
    data_config,
    run_config,
    bands_config,
    sft_config,
    table2,
    table3_ablation,


check_cluster_requests()  # the slurm profile: every job's request against `sinfo`, before anything is submitted


rule all:
    input:
        get_final_outputs(),
    default_target: True
