"""Fit the voxels of one chunk of axial slices of one subject with one method."""

import sys

import nibabel as nib
import numpy as np
import torch

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import read_label_table, write_slices
from kinpet.voxelfit import (
    MAP_NAMES,
    chunk_bounds,
    covered_slices,
    figure_slice,
    fit_chunk,
    read_chunk,
)

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects the object)
sm = snakemake  # noqa: F821
torch.set_num_threads(sm.threads)
method, chunk = sm.wildcards.method, int(sm.wildcards.chunk)
pet_img = nib.load(sm.input.pet)
labels = np.asarray(nib.load(sm.input.labels).dataobj)
z0, z1 = chunk_bounds(labels.shape[2], sm.params.chunks, chunk)
spec = sm.params.slices  # the reference method's configured slices; "all" for the fast fitter
figure_z = (
    figure_slice(labels, read_label_table(sm.input.labels_tsv)) if spec == "figure4" else None
)
covered = covered_slices(labels.shape[2], spec, figure_z)
frames = FrameSchedule.from_bids_json(sm.input.pet_json)
inp = InputFunction.from_blood_tsv(sm.input.blood)
pet = read_chunk(pet_img, z0, z1)
mask = labels[:, :, z0:z1] > 0  # the body; outside it the maps stay NaN
options = {"weights": sm.params.weights, "sampling": sm.params.sampling}
if method == "curve_fit":
    options["n_jobs"] = sm.threads
maps, n = fit_chunk(pet, mask, 0, z1 - z0, covered[z0:z1], inp, frames, method, **options)
write_slices(
    sm.output[0], maps=maps, z=np.array([z0, z1]), voxels=np.array(n), names=np.array(MAP_NAMES)
)
print(f"{method} chunk {chunk}: slices {z0}-{z1}, {n} voxels fitted", file=sys.stderr)
