"""Write a subject's 4-D image once as slices one after the other (uncompressed), so that
each fit_chunk job reads only its own slices (kinpet.voxelfit.write_slabs)."""

import sys

import numpy as np

from kinpet.readers import read_volume, script_log
from kinpet.voxelfit import write_slabs

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
sm = snakemake  # noqa: F821
# Read here, inside the check: a truncated or corrupt image is named in one line.
shape = write_slabs(read_volume(sm.input.pet, np.float32, ndim=4), sm.output.slabs)
print(f"{sm.input.pet} -> {sm.output.slabs}: [Z, X, Y, T] = {list(shape)}", file=sys.stderr)
