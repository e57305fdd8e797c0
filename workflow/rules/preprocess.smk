# preprocess.slice_range, only when given: the slices of a config without it stay as they were.
SLICE_BOUNDS = (
    {"bounds": PREPROCESS["slice_range"]} if PREPROCESS.get("slice_range") else {}
)


rule resample:
    input:
        unpack(bids_inputs),
    output:
        pet="results/preprocessed/{subject}/pet_2p5mm.nii.gz",
        labels="results/preprocessed/{subject}/labels_2p5mm.nii.gz",
        labels_tsv="results/preprocessed/{subject}/labels.tsv",
        blood="results/preprocessed/{subject}/input_blood.tsv",
        blood_json="results/preprocessed/{subject}/input_blood.json",
        pet_json="results/preprocessed/{subject}/pet.json",
    log:
        "logs/resample/{subject}.log",
    benchmark:
        "results/benchmarks/resample/{subject}.tsv"
    conda:
        "../../envs/kinpet.yaml"
    params:
        **SLICE_BOUNDS,
        bids_root=str(BIDS_ROOT),
        input_function=DATA["input_function"],
        blood_recording=DATA["blood_recording"],
        blood_column=DATA["blood_column"],
        voxel_mm=PREPROCESS["voxel_mm"],
    script:
        "../scripts/resample.py"


rule slices:
    input:
        pet="results/preprocessed/{subject}/pet_2p5mm.nii.gz",
        labels="results/preprocessed/{subject}/labels_2p5mm.nii.gz",
        labels_tsv="results/preprocessed/{subject}/labels.tsv",
        pet_json="results/preprocessed/{subject}/pet.json",
    output:
        "results/slices/{subject}.npz",
    log:
        "logs/slices/{subject}.log",
    conda:
        "../../envs/kinpet.yaml"
    params:
        **SLICE_BOUNDS,
        crop=PREPROCESS["crop"],
        margins_mm=PREPROCESS["slice_margin_mm"],
        # Test subjects may keep another count (preprocess.n_slices_test); a lambda, so
        # that the other subjects' params, and their slices, stay as they were.
        n_slices=lambda wildcards: (
            N_SLICES_TEST
            if wildcards.subject in SPLIT["test"]
            else PREPROCESS["n_slices"]
        ),
    script:
        "../scripts/slices.py"
