"""Fig. 2: organ means of the network's maps beside the organ curve fits and reference
values, over the test subjects (and the table of the plotted numbers): one panel per
parameter of the configured kinetic model, the table with its macro-parameters too. The
reference (the phantom's truth or a table of values) is compared on the maps it shares with
the model; the table says which are not."""

import sys

import numpy as np
import pandas as pd

from kinpet.evaluation import (
    comparison_note,
    markdown_table,
    organ_indices,
    organ_means,
    reference_long,
    summarise_over_subjects,
    with_ki,
)
from kinpet.figures import organ_parameter_figure, save_figure
from kinpet.io import atomic_path, read_label_table, read_organ_values
from kinpet.models import get_model, parameter_map_names
from kinpet.readers import read_table, read_volume, script_log

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
sm = snakemake  # noqa: F821
organs = list(sm.params.organs)
model = get_model(sm.params.model)
MAPS = parameter_map_names(model)  # the table's rows: parameters, macro-parameters


def subject_organ_means(subject, paths):
    """Organ means of one subject's parameter maps, from their paths keyed by name."""
    tsv = sm.params.labels_tsv[subject]
    index = organ_indices(read_label_table(tsv), organs, source=tsv)
    labels = read_volume(sm.params.labels[subject], ndim=3)
    volumes = {n: read_volume(path, np.float32, ndim=3) for n, path in paths.items()}
    return organ_means(volumes, labels, index)


rows = []
for subject, labels_path in sm.params.labels.items():
    fits_path = sm.params.organ_fits[subject]
    means = subject_organ_means(subject, sm.params.maps[subject])
    for _, row in means[means["voxels"] == 0].iterrows():
        print(f"{subject}: no voxels of {row.organ} in {labels_path}", file=sys.stderr)
    rows.append(means.assign(subject=subject, method="network"))
    fits = read_table(fits_path, ["organ", "method", *MAPS])
    fits = fits[fits["organ"].isin(organs)]
    long = fits.melt(id_vars=["organ", "method"], value_vars=list(MAPS), var_name="parameter")
    rows.append(long.assign(subject=subject))

given_sd = None
note = ""
if sm.params.truth is not None:
    # The phantom's true maps (resampled to 2.5 mm), averaged over the same organ masks:
    # those the model has (the rule asks for no other).
    for subject, paths in sm.params.truth.items():
        means = subject_organ_means(subject, paths)
        rows.append(means.assign(subject=subject, method="reference"))
    note = comparison_note(
        model.name,
        MAPS,
        parameter_map_names(get_model("irreversible_2tc")),
        "truth (the phantom's irreversible two-tissue model)",
    )
elif sm.input.reference:
    path = sm.input.reference[0]
    table = with_ki(read_organ_values(path))
    note = comparison_note(
        model.name,
        MAPS,
        [c for c in table.columns if c != "organ" and not c.endswith("_sd")],
        f"reference values ({path})",
    )
    long = reference_long(table, MAPS)
    if long["sd"].notna().any():
        given_sd = long.assign(method="reference")[["method", "organ", "parameter", "sd"]]
    rows.append(long.assign(subject="reference", method="reference"))
    absent = sorted(set(organs) - set(table["organ"]))
    if absent:
        print(f"{path}: no reference values for {', '.join(absent)}", file=sys.stderr)

per_subject = pd.concat(rows, ignore_index=True)
per_subject = per_subject[per_subject["organ"].isin(organs)]
methods = [
    m
    for m in ("network", "curve_fit", "curve_fit_paper", "fast", "reference")
    if m in set(per_subject["method"])
]
summary = summarise_over_subjects(per_subject)
rank = {
    "organ": {o: i for i, o in enumerate(organs)},
    "parameter": {p: i for i, p in enumerate(MAPS)},
    "method": {m: i for i, m in enumerate(methods)},
}
summary = summary.sort_values(
    ["organ", "parameter", "method"], key=lambda column: column.map(rank[column.name])
).reset_index(drop=True)
with atomic_path(sm.output.csv) as tmp:
    summary.to_csv(tmp, index=False)

reference_label = "truth" if sm.params.truth is not None else sm.params.reference_name
labels = {
    "network": f"network ({sm.params.ablation})",
    "curve_fit": "curve fit (organ TAC)",
    "curve_fit_paper": "curve fit, published (organ TAC)",
    "fast": "fast fit (organ TAC)",
    "reference": reference_label,
}
cell = summary.assign(
    text=[
        f"{m:.3g} ± {s:.2g}" if np.isfinite(s) else (f"{m:.3g}" if np.isfinite(m) else "n/a")
        for m, s in zip(summary["mean"], summary["sd"], strict=True)
    ]
)
wide = cell.pivot(index=["organ", "parameter"], columns="method", values="text")
wide = wide.reindex(
    pd.MultiIndex.from_product([organs, MAPS], names=["organ", "parameter"])
).reset_index()
wide = wide.dropna(how="all", subset=methods).fillna("n/a")
text = markdown_table(
    wide, {"organ": "organ", "parameter": "parameter", **{m: labels[m] for m in methods}}
)
if note:
    text += f"\n{note}\n"
with atomic_path(sm.output.md) as tmp:
    tmp.write_text(text)
print(text, file=sys.stderr)

fig = organ_parameter_figure(
    per_subject, organs, methods, model.parameters, given_sd=given_sd, labels=labels
)
save_figure(fig, sm.output.png)
save_figure(fig, sm.output.pdf)
