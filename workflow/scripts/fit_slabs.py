"""Write a subject's 4-D image once as slices one after the other (uncompressed), so that
each fit_chunk job reads only its own slices (kinpet.voxelfit.write_slabs)."""

import sys

import nibabel as nib

from kinpet.voxelfit import write_slabs

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects the object)
sm = snakemake  # noqa: F821
shape = write_slabs(nib.load(sm.input.pet), sm.output.slabs)
print(f"{sm.input.pet} -> {sm.output.slabs}: [Z, X, Y, T] = {list(shape)}", file=sys.stderr)
