"""Fig. 3: cosine similarity per axial slice of one test subject along the body axis, with
the organs' extents shaded, beside a coronal plane of each parameter map."""

import sys

import nibabel as nib
import numpy as np
import pandas as pd

from kinpet.evaluation import coronal_plane, organ_indices, z_extents
from kinpet.figures import cs_profile_figure, save_figure
from kinpet.io import read_label_table

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects the object)
sm = snakemake  # noqa: F821
index = organ_indices(
    read_label_table(sm.input.labels_tsv), sm.params.organs, source=sm.input.labels_tsv
)
image = nib.load(sm.input.labels)
labels = np.asarray(image.dataobj)
voxel_mm = float(image.header.get_zooms()[2])
metrics = pd.read_csv(sm.input.metrics, sep="\t")
y = coronal_plane(labels, index)
coronal = {}
for path in sm.input.maps:
    name = path.rsplit("_desc-", 1)[1].split("_", 1)[0]
    if name != "Ki":  # the paper's four parameters
        coronal[name] = np.asarray(nib.load(path).dataobj[:, y, :], dtype=np.float32)
extents = z_extents(labels, index)
print(f"coronal plane y = {y}; organ extents (slices):\n{extents}", file=sys.stderr)
fig = cs_profile_figure(
    metrics, voxel_mm, extents, coronal, subject=f"{sm.params.subject}, {sm.params.ablation}"
)
save_figure(fig, sm.output.png)
save_figure(fig, sm.output.pdf)
