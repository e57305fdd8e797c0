PHANTOM = config["phantom"]
BIDS = PHANTOM["root"]
PHANTOM_SUBJECTS = phantom_subject_ids(PHANTOM["subjects"])
TRUTH_NAMES = ["K1", "k2", "k3", "Vb", "Ki"]

# The label map's files (phantom.anatomy); none for the procedural body.
ANATOMY_INPUTS = anatomy_inputs(PHANTOM)
# phantom.deform_mm, only when on: the jobs of the geometric phantom stay as they were.
DEFORM = {"deform_mm": PHANTOM["deform_mm"]} if PHANTOM.get("deform_mm") else {}
# phantom.motion, only when it moves: the jobs of the still phantom stay as they were.
MOTION = phantom_motion(PHANTOM)


rule phantom_dataset:
    output:
        raw=f"{BIDS}/dataset_description.json",
        labels=f"{BIDS}/derivatives/labels/dataset_description.json",
        truth=f"{BIDS}/derivatives/truth/dataset_description.json",
    log:
        "logs/phantom_dataset.log",
    conda:
        "../../envs/kinpet.yaml"
    script:
        "../scripts/phantom_dataset.py"


rule simulate:
    input:
        **ANATOMY_INPUTS,
        organs=config["organ_values"],
    output:
        pet=f"{BIDS}/{{subject}}/pet/{{subject}}_pet.nii.gz",
        pet_json=f"{BIDS}/{{subject}}/pet/{{subject}}_pet.json",
        blood=f"{BIDS}/{{subject}}/pet/{{subject}}_recording-idif_blood.tsv",
        blood_json=f"{BIDS}/{{subject}}/pet/{{subject}}_recording-idif_blood.json",
        dseg=f"{BIDS}/derivatives/labels/{{subject}}/{{subject}}_dseg.nii.gz",
        dseg_tsv=f"{BIDS}/derivatives/labels/{{subject}}/{{subject}}_dseg.tsv",
        truth=expand(
            f"{BIDS}/derivatives/truth/{{{{subject}}}}/{{{{subject}}}}_desc-{{name}}_truth.nii.gz",
            name=TRUTH_NAMES,
        ),
        organs=f"{BIDS}/derivatives/truth/{{subject}}/{{subject}}_organs.tsv",
    log:
        "logs/simulate/{subject}.log",
    benchmark:
        "results/benchmarks/simulate/{subject}.tsv"
    conda:
        "../../envs/kinpet.yaml"
    # Each subject's own random stream comes from the seed and its id, so the subject
    # count is not a parameter: adding subjects leaves the simulated ones alone.
    params:
        **DEFORM,
        **MOTION,
        seed=PHANTOM["seed"],
        size=PHANTOM["size"],
        voxel_mm=PHANTOM["voxel_mm"],
        input_peak_kbq_per_ml=PHANTOM["input_peak_kbq_per_ml"],
        input_delay_s=PHANTOM["input_delay_s"],
        parameter_cv=PHANTOM["parameter_cv"],
        spatial_cv=PHANTOM["spatial_cv"],
        frames=canonical(PHANTOM["frames"]),
        fwhm_mm=PHANTOM["fwhm_mm"],
        noise_cov=PHANTOM["noise_cov"],
    script:
        "../scripts/simulate.py"


# A phantom too large for the memory or disk is refused here, before Snakemake plans a job:
# the simulate job's own check comes after Snakemake has deleted the outputs it reruns.
# The memory is this machine's, or the simulate job's mem_mb when fixed (what a cluster
# job gets). Only the main process checks: a cluster job parses the Snakefile again,
# under the memory of whatever job it runs. A label map's grid is known only once it is
# read: that body is checked by the simulate job alone.
if DATA["source"] == "phantom" and not ANATOMY_INPUTS and workflow.is_main_process:
    from kinpet.resources import (
        PhantomResourceError,
        available_memory,
        check_phantom_resources,
        frame_count,
    )

    try:
        check_phantom_resources(
            PHANTOM["size"],
            PHANTOM["voxel_mm"],
            frame_count(PHANTOM["frames"]),
            BIDS,
            subject=(
                PHANTOM_SUBJECTS[0]
                if len(PHANTOM_SUBJECTS) == 1
                else f"each of the {len(PHANTOM_SUBJECTS)} subjects"
            ),
            setting="config phantom.voxel_mm",
            memory=available_memory(fixed_mem_mb("simulate")),
        )
    except PhantomResourceError as err:
        raise WorkflowError(str(err)) from None


rule phantom_figure:
    input:
        pet=f"{BIDS}/{PHANTOM['figure_subject']}/pet/{PHANTOM['figure_subject']}_pet.nii.gz",
        pet_json=f"{BIDS}/{PHANTOM['figure_subject']}/pet/{PHANTOM['figure_subject']}_pet.json",
        dseg=f"{BIDS}/derivatives/labels/{PHANTOM['figure_subject']}/{PHANTOM['figure_subject']}_dseg.nii.gz",
    output:
        png=report(
            "results/figures/phantom_coronal.png",
            caption="../report/phantom_coronal.rst",
            category="Phantom",
        ),
        pdf="results/figures/phantom_coronal.pdf",
    log:
        "logs/phantom_figure.log",
    conda:
        "../../envs/kinpet.yaml"
    params:
        subject=PHANTOM["figure_subject"],
    script:
        "../scripts/phantom_figure.py"
