"""Fig. 3: cosine similarity per axial slice of one test subject along the body axis, with
the organs' extents shaded, beside a coronal plane of each parameter map of the kinetic
model."""

import sys

import numpy as np

from kinpet.evaluation import coronal_plane, organ_indices, z_extents
from kinpet.figures import cs_profile_figure, save_figure
from kinpet.io import read_label_table
from kinpet.readers import read_nifti_header, read_table, read_volume, script_log

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
sm = snakemake  # noqa: F821
index = organ_indices(
    read_label_table(sm.input.labels_tsv), sm.params.organs, source=sm.input.labels_tsv
)
labels = read_volume(sm.input.labels, ndim=3)
voxel_mm = read_nifti_header(sm.input.labels).zooms[2]
metrics = read_table(sm.input.metrics, ["z", "pixels", "cs"])
y = coronal_plane(labels, index)
coronal = {}
for path in sm.input.maps:
    name = path.rsplit("_desc-", 1)[1].split("_", 1)[0]
    if name in sm.params.parameters:  # the model's parameters (the paper's four), no Ki
        coronal[name] = read_volume(path, np.float32, slab=np.s_[:, y, :], ndim=3)
extents = z_extents(labels, index)
print(f"coronal plane y = {y}; organ extents (slices):\n{extents}", file=sys.stderr)
fig = cs_profile_figure(
    metrics, voxel_mm, extents, coronal, subject=f"{sm.params.subject}, {sm.params.ablation}"
)
save_figure(fig, sm.output.png)
save_figure(fig, sm.output.pdf)
