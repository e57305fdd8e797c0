# Conventional curve fitting of the test subjects: organ-mean curves, and voxel by voxel as
# scatter/gather (one job per subject, chunk of axial slices and method).


wildcard_constraints:
    method="fast|curve_fit",
    chunk="[0-9]+",


rule organ_fit:
    input:
        pet="results/preprocessed/{subject}/pet_2p5mm.nii.gz",
        labels="results/preprocessed/{subject}/labels_2p5mm.nii.gz",
        labels_tsv="results/preprocessed/{subject}/labels.tsv",
        blood="results/preprocessed/{subject}/input_blood.tsv",
        pet_json="results/preprocessed/{subject}/pet.json",
    output:
        "results/fit/organ/{subject}.tsv",
    log:
        "logs/organ_fit/{subject}.log",
    conda:
        "../../envs/kinpet.yaml"
    threads: 1
    params:
        model=MODEL,
        methods=ORGAN_FIT_METHODS,
        weights=FIT["weights"],
        sampling=FIT["sampling"],
    script:
        "../scripts/organ_fit.py"


# The 4-D image once more, uncompressed and slice after slice, so that each chunk job
# reads only its slices (a gzipped NIfTI spreads every slice over the whole file). Not
# temp(): a temporary written again for one lost chunk would rerun all of the subject's
# chunks, of both methods (their input is newer).
rule fit_slabs:
    input:
        pet="results/preprocessed/{subject}/pet_2p5mm.nii.gz",
    output:
        slabs="results/preprocessed/{subject}/pet_2p5mm_slabs.npy",
    log:
        "logs/fit_slabs/{subject}.log",
    benchmark:
        "results/benchmarks/fit_slabs/{subject}.tsv"
    conda:
        "../../envs/kinpet.yaml"
    threads: 1
    resources:
        # The decompressed image (about 1.4 x the gzipped file) and the file written.
        mem_mb=lambda wildcards, input: 1000 + int(3 * input.size_mb),
    script:
        "../scripts/fit_slabs.py"


rule fit_chunk:
    input:
        slabs="results/preprocessed/{subject}/pet_2p5mm_slabs.npy",
        labels="results/preprocessed/{subject}/labels_2p5mm.nii.gz",
        labels_tsv="results/preprocessed/{subject}/labels.tsv",
        blood="results/preprocessed/{subject}/input_blood.tsv",
        pet_json="results/preprocessed/{subject}/pet.json",
    output:
        maps="results/fit/{method}/{subject}/chunk-{chunk}.npz",
        # The fitter's own wall time, kept out of the maps so that they stay the same bytes
        # from run to run (a benchmark, like the job's own below).
        fit_time="results/benchmarks/fit_time/{method}/{subject}/chunk-{chunk}.tsv",
    log:
        "logs/fit_chunk/{method}/{subject}/chunk-{chunk}.log",
    benchmark:
        "results/benchmarks/fit_chunk/{method}/{subject}/chunk-{chunk}.tsv"
    conda:
        "../../envs/kinpet.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        model=MODEL,
        chunks=FIT["chunks"],
        # Only the reference method reads it, so a change leaves the fast fits alone.
        slices=lambda wildcards: (
            FIT["reference_slices"] if wildcards.method == "curve_fit" else "all"
        ),
        weights=FIT["weights"],
        sampling=FIT["sampling"],
    script:
        "../scripts/fit_chunk.py"


rule gather_fit:
    input:
        chunks=expand(
            "results/fit/{{method}}/{{subject}}/chunk-{chunk}.npz",
            chunk=range(FIT["chunks"]),
        ),
        pet="results/preprocessed/{subject}/pet_2p5mm.nii.gz",
    output:
        maps=expand(
            "results/fit/{{method}}/{{subject}}/{{subject}}_desc-{name}_kinpar.nii.gz",
            name=FIT_MAP_NAMES,
        ),
    log:
        "logs/gather_fit/{method}/{subject}.log",
    conda:
        "../../envs/kinpet.yaml"
    script:
        "../scripts/gather_fit.py"
