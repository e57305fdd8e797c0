# Tables and figures of the paper (Table 1, Fig. 2-4, run time) and, on the phantom, the
# recovery of the true parameter maps. Every rule reads finished maps, metrics and
# benchmarks and writes under results/tables and results/figures.


TABLE1_METRICS = keyed(
    "results/prediction/{ablation}/{subject}/slice_metrics.tsv",
    ablation=list(ABLATIONS),
    subject=SPLIT["test"],
)
TEST_LABELS = "results/preprocessed/{subject}/labels_2p5mm.nii.gz"
TEST_LABEL_TABLES = "results/preprocessed/{subject}/labels.tsv"
# The phantom's truth is the irreversible model's (TRUTH_NAMES): another model is compared
# with it on the maps both have (reversible_2tc: K1, k2, k3, Vb; Ki is not defined there).
COMPARED_NAMES = [name for name in TRUTH_NAMES if name in MAP_NAMES]


rule table1:
    input:
        metrics=leaves(TABLE1_METRICS),
        slices=leaves(test_files("results/slices/{subject}.npz")),
    output:
        csv=report(
            "results/tables/table1.csv",
            caption="../report/table1.rst",
            category="Paper",
            subcategory="Table 1",
        ),
        md="results/tables/table1.md",
    log:
        "logs/table1.log",
    conda:
        "../../envs/kinpet.yaml"
    params:
        ablations=ABLATIONS,
        metrics=TABLE1_METRICS,
        slices=test_files("results/slices/{subject}.npz"),
        # The recipe and sampling of each ablation, expanded as the train rule does.
        settings=TRAINING_SETTINGS,
        underneath=TRAINING_UNDERNEATH,
        test_domain=TEST_DOMAIN,
        crop=PREPROCESS["crop"],
        model=MODEL,
    script:
        "../scripts/table1.py"


rule figure2:
    input:
        maps=best_prediction_maps(SPLIT["test"]),
        labels=leaves(test_files(TEST_LABELS)),
        labels_tsv=leaves(test_files(TEST_LABEL_TABLES)),
        organ_fits=leaves(test_files("results/fit/organ/{subject}.tsv")),
        reference=figure2_reference,
    output:
        png=report(
            "results/figures/figure2.png",
            caption="../report/figure2.rst",
            category="Paper",
            subcategory="Fig. 2",
        ),
        pdf="results/figures/figure2.pdf",
        csv=report(
            "results/tables/organ_values.csv",
            caption="../report/organ_values.rst",
            category="Paper",
            subcategory="Fig. 2",
        ),
        md="results/tables/organ_values.md",
    log:
        "logs/figure2.log",
    conda:
        "../../envs/kinpet.yaml"
    params:
        maps=network_maps(SPLIT["test"]),
        labels=test_files(TEST_LABELS),
        labels_tsv=test_files(TEST_LABEL_TABLES),
        organ_fits=test_files("results/fit/organ/{subject}.tsv"),
        truth=truth_maps(COMPARED_NAMES) if reference_is_truth() else None,
        organs=EVALUATION["organs"],
        ablation=BEST,
        reference_name=EVALUATION["reference_name"],
        model=MODEL,
    script:
        "../scripts/figure2.py"


rule figure3:
    input:
        maps=best_prediction_maps([FIGURE_SUBJECT]),
        metrics=f"results/prediction/{BEST}/{FIGURE_SUBJECT}/slice_metrics.tsv",
        labels=f"results/preprocessed/{FIGURE_SUBJECT}/labels_2p5mm.nii.gz",
        labels_tsv=f"results/preprocessed/{FIGURE_SUBJECT}/labels.tsv",
        # The voxel-wise fit beside the network in (a): the fast one (every slice).
        fit_maps=expand(
            f"results/fit/{FIGURE3_METHOD}/{FIGURE_SUBJECT}/{FIGURE_SUBJECT}_desc-{{name}}_kinpar.nii.gz",
            name=MODEL_PARAMETERS,
        ),
        pet=f"results/preprocessed/{FIGURE_SUBJECT}/pet_2p5mm.nii.gz",
        blood=f"results/preprocessed/{FIGURE_SUBJECT}/input_blood.tsv",
        pet_json=f"results/preprocessed/{FIGURE_SUBJECT}/pet.json",
    output:
        png=report(
            "results/figures/figure3.png",
            caption="../report/figure3.rst",
            category="Paper",
            subcategory="Fig. 3",
        ),
        pdf="results/figures/figure3.pdf",
        organ_cs=report(
            "results/tables/figure3_organ_cs.csv",
            caption="../report/figure3_organ_cs.rst",
            category="Paper",
            subcategory="Fig. 3",
        ),
    log:
        "logs/figure3.log",
    conda:
        "../../envs/kinpet.yaml"
    params:
        subject=FIGURE_SUBJECT,
        organs=EVALUATION["organs"],
        ablation=BEST,
        parameters=MODEL_PARAMETERS,
        model=MODEL,
        fit_method=FIGURE3_METHOD,
        fit_sampling=FIT["sampling"],
        training=TRAINING_SETTINGS,
        training_underneath=TRAINING_UNDERNEATH,
    script:
        "../scripts/figure3.py"


rule figure4:
    input:
        network=f"results/prediction/{BEST}/{FIGURE_SUBJECT}/{FIGURE_SUBJECT}_desc-K1_kinpar.nii.gz",
        fit=f"results/fit/{FIGURE4_METHOD}/{FIGURE_SUBJECT}/{FIGURE_SUBJECT}_desc-K1_kinpar.nii.gz",
        labels=f"results/preprocessed/{FIGURE_SUBJECT}/labels_2p5mm.nii.gz",
        labels_tsv=f"results/preprocessed/{FIGURE_SUBJECT}/labels.tsv",
    output:
        png=report(
            "results/figures/figure4.png",
            caption="../report/figure4.rst",
            category="Paper",
            subcategory="Fig. 4",
        ),
        pdf="results/figures/figure4.pdf",
    log:
        "logs/figure4.log",
    conda:
        "../../envs/kinpet.yaml"
    params:
        subject=FIGURE_SUBJECT,
        organs=EVALUATION["organs"],
        ablation=BEST,
        method=FIGURE4_METHOD,
    script:
        "../scripts/figure4.py"


FIT_BENCHMARKS, FIT_TIMES = (
    keyed(
        pattern,
        method=FIT["methods"],
        subject=SPLIT["test"],
        chunk=range(FIT["chunks"]),
    )
    for pattern in (
        "results/benchmarks/fit_chunk/{method}/{subject}/chunk-{chunk}.tsv",
        "results/benchmarks/fit_time/{method}/{subject}/chunk-{chunk}.tsv",
    )
)


rule runtime_table:
    input:
        predict=leaves(test_files(f"results/benchmarks/predict/{BEST}/{{subject}}.tsv")),
        fit_benchmarks=leaves(FIT_BENCHMARKS),
        fit_times=leaves(FIT_TIMES),
        labels=leaves(test_files(TEST_LABELS)),
    output:
        csv=report(
            "results/tables/runtime.csv",
            caption="../report/runtime.rst",
            category="Paper",
            subcategory="Run time",
        ),
        md="results/tables/runtime.md",
    log:
        "logs/runtime_table.log",
    conda:
        "../../envs/kinpet.yaml"
    params:
        predict=test_files(f"results/benchmarks/predict/{BEST}/{{subject}}.tsv"),
        fit_benchmarks=FIT_BENCHMARKS,
        fit_times=FIT_TIMES,
        labels=test_files(TEST_LABELS),
        model=MODEL,
        threads=lambda wildcards: {
            "network": job_threads("predict"),
            **{method: job_threads("fit_chunk") for method in FIT["methods"]},
        },
    script:
        "../scripts/runtime_table.py"


rule resample_truth:
    input:
        truth=expand(
            f"{BIDS}/derivatives/truth/{{{{subject}}}}/{{{{subject}}}}_desc-{{name}}_truth.nii.gz",
            name=TRUTH_NAMES,
        ),
        pet="results/preprocessed/{subject}/pet_2p5mm.nii.gz",
    output:
        expand(
            "results/evaluation/truth/{{subject}}/{{subject}}_desc-{name}_truth.nii.gz",
            name=TRUTH_NAMES,
        ),
    log:
        "logs/resample_truth/{subject}.log",
    conda:
        "../../envs/kinpet.yaml"
    params:
        voxel_mm=PREPROCESS["voxel_mm"],
    script:
        "../scripts/resample_truth.py"


rule truth_recovery:
    input:
        truth=leaves(truth_maps(COMPARED_NAMES)),
        network=leaves(network_maps(SPLIT["test"], names=COMPARED_NAMES)),
        fits=leaves(fit_maps(COMPARED_NAMES)),
        labels=leaves(test_files(TEST_LABELS)),
        labels_tsv=leaves(test_files(TEST_LABEL_TABLES)),
    output:
        csv=report(
            "results/tables/truth_recovery.csv",
            caption="../report/truth_recovery_table.rst",
            category="Phantom truth",
        ),
        md="results/tables/truth_recovery.md",
        png=report(
            "results/figures/truth_recovery.png",
            caption="../report/truth_recovery.rst",
            category="Phantom truth",
        ),
        pdf="results/figures/truth_recovery.pdf",
        smooth_csv=report(
            "results/tables/smoothness.csv",
            caption="../report/smoothness_table.rst",
            category="Phantom truth",
        ),
        smooth_md="results/tables/smoothness.md",
        smooth_png=report(
            "results/figures/smoothness.png",
            caption="../report/smoothness.rst",
            category="Phantom truth",
        ),
        smooth_pdf="results/figures/smoothness.pdf",
    log:
        "logs/truth_recovery.log",
    conda:
        "../../envs/kinpet.yaml"
    params:
        truth=truth_maps(COMPARED_NAMES),
        network=network_maps(SPLIT["test"], names=COMPARED_NAMES),
        fits=fit_maps(COMPARED_NAMES),
        model=MODEL,
        labels=test_files(TEST_LABELS),
        labels_tsv=test_files(TEST_LABEL_TABLES),
        organs=EVALUATION["organs"],
        erode_voxels=EVALUATION["erode_voxels"],
    script:
        "../scripts/truth_recovery.py"


TRAINING_LOGS, TRAINING_MONITORS = (
    keyed(f"results/training/{{ablation}}/{name}", ablation=list(ABLATIONS))
    for name in ("log.csv", "monitor.csv")
)


rule convergence:
    input:
        logs=leaves(TRAINING_LOGS),
        monitors=leaves(TRAINING_MONITORS),
    output:
        png=report(
            "results/figures/convergence.png",
            caption="../report/convergence.rst",
            category="Phantom truth",
        ),
        pdf="results/figures/convergence.pdf",
        csv="results/tables/convergence.csv",
    log:
        "logs/convergence.log",
    conda:
        "../../envs/kinpet.yaml"
    params:
        logs=TRAINING_LOGS,
        monitors=TRAINING_MONITORS,
        organs=[o for o in EVALUATION["organs"] if o != "lungs"],
    script:
        "../scripts/convergence.py"
