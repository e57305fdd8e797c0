"""Fig. 4: K1 of the network beside K1 of the voxel-wise fit on one axial slice the fit
covered, on one colour scale, with organ contours."""

import sys

import numpy as np

from kinpet.evaluation import axial_slice, organ_indices
from kinpet.figures import axial_comparison_figure, save_figure
from kinpet.io import read_label_table
from kinpet.readers import read_nifti_header, read_volume, script_log

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
sm = snakemake  # noqa: F821
names = read_label_table(sm.input.labels_tsv)
index = organ_indices(names, sm.params.organs, source=sm.input.labels_tsv)
labels = read_volume(sm.input.labels, ndim=3)
voxel_mm = read_nifti_header(sm.input.labels).zooms[0]
network = read_volume(sm.input.network, np.float32, ndim=3)
fit = read_volume(sm.input.fit, np.float32, ndim=3)
# Slices the fit covered: those with a fitted value inside the body.
covered = (np.isfinite(fit) & (labels > 0)).any(axis=(0, 1))
z = axial_slice(covered, labels, index)
print(f"axial slice z = {z} of {covered.sum()} covered slices", file=sys.stderr)
method = {"curve_fit": "curve fit", "fast": "fast fit"}.get(sm.params.method, sm.params.method)
fig = axial_comparison_figure(
    network[:, :, z],
    fit[:, :, z],
    labels[:, :, z],
    index,
    voxel_mm,
    titles=(
        f"network ({sm.params.ablation}), {sm.params.subject}, slice {z}",
        f"{method} (voxel-wise), {sm.params.subject}, slice {z}",
    ),
)
save_figure(fig, sm.output.png)
save_figure(fig, sm.output.pdf)
