from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/simulate.smk"


rule all:
    input:
        "results/model/organ_curves.tsv",
        "results/figures/sampling_modes.png",
        f"{BIDS}/dataset_description.json",
        expand(
            f"{BIDS}/{{subject}}/pet/{{subject}}_pet.nii.gz", subject=PHANTOM_SUBJECTS
        ),
        "results/figures/phantom_coronal.png",
