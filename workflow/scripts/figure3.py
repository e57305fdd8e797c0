"""Fig. 3: cosine similarity per axial slice of one test subject along the body axis, the
network's beside a voxel-wise fit's, with the organs' extents shaded, beside a coronal plane
of each parameter map of the kinetic model; and the mean CS over each organ's slices."""

import sys

import numpy as np
import pandas as pd

from kinpet.evaluation import coronal_plane, organ_indices, organ_slice_cs, z_extents
from kinpet.figures import cs_profile_figure, save_figure
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import atomic_path, read_label_table
from kinpet.kinetics import KineticModel
from kinpet.metrics import slice_metrics
from kinpet.models import get_model
from kinpet.readers import read_nifti_header, read_table, read_volume, script_log
from kinpet.settings import settings_from_config

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
sm = snakemake  # noqa: F821
label_names = read_label_table(sm.input.labels_tsv)
index = organ_indices(label_names, sm.params.organs, source=sm.input.labels_tsv)
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

# The fit's curves scored on the network's pixels: the same mask (the training settings')
# and the same slices, with the fit's own kinetic model sampling.
settings = settings_from_config(sm.params.training, sm.params.training_underneath)
spec = get_model(sm.params.model)
fit_params = np.stack(
    [read_volume(path, np.float32, ndim=3) for path in sm.input.fit_maps], axis=-1
)
kinetic = KineticModel(
    InputFunction.from_blood_tsv(sm.input.blood),
    FrameSchedule.from_bids_json(sm.input.pet_json),
    sm.params.fit_sampling,
)


def fit_curves(z):
    return spec.curves(np.nan_to_num(fit_params[:, :, z], nan=0.01), kinetic)


pet = read_volume(sm.input.pet, np.float32, ndim=4)
fit_cs = pd.DataFrame(
    slice_metrics(
        pet, fit_curves, labels, kinetic.frames, settings.mask_threshold, settings.mask_auc
    )
)
method = sm.params.fit_method
fig = cs_profile_figure(
    metrics,
    voxel_mm,
    extents,
    coronal,
    subject=f"{sm.params.subject}, {sm.params.ablation}",
    fit=(method, fit_cs),
)
# The organ comparison also covers the heart where the subject has one (the paper's drop).
summary_organs = {**index, **({"heart": label_names["heart"]} if "heart" in label_names else {})}
summary = organ_slice_cs(z_extents(labels, summary_organs), {"network": metrics, method: fit_cs})
print(f"mean CS over each organ's slices:\n{summary}", file=sys.stderr)
with atomic_path(sm.output.organ_cs) as tmp:
    summary.to_csv(tmp, index=False, float_format="%.4f")
save_figure(fig, sm.output.png)
save_figure(fig, sm.output.pdf)
