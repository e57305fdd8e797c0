"""Table 1: per ablation, its design, its training recipe and model sampling, and the CS and
MAE (mean +/- sd over the test slices, in the configured test domain), for the configured
kinetic model (named with its parameters under the table)."""

import sys

import pandas as pd

from kinpet.evaluation import (
    best_mask,
    domain_slice_metrics,
    markdown_table,
    mean_sd,
    slice_metric_summary,
)
from kinpet.io import atomic_path
from kinpet.models import get_model
from kinpet.readers import read_npz, read_table, script_log
from kinpet.settings import settings_from_config

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
sm = snakemake  # noqa: F821
subjects = list(sm.params.slices)
# The test slices are those of the slice dataset (lungs to bladder), as in the paper.
test_z = {}
for subject, path in sm.params.slices.items():
    test_z[subject] = read_npz(path, keys=("z",))["z"]
domain = sm.params.test_domain
rows = []
for name, design in sm.params.ablations.items():
    parts = []
    for subject, path in sm.params.metrics[name].items():
        metrics = domain_slice_metrics(read_table(path), domain, source=path)
        parts.append(metrics[metrics["z"].isin(test_z[subject])].assign(subject=subject))
    summary = slice_metric_summary(pd.concat(parts, ignore_index=True))
    # As the train rule expands them: a table of the demo's recipe must not pass for the
    # paper's.
    settings = settings_from_config(
        sm.params.settings, sm.params.underneath, **design, model=sm.params.model
    )
    rows.append(
        {
            "ablation": name,
            **design,
            "model": settings.model,
            "recipe": settings.recipe,
            "sampling": settings.sampling,
            "test_domain": domain,
            **summary,
            "subjects": len(subjects),
        }
    )
table = pd.DataFrame(rows)
with atomic_path(sm.output.csv) as tmp:
    table.to_csv(tmp, index=False)  # full precision (repr of each float)

names = {"3d": "3D", "space_time": "space + time", "space": "space"}
activations = {
    "abs": "Absolute",
    "clamp": "Clamp",
    "multi_clamp": "Multi-clamp",
    "sigmoid": "Sigmoid (kinpet)",
    "log_beta": "log beta (kinpet)",
}
shown = pd.DataFrame(
    {
        "ablation": table["ablation"],
        "convolution": table["convolution"].map(names),
        "pooling": table["pooling"].map(lambda p: "3D" if p == "3d" else p),
        "activation": table["activation"].map(activations),
        "cs": [mean_sd(m, s) for m, s in zip(table.cs_mean, table.cs_sd, strict=True)],
        "mae": [mean_sd(m, s) for m, s in zip(table.mae_mean, table.mae_sd, strict=True)],
        "recipe": [f"{r}, {s}" for r, s in zip(table.recipe, table.sampling, strict=True)],
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
        "recipe": "Recipe, sampling",
        "slices": "test slices",
    },
    bold={"cs": best_mask(table["cs_mean"], "max"), "mae": best_mask(table["mae_mean"], "min")},
)
crop = "x".join(str(int(c)) for c in sm.params.crop)
model = get_model(sm.params.model)
text += f"\nKinetic model: {model.name}, {model.description} ({', '.join(model.parameters)}).\n"
text += (
    "\n"
    + {
        "kinpet": "Test domain kinpet: the whole transaxial plane of each test slice, pixels "
        "inside the body (labels > 0) with enough activity (TAC area).\n",
        "paper": f"Test domain paper (the published test): the {crop} crop of each test slice, "
        "every pixel with enough activity (TAC area).\n",
    }[domain]
)
with atomic_path(sm.output.md) as tmp:
    tmp.write_text(text)
print(text, file=sys.stderr)
