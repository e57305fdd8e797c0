"""Assemble the fitted chunks of one subject and method into parametric NIfTI maps, one
per map name that the chunks carry (the fitted model's)."""

import sys

import numpy as np

from kinpet.io import KinpetInputError, write_nifti
from kinpet.readers import read_nifti_header, read_npz, script_log
from kinpet.voxelfit import gather_chunks

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
sm = snakemake  # noqa: F821
pet = read_nifti_header(sm.input.pet)
chunks, bounds, voxels, names = [], [], 0, None
for path in sm.input.chunks:
    data = read_npz(path, keys=("maps", "z", "voxels", "names"))
    chunks.append(data["maps"])
    bounds.append(tuple(int(z) for z in data["z"]))
    voxels += int(data["voxels"])
    these = [str(n) for n in data["names"]]
    if names is not None and these != names:
        raise KinpetInputError(f"{path}: maps {these} differ from the other chunks' {names}")
    names = these
wanted = [path.rsplit("_desc-", 1)[1].split("_", 1)[0] for path in sm.output.maps]
if names != wanted:
    raise KinpetInputError(
        f"{sm.input.chunks[0]}: the chunks hold maps {names}, the rule wants {wanted} "
        "(fitted with another model: rerun fit_chunk)"
    )
volume = gather_chunks(chunks, bounds, pet.shape[:3])
for index, path in enumerate(sm.output.maps):
    write_nifti(path, volume[..., index], pet.affine, dtype=np.float32)
print(f"{len(chunks)} chunks, {voxels} voxels fitted", file=sys.stderr)
