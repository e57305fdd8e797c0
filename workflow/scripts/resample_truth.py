"""The phantom's true parameter maps on the subject's 2.5-mm grid (linear interpolation,
as the PET), so that they compare voxel by voxel with the estimated maps."""

import sys

import numpy as np

from kinpet.io import KinpetInputError, write_nifti
from kinpet.preprocessing import resample_to_spacing
from kinpet.readers import read_nifti_header, read_volume, script_log

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
sm = snakemake  # noqa: F821
pet = read_nifti_header(sm.input.pet)
for source, target in zip(sm.input.truth, sm.output, strict=True):
    volume, affine = resample_to_spacing(
        read_volume(source, np.float32, ndim=3),
        read_nifti_header(source).affine,
        sm.params.voxel_mm,
        "linear",
        source=source,
    )
    if volume.shape != pet.shape[:3] or not np.allclose(affine, pet.affine, atol=1e-3):
        raise KinpetInputError(
            f"{source}: resampled to {volume.shape}, not the grid {pet.shape[:3]} of "
            f"{sm.input.pet} (the truth must be on the simulated PET's grid)"
        )
    write_nifti(target, volume, pet.affine, dtype=np.float32)
    print(f"{source} -> {target}", file=sys.stderr)
