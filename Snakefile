from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/fit.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        "results/model/organ_curves.tsv",
        "results/figures/sampling_modes.png",
        expand("results/slices/{subject}.npz", subject=SUBJECTS),
        prediction_outputs(),
        fit_outputs(),
        phantom_outputs(),
        evaluation_outputs(),
