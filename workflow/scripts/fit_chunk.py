"""Fit the voxels of one chunk of axial slices of one subject with one method and the
configured kinetic model (``model:``).

The image is read from the subject's slab file (rule fit_slabs): only the chunk's slices.
"""

import sys

import numpy as np
import pandas as pd
import torch

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import KinpetInputError, atomic_path, read_label_table, write_slices
from kinpet.models import get_model, map_names
from kinpet.readers import read_volume, script_log
from kinpet.voxelfit import (
    chunk_bounds,
    covered_slices,
    figure_slice,
    fit_chunk,
    read_slab,
)

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
sm = snakemake  # noqa: F821
torch.set_num_threads(sm.threads)
method, chunk = sm.wildcards.method, int(sm.wildcards.chunk)
labels = read_volume(sm.input.labels, ndim=3)
z0, z1 = chunk_bounds(labels.shape[2], sm.params.chunks, chunk)
spec = sm.params.slices  # the reference method's configured slices; "all" for the fast fitter
figure_z = (
    figure_slice(labels, read_label_table(sm.input.labels_tsv)) if spec == "figure4" else None
)
covered = covered_slices(labels.shape[2], spec, figure_z)
frames = FrameSchedule.from_bids_json(sm.input.pet_json)
inp = InputFunction.from_blood_tsv(sm.input.blood)
pet = read_slab(sm.input.slabs, z0, z1)
if pet.shape[:3] != (*labels.shape[:2], z1 - z0):
    raise KinpetInputError(f"{sm.input.slabs}: slices of shape {pet.shape} do not match the labels")
mask = labels[:, :, z0:z1] > 0  # the body; outside it the maps stay NaN
options = {"weights": sm.params.weights, "sampling": sm.params.sampling}
if method == "curve_fit":
    options["n_jobs"] = sm.threads
timing = {}
model = sm.params.model
maps, n = fit_chunk(
    pet, mask, 0, z1 - z0, covered[z0:z1], inp, frames, method, timing, model, **options
)
names = np.array(map_names(get_model(model)))
write_slices(sm.output.maps, maps=maps, z=np.array([z0, z1]), voxels=np.array(n), names=names)
with atomic_path(sm.output.fit_time) as tmp:  # the fitter's own wall time (runtime table)
    pd.DataFrame({"voxels": [n], "fit_s": [timing["fit_s"]]}).to_csv(tmp, sep="\t", index=False)
print(
    f"{model}, {method} chunk {chunk}: slices {z0}-{z1}, {n} voxels fitted in "
    f"{timing['fit_s']:.3f} s",
    file=sys.stderr,
)
