"""Fit the mean curve of each labelled organ of one subject with the configured kinetic
model (``model:``): the configured curve fit (kinpet's curve_fit, or the published organ fit
curve_fit_paper) and the fast fitter. Columns: organ, method, the model's parameters and
macro-parameters, SSE."""

import sys

import numpy as np
import pandas as pd

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import atomic_path, read_label_table
from kinpet.modelfit import fit_model
from kinpet.models import get_model, map_names, result_columns
from kinpet.preprocessing import mean_curve
from kinpet.readers import read_volume, script_log

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
sm = snakemake  # noqa: F821
labels = read_volume(sm.input.labels, ndim=3)
names = read_label_table(sm.input.labels_tsv)
frames = FrameSchedule.from_bids_json(sm.input.pet_json)
inp = InputFunction.from_blood_tsv(sm.input.blood)
data = read_volume(sm.input.pet, np.float32, ndim=4)
organs = [n for n, i in names.items() if n != "background" and np.any(labels == i)]
curves = np.stack([mean_curve(data, labels == names[n]) for n in organs])
spec = get_model(sm.params.model)
rows = []
for method in sm.params.methods:
    res = fit_model(
        curves,
        spec.name,
        inp,
        frames,
        method,
        weights=sm.params.weights,
        sampling=sm.params.sampling,
    )
    columns = result_columns(spec, res)
    for i, organ in enumerate(organs):
        rows.append(
            {"organ": organ, "method": method, **{n: columns[n][i] for n in map_names(spec)}}
        )
table = pd.DataFrame(rows)
with atomic_path(sm.output[0]) as tmp:
    table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
print(table.to_string(), file=sys.stderr)
