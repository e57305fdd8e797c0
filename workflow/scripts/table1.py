"""Table 1: per ablation, its design and the CS and MAE (mean +/- sd over the test slices)."""

import sys

import numpy as np
import pandas as pd

from kinpet.evaluation import best_mask, markdown_table, mean_sd, slice_metric_summary
from kinpet.io import atomic_path

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects the object)
sm = snakemake  # noqa: F821
subjects = list(sm.params.slices)
# The test slices are those of the slice dataset (lungs to bladder), as in the paper.
test_z = {}
for subject, path in sm.params.slices.items():
    with np.load(path) as data:
        test_z[subject] = data["z"]
rows = []
for name, design in sm.params.ablations.items():
    parts = []
    for subject, path in sm.params.metrics[name].items():
        metrics = pd.read_csv(path, sep="\t")
        parts.append(metrics[metrics["z"].isin(test_z[subject])].assign(subject=subject))
    summary = slice_metric_summary(pd.concat(parts, ignore_index=True))
    rows.append({"ablation": name, **design, **summary, "subjects": len(subjects)})
table = pd.DataFrame(rows)
with atomic_path(sm.output.csv) as tmp:
    table.to_csv(tmp, index=False)  # full precision (repr of each float)

names = {"3d": "3D", "space_time": "space + time", "space": "space"}
activations = {
    "abs": "Absolute",
    "clamp": "Clamp",
    "multi_clamp": "Multi-clamp",
    "sigmoid": "Sigmoid (kinpet)",
}
shown = pd.DataFrame(
    {
        "ablation": table["ablation"],
        "convolution": table["convolution"].map(names),
        "pooling": table["pooling"].map(lambda p: "3D" if p == "3d" else p),
        "activation": table["activation"].map(activations),
        "cs": [mean_sd(m, s) for m, s in zip(table.cs_mean, table.cs_sd, strict=True)],
        "mae": [mean_sd(m, s) for m, s in zip(table.mae_mean, table.mae_sd, strict=True)],
        "slices": table["slices"],
    }
)
text = markdown_table(
    shown,
    {
        "ablation": "Exp",
        "convolution": "Convolution",
        "pooling": "Pooling",
        "activation": "Final activation",
        "cs": "CS ↑",
        "mae": "MAE (kBq/ml) ↓",
        "slices": "test slices",
    },
    bold={"cs": best_mask(table["cs_mean"], "max"), "mae": best_mask(table["mae_mean"], "min")},
)
with atomic_path(sm.output.md) as tmp:
    tmp.write_text(text)
print(text, file=sys.stderr)
