# Training (one job per ablation of Table 1) and whole-body prediction per test subject.


rule train:
    input:
        unpack(monitor_inputs),
        train=expand("results/slices/{subject}.npz", subject=SPLIT["train"]),
        train_blood=expand(
            "results/preprocessed/{subject}/input_blood.tsv", subject=SPLIT["train"]
        ),
        validation=expand("results/slices/{subject}.npz", subject=SPLIT["validation"]),
        validation_blood=expand(
            "results/preprocessed/{subject}/input_blood.tsv",
            subject=SPLIT["validation"],
        ),
    output:
        best="results/training/{ablation}/best.pt",
        last="results/training/{ablation}/last.pt",
        log="results/training/{ablation}/log.csv",
        monitor="results/training/{ablation}/monitor.csv",
    log:
        "logs/train/{ablation}.log",
    benchmark:
        "results/benchmarks/train/{ablation}.tsv"
    conda:
        "../../envs/kinpet.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=720,
    params:
        model=MODEL,
        ablation=lambda wildcards: canonical(ABLATIONS[wildcards.ablation]),
        settings=TRAINING_SETTINGS,
        underneath=TRAINING_UNDERNEATH,
        monitor_organs=EVALUATION["organs"],
        erode_voxels=EVALUATION["erode_voxels"],
    # The script keeps the resumable state of a run in progress in
    # results/training_state/{ablation}/ (README, "Faults"): no output, so Snakemake leaves
    # it in place when it reruns a killed job. Not a param either: a new param would make
    # Snakemake rerun every finished training.
    script:
        "../scripts/train.py"


rule predict:
    input:
        checkpoint="results/training/{ablation}/best.pt",
        pet="results/preprocessed/{subject}/pet_2p5mm.nii.gz",
        labels="results/preprocessed/{subject}/labels_2p5mm.nii.gz",
        blood="results/preprocessed/{subject}/input_blood.tsv",
        pet_json="results/preprocessed/{subject}/pet.json",
        slices="results/slices/{subject}.npz",
    output:
        maps=expand(
            "results/prediction/{{ablation}}/{{subject}}/{{subject}}_desc-{parameter}_kinpar.nii.gz",
            parameter=MAP_NAMES,
        ),
        metrics="results/prediction/{ablation}/{subject}/slice_metrics.tsv",
    log:
        "logs/predict/{ablation}/{subject}.log",
    benchmark:
        "results/benchmarks/predict/{ablation}/{subject}.tsv"
    conda:
        "../../envs/kinpet.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    params:
        refine_steps=TRAINING.get("refine_steps", 0),
        refine_learning_rate=TRAINING.get("refine_learning_rate"),
        crop=PREPROCESS["crop"],
    script:
        "../scripts/predict.py"
