"""Whole-body parametric images of one subject from a trained network (one map per
parameter and macro-parameter of the kinetic model it was trained with), and per-slice
metrics."""

import sys
import time

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import KinpetInputError, atomic_path
from kinpet.kinetics import KineticModel
from kinpet.metrics import slice_metrics
from kinpet.models import get_model, parameter_map_names
from kinpet.prediction import predict_volume, volume_slices
from kinpet.readers import read_nifti_header, read_npz, read_volume, script_log
from kinpet.refinement import refine
from kinpet.training import SliceSet, load_model, subject_projection, subject_scale

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
sm = snakemake  # noqa: F821
torch.set_num_threads(sm.threads)
model, settings = load_model(sm.input.checkpoint)
device = next(model.parameters()).device
print(f"device: {device}; model {settings.model}", file=sys.stderr)
# The checkpoint's model names the maps: a rule that asks for another model's is refused.
spec = get_model(settings.model)
names = list(parameter_map_names(spec))
wanted = [path.rsplit("_desc-", 1)[1].split("_", 1)[0] for path in sm.output.maps]
if sorted(wanted) != sorted(names):
    raise KinpetInputError(
        f"{sm.input.checkpoint}: trained with model {spec.name} (maps {names}), but the rule "
        f"wants maps {wanted}: retrain with the configured model"
    )
pet_affine = read_nifti_header(sm.input.pet).affine
pet = read_volume(sm.input.pet, np.float32, ndim=4)
labels = read_volume(sm.input.labels, ndim=3)
frames = FrameSchedule.from_bids_json(sm.input.pet_json)
input_function = InputFunction.from_blood_tsv(sm.input.blood)
body = labels > 0
scale = subject_scale(input_function, frames, settings.scaling)
if sm.params.refine_steps:
    # Self-supervised refinement on this subject's own body slices before predicting.
    body_z = np.flatnonzero(body.any(axis=(0, 1)))
    own = SliceSet.from_subjects(
        [volume_slices(pet[:, :, body_z])],
        [input_function],
        frames,
        settings.sampling,
        settings.scaling,
    )
    started = time.perf_counter()
    model, losses = refine(
        model,
        own,
        settings,
        sm.params.refine_steps,
        sm.params.refine_learning_rate,
        seed=settings.seed,
        stream=sys.stderr,
    )
    print(f"refinement: {time.perf_counter() - started:.1f} s", file=sys.stderr)
projection = subject_projection(input_function, frames, settings)
maps = predict_volume(
    model, pet, stream=sys.stderr, scale=scale, projection=projection, kinetic_model=spec.name
)
maps[~body] = np.nan  # outside the body there is nothing to model

# Per-slice agreement of measured and model TACs over the masked pixels (Fig. 3a), with
# the kinetic model and the mask the network was trained with, in both test domains
# (kinpet.metrics.domain_mask): kinpet's (z, pixels, cs, mae: the whole plane, body
# pixels) for every slice, and the published test's (paper_pixels, paper_cs, paper_mae:
# the crop, any label) for the slices of the slice dataset. Table 1 reads the configured
# one, so changing evaluation.test_domain reruns no prediction.
data = read_npz(sm.input.slices, keys=("z", "crop"))
dataset_z, (x0, y0) = set(data["z"].tolist()), data["crop"].tolist()
window = ((x0, x0 + int(sm.params.crop[0])), (y0, y0 + int(sm.params.crop[1])))
kinetic = KineticModel(input_function, frames, settings.sampling)


def network_curves(z):
    return spec.curves(np.nan_to_num(maps[:, :, z, : len(spec.parameters)], nan=0.01), kinetic)


metrics = slice_metrics(
    pet,
    network_curves,
    labels,
    frames,
    settings.mask_threshold,
    settings.mask_auc,
    paper=(window, dataset_z),
)
table = pd.DataFrame(metrics)
with atomic_path(sm.output.metrics) as tmp:
    table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")

for name, path in zip(wanted, sm.output.maps, strict=True):
    img = nib.Nifti1Image(maps[..., names.index(name)], pet_affine)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
print(f"wrote {len(sm.output.maps)} maps; mean CS {np.nanmean(table.cs):.3f}", file=sys.stderr)
