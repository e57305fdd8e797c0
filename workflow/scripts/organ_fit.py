"""Fit the mean curve of each labelled organ of one subject with the configured curve fit
(kinpet's curve_fit, or the published organ fit curve_fit_paper) and the fast fitter."""

import sys

import numpy as np
import pandas as pd

from kinpet.fitting import fit
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import atomic_path, read_label_table
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
rows = []
for method in sm.params.methods:
    res = fit(
        curves, inp, frames, method=method, weights=sm.params.weights, sampling=sm.params.sampling
    )
    for organ, p, ki, sse in zip(organs, res.params, res.ki, res.sse, strict=True):
        rows.append(
            {
                "organ": organ,
                "method": method,
                "K1": p[0],
                "k2": p[1],
                "k3": p[2],
                "Vb": p[3],
                "Ki": ki,
                "SSE": sse,
            }
        )
table = pd.DataFrame(rows)
with atomic_path(sm.output[0]) as tmp:
    table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
print(table.to_string(), file=sys.stderr)
