"""Fig. 4: K1 of the network beside K1 of the voxel-wise fit on one axial slice the fit
covered, on one colour scale, with organ contours."""

import sys

import nibabel as nib
import numpy as np

from kinpet.evaluation import axial_slice, organ_indices
from kinpet.figures import axial_comparison_figure, save_figure
from kinpet.io import read_label_table

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects the object)
sm = snakemake  # noqa: F821
names = read_label_table(sm.input.labels_tsv)
index = organ_indices(names, sm.params.organs, source=sm.input.labels_tsv)
image = nib.load(sm.input.labels)
labels = np.asarray(image.dataobj)
voxel_mm = float(image.header.get_zooms()[0])
network = np.asarray(nib.load(sm.input.network).dataobj, dtype=np.float32)
fit = np.asarray(nib.load(sm.input.fit).dataobj, dtype=np.float32)
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
