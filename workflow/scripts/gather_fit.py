"""Assemble the fitted chunks of one subject and method into parametric NIfTI maps."""

import sys

import numpy as np

from kinpet.io import write_nifti
from kinpet.readers import read_nifti_header, read_npz, script_log
from kinpet.voxelfit import MAP_NAMES, gather_chunks

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
sm = snakemake  # noqa: F821
pet = read_nifti_header(sm.input.pet)
chunks, bounds, voxels = [], [], 0
for path in sm.input.chunks:
    data = read_npz(path, keys=("maps", "z", "voxels"))
    chunks.append(data["maps"])
    bounds.append(tuple(int(z) for z in data["z"]))
    voxels += int(data["voxels"])
volume = gather_chunks(chunks, bounds, pet.shape[:3])
for index, (name, path) in enumerate(zip(MAP_NAMES, sm.output.maps, strict=True)):
    assert f"desc-{name}_" in path
    write_nifti(path, volume[..., index], pet.affine, dtype=np.float32)
print(f"{len(chunks)} chunks, {voxels} voxels fitted", file=sys.stderr)
