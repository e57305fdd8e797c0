"""Assemble the fitted chunks of one subject and method into parametric NIfTI maps."""

import sys

import nibabel as nib
import numpy as np

from kinpet.io import write_nifti
from kinpet.voxelfit import MAP_NAMES, gather_chunks

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects the object)
sm = snakemake  # noqa: F821
pet = nib.load(sm.input.pet)
chunks, bounds, voxels = [], [], 0
for path in sm.input.chunks:
    with np.load(path) as data:
        chunks.append(data["maps"])
        bounds.append(tuple(int(z) for z in data["z"]))
        voxels += int(data["voxels"])
volume = gather_chunks(chunks, bounds, pet.shape[:3])
for index, (name, path) in enumerate(zip(MAP_NAMES, sm.output.maps, strict=True)):
    assert f"desc-{name}_" in path
    write_nifti(path, volume[..., index], pet.affine, dtype=np.float32)
print(f"{len(chunks)} chunks, {voxels} voxels fitted", file=sys.stderr)
