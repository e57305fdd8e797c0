rule input_function:
    output:
        tsv="results/model/input_function_blood.tsv",
        json="results/model/input_function_blood.json",
    log:
        "logs/input_function.log",
    conda:
        "../../envs/kinpet.yaml"
    params:
        input_function=canonical(config["input_function"]),
        frames=canonical(config["frames"]),
    script:
        "../scripts/input_function.py"


rule organ_curves:
    input:
        blood="results/model/input_function_blood.tsv",
        organs=config["organ_values"],
    output:
        "results/model/organ_curves.tsv",
    log:
        "logs/organ_curves.log",
    conda:
        "../../envs/kinpet.yaml"
    params:
        frames=canonical(config["frames"]),
    script:
        "../scripts/organ_curves.py"


rule plot_sampling_modes:
    input:
        "results/model/organ_curves.tsv",
    output:
        png=report(
            "results/figures/sampling_modes.png",
            caption="../report/sampling_modes.rst",
            category="Kinetic model",
        ),
        pdf="results/figures/sampling_modes.pdf",
    log:
        "logs/plot_sampling_modes.log",
    conda:
        "../../envs/kinpet.yaml"
    script:
        "../scripts/plot_sampling_modes.py"
