"""Cut the axial slices of one subject (bladder to lungs, or preprocess.slice_range), cropped
around the body."""

import sys

import numpy as np

from kinpet.frames import FrameSchedule
from kinpet.io import read_label_table, write_slices
from kinpet.preprocessing import centre_crop_offsets, extract_slices, slice_range
from kinpet.readers import read_nifti_header, read_volume, script_log

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
params, inp = snakemake.params, snakemake.input  # noqa: F821
subject = snakemake.wildcards.subject  # noqa: F821

labels = read_volume(inp.labels, np.int16, ndim=3)
affine = read_nifti_header(inp.labels).affine
names = read_label_table(inp.labels_tsv)
frames = FrameSchedule.from_bids_json(inp.pet_json)
slice_mm = float(np.linalg.norm(affine[:3, 2]))
crop = tuple(int(c) for c in params.crop)
# A PreprocessingError (no lungs, too few slices) ends the script in one line (script_log).
# preprocess.slice_range, when given, replaces the bladder-to-lungs range.
bounds = params.get("bounds")
z = slice_range(
    labels,
    names,
    slice_mm,
    params.margins_mm,
    params.n_slices,
    source=inp.labels,
    bounds=None if bounds is None else tuple(bounds),
    z0_mm=float(affine[2, 3]),
)
offsets = centre_crop_offsets(labels, z, crop, names.get("background", 0))

# Read only the slab of slices that is needed.
slab = read_volume(inp.pet, np.float32, slab=np.s_[:, :, z.min() : z.max() + 1, :], ndim=4)
tacs, slice_labels = extract_slices(
    slab, labels[:, :, z.min() : z.max() + 1], z - z.min(), offsets, crop
)
write_slices(
    snakemake.output[0],  # noqa: F821
    tacs=tacs,
    labels=slice_labels,
    z=z.astype(np.int64),
    crop=np.array(offsets, dtype=np.int64),
    frame_start_s=frames.starts_s,
    frame_duration_s=frames.durations_s,
    subject=np.array(subject),
    shape=np.array(labels.shape, dtype=np.int64),
    affine=affine,
    label_index=np.array(list(names.values()), dtype=np.int64),
    label_name=np.array(list(names)),
)
print(
    f"{subject}: {z.size} slices (z {z.min()}..{z.max()}), crop {crop} at x0, y0 = {offsets}, "
    f"{len(frames)} frames",
    file=sys.stderr,
)
