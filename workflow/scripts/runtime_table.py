"""Run-time table: seconds per voxel, per slice and per whole body of the network's
inference and of each voxel-wise fitter, from the recorded benchmarks, with speed-ups, for
the configured kinetic model (named with its maps under the table)."""

import sys

import numpy as np
import pandas as pd

from kinpet.evaluation import body_voxel_counts, markdown_table, runtime_table
from kinpet.io import KinpetInputError, atomic_path
from kinpet.models import get_model, map_names
from kinpet.readers import read_table, read_volume, script_log

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
sm = snakemake  # noqa: F821
methods = list(sm.params.fit_times)  # keyed by method, subject, chunk


def wall_seconds(path) -> float:
    table = read_table(path)
    if "s" not in table.columns or table.empty:
        raise KinpetInputError(f"{path}: not a Snakemake benchmark (no column 's' or no row)")
    return float(table["s"].iloc[0])


counts = {
    subject: body_voxel_counts(read_volume(path, ndim=3))
    for subject, path in sm.params.labels.items()
}
network = pd.DataFrame(
    [
        {"subject": subject, "seconds": wall_seconds(path), **counts[subject]}
        for subject, path in sm.params.predict.items()
    ]
)
rows = []
for method in methods:
    for subject, chunks in sm.params.fit_times[method].items():
        seconds, fitted, fit_seconds = 0.0, 0, 0.0
        for chunk, path in chunks.items():
            seconds += wall_seconds(sm.params.fit_benchmarks[method][subject][chunk])
            fit_time = read_table(path, required_columns=("voxels", "fit_s"))
            fitted += int(fit_time["voxels"].iloc[0])
            fit_seconds += float(fit_time["fit_s"].iloc[0])  # the fitter's own time in the job
        rows.append(
            {
                "method": method,
                "subject": subject,
                "seconds": seconds,
                "fitted": fitted,
                "fit_seconds": fit_seconds,
                **counts[subject],
            }
        )
fits = pd.DataFrame(rows)
print(network.to_string(), fits.to_string(), sep="\n", file=sys.stderr)
reference = "curve_fit" if "curve_fit" in methods else methods[0]
table = runtime_table(network, fits, reference=reference)
threads = sm.params.threads
table.insert(1, "threads", [threads.get(m) for m in table["method"]])
# The fitters' own time per voxel (timed around kinpet.fitting.fit in each chunk job) and
# the jobs' time over it: what reading, imports and start-up add. NaN for the network.
fit_per_voxel = {
    method: group["fit_seconds"].sum(skipna=False) / group["fitted"].sum()
    if group["fitted"].sum()
    else np.nan
    for method, group in fits.groupby("method", sort=False)
}
table["fit_s_per_voxel"] = [fit_per_voxel.get(m, np.nan) for m in table["method"]]
table["job_over_fit"] = table["s_per_voxel"] / table["fit_s_per_voxel"]
table["model"] = sm.params.model
with atomic_path(sm.output.csv) as tmp:
    table.to_csv(tmp, index=False)


def seconds(value: float) -> str:
    """Seconds in a readable unit."""
    if not np.isfinite(value):
        return "n/a"
    if value < 1e-3:
        return f"{value * 1e6:.3g} µs"
    if value < 1:
        return f"{value * 1e3:.3g} ms"
    if value < 120:
        return f"{value:.3g} s"
    if value < 7200:
        return f"{value / 60:.3g} min"
    return f"{value / 3600:.3g} h"


names = {
    "network": "network (inference)",
    "curve_fit": "curve fit (scipy, per voxel)",
    "fast": "fast fitter (batched)",
}


def speedup(ratio):
    """1,004x rather than 1e+03x; three digits below 100."""
    if not np.isfinite(ratio):
        return "n/a"
    return f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.3g}x"


shown = pd.DataFrame(
    {
        "method": table["method"].map(lambda m: names.get(m, m)),
        "threads": table["threads"].map(lambda t: "n/a" if t is None else str(t)),
        "voxel": table["s_per_voxel"].map(seconds),
        "slice": table["s_per_slice"].map(seconds),
        "body": table["s_per_body"].map(seconds),
        "speedup": table["speedup"].map(speedup),
        "fit_voxel": table["fit_s_per_voxel"].map(seconds),
        "job_over_fit": table["job_over_fit"].map(
            lambda r: f"{r:.3g}x" if np.isfinite(r) else "n/a"
        ),
        "timed": [
            f"{v:,} voxels, {s:.1f} s"
            for v, s in zip(table["voxels_timed"], table["seconds_timed"], strict=True)
        ],
    }
)
ref_name = names.get(reference, reference)
text = markdown_table(
    shown,
    {
        "method": "method",
        "threads": "threads per job",
        "voxel": "per voxel",
        "slice": "per slice",
        "body": "per whole body",
        "speedup": f"speed-up vs {ref_name}",
        "fit_voxel": "fitter alone, per voxel",
        "job_over_fit": "job / fitter",
        "timed": "measured on",
    },
)
model = get_model(sm.params.model)
text += (
    f"\nKinetic model: {model.name}, {model.description}: the network predicts "
    f"{', '.join(model.parameters)}, the fitters fit them ({', '.join(map_names(model))} "
    "maps).\n"
)
with atomic_path(sm.output.md) as tmp:
    tmp.write_text(text)
print(text, file=sys.stderr)
