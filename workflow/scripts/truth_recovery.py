"""Truth recovery on the phantom: bias and RMSE of each method's maps against the true
maps per organ and parameter, and the within-organ coefficient of variation (smoothness).

The truth is the irreversible two-tissue model's; the maps of another configured model are
compared on the parameters both have (the rule reads no other), and the tables say so."""

import sys

import numpy as np
import pandas as pd

from kinpet.evaluation import comparison_note, markdown_table, organ_indices
from kinpet.figures import save_figure, smoothness_figure, truth_recovery_figure
from kinpet.io import atomic_path, read_label_table
from kinpet.models import get_model, parameter_map_names
from kinpet.readers import read_volume, script_log
from kinpet.truth import pool_truth_errors, truth_recovery

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
sm = snakemake  # noqa: F821
fit_methods = list(sm.params.fits)  # keyed by method, subject, parameter
figure_organs = list(sm.params.organs)
# The maps compared: those of the configured model that the truth has too.
PARAMETERS = list(next(iter(sm.params.truth.values())))
note = comparison_note(
    sm.params.model,
    parameter_map_names(get_model(sm.params.model)),
    parameter_map_names(get_model("irreversible_2tc")),
    "truth (the phantom's irreversible two-tissue model)",
)


def read_maps(paths):
    """The parameter maps of one subject and method, from their paths keyed by name."""
    return {n: read_volume(paths[n], np.float32, ndim=3) for n in PARAMETERS}


errors, smooth = [], []
for subject, labels_path in sm.params.labels.items():
    tsv = sm.params.labels_tsv[subject]
    names = read_label_table(tsv)
    index = organ_indices(names, figure_organs, source=tsv)
    # Every labelled region in the table, the figure's organs first.
    index.update({n: i for n, i in names.items() if n not in index and n != "background"})
    labels = read_volume(labels_path, ndim=3)
    truth = read_maps(sm.params.truth[subject])
    estimates = {"network": read_maps(sm.params.network[subject])}
    for method in fit_methods:
        estimates[method] = read_maps(sm.params.fits[method][subject])
    e, s = truth_recovery(estimates, truth, labels, index, sm.params.erode_voxels)
    errors.append(e.assign(subject=subject))
    smooth.append(s.assign(subject=subject))
errors = pd.concat(errors, ignore_index=True)
smooth = pd.concat(smooth, ignore_index=True)
pooled = pool_truth_errors(errors)
methods = ["network", *(m for m in ("curve_fit", "fast") if m in fit_methods)]
with atomic_path(sm.output.csv) as tmp:
    pooled.to_csv(tmp, index=False)
with atomic_path(sm.output.smooth_csv) as tmp:
    smooth.to_csv(tmp, index=False)
print(pooled.to_string(), file=sys.stderr)

labels = {"network": "network", "curve_fit": "curve fit", "fast": "fast fit", "truth": "truth"}


def pct(value):
    return f"{value:+.1f}" if np.isfinite(value) else "n/a"


# Markdown: the figure's organs; bias and RMSE in percent of the true organ mean, the best
# (smallest |bias|, smallest RMSE) of each row in bold.
shown = pooled[pooled["organ"].isin(figure_organs)]
rows, bold = [], {}
for (organ, name), group in shown.groupby(["organ", "parameter"], sort=False):
    group = group.set_index("method").reindex(methods)
    row = {
        "organ": organ,
        "parameter": name,
        "truth": f"{group['truth_mean'].dropna().iloc[0]:.3g}",
    }
    for method in methods:
        row[f"{method} bias"] = pct(group.loc[method, "bias_pct"])
        row[f"{method} rmse"] = pct(group.loc[method, "rmse_pct"]).lstrip("+")
    for column, values in (("bias", group["bias_pct"].abs()), ("rmse", group["rmse_pct"])):
        best = values.min()
        for method in methods:
            bold.setdefault(f"{method} {column}", []).append(bool(values[method] == best))
    rows.append(row)
table = pd.DataFrame(rows)
headers = {"organ": "organ", "parameter": "parameter", "truth": "true mean"}
for method in methods:
    headers[f"{method} bias"] = f"{labels[method]} bias %"
    headers[f"{method} rmse"] = f"{labels[method]} RMSE %"
text = markdown_table(table, headers, {k: pd.Series(v) for k, v in bold.items()})
if note:
    text += f"\n{note}\n"
with atomic_path(sm.output.md) as tmp:
    tmp.write_text(text)

# Smoothness: mean within-organ CV over subjects; the method closest to the truth in bold.
mean_cv = smooth.groupby(["organ", "parameter", "method"], sort=False)["cv"].mean()
rows, bold = [], {m: [] for m in methods}
for organ in figure_organs:
    for name in PARAMETERS:
        if (organ, name, "truth") not in mean_cv.index:
            continue
        true_cv = mean_cv[(organ, name, "truth")]
        row = {"organ": organ, "parameter": name, "truth": f"{100 * true_cv:.1f}"}
        gaps = {m: abs(mean_cv.get((organ, name, m), np.nan) - true_cv) for m in methods}
        closest = np.nanmin(list(gaps.values())) if np.isfinite(list(gaps.values())).any() else None
        for method in methods:
            cv = mean_cv.get((organ, name, method), np.nan)
            row[method] = f"{100 * cv:.1f}" if np.isfinite(cv) else "n/a"
            bold[method].append(closest is not None and gaps[method] == closest)
        rows.append(row)
table = pd.DataFrame(rows)
headers = {"organ": "organ", "parameter": "parameter", "truth": "truth CV %"}
headers.update({m: f"{labels[m]} CV %" for m in methods})
text = markdown_table(table, headers, {k: pd.Series(v) for k, v in bold.items()})
if note:
    text += f"\n{note}\n"
with atomic_path(sm.output.smooth_md) as tmp:
    tmp.write_text(text)

fig = truth_recovery_figure(pooled, figure_organs, methods, PARAMETERS)
save_figure(fig, sm.output.png)
save_figure(fig, sm.output.pdf)
fig = smoothness_figure(smooth, figure_organs, ["truth", *methods], PARAMETERS)
save_figure(fig, sm.output.smooth_png)
save_figure(fig, sm.output.smooth_pdf)
