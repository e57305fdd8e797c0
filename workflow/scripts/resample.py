"""Read and validate one PET-BIDS subject; resample PET and labels to the configured voxel
size; write the input function and the frame sidecar beside them."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from kinpet.bids import read_pet_bids
from kinpet.io import (
    atomic_path,
    write_blood_tsv,
    write_json,
    write_nifti,
)
from kinpet.preprocessing import (
    canonical_grid,
    resample_to_spacing,
    slice_range_labels,
    voxel_volume_ml,
)
from kinpet.readers import script_log

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
params, out = snakemake.params, snakemake.output  # noqa: F821
subject = snakemake.wildcards.subject  # noqa: F821

# A KinpetInputError names the file and the problem: script_log writes it in one line.
# The labels the slice range needs (bladder and lungs, or preprocess.slice_range's organs)
# are checked here, before the slices job: a scan without them stops early, naming why.
bounds = params.get("bounds")
needs = slice_range_labels(None if bounds is None else tuple(bounds))
study = read_pet_bids(
    params.bids_root,
    subject,
    input_function=params.input_function,
    blood_recording=params.blood_recording,
    blood_column=params.blood_column,
    required_labels=tuple(needs),
    label_reasons=needs,
)
print(f"{study.pet_path}: {study.shape}, {study.units} -> kBq/mL", file=sys.stderr)

voxel = float(params.voxel_mm)
shape, affine = canonical_grid(study.shape, study.affine, voxel)
pet = np.empty((*shape, len(study.frames)), dtype=np.float32)
change = []
# Frame by frame: a whole-body 4-D image at 1.6 mm need not fit in memory.
for t, frame in enumerate(study.iter_frames()):
    # A PreprocessingError (e.g. an affine with shear) ends the script in one line too.
    pet[..., t] = resample_to_spacing(frame, study.affine, voxel, source=str(study.pet_path))[0]
    before = frame.sum(dtype=np.float64) * voxel_volume_ml(study.affine)
    after = pet[..., t].sum(dtype=np.float64) * voxel_volume_ml(affine)
    change.append((after - before) / before if before > 0 else 0.0)
labels = resample_to_spacing(study.labels, study.affine, voxel, "nearest")[0]
print(
    f"resampled to {shape} at {voxel} mm; total activity (sum of C x voxel volume) "
    f"changed by at most {max(change, key=abs):+.3%} in a frame",
    file=sys.stderr,
)

write_nifti(out.pet, pet, affine)
write_nifti(out.labels, labels, affine, dtype=np.int16)
table = pd.DataFrame({"index": list(study.label_names.values()), "name": list(study.label_names)})
with atomic_path(out.labels_tsv) as tmp:
    table.to_csv(tmp, sep="\t", index=False)

inp = study.input_function
if params.input_function == "aorta":
    description = "Image-derived input: mean of the aorta label per frame, at frame mid-times"
else:
    description = f"Blood recording {Path(inp.source).name} ({params.blood_column})"
# write_blood_tsv writes the .tsv and its .json beside it, each through a temporary name.
assert Path(out.blood_json) == Path(out.blood).with_suffix(".json")
write_blood_tsv(out.blood, inp, description=description)

sidecar = {
    **study.frames.to_bids(),
    "Units": "kBq/mL",
    "ImageDecayCorrected": True,
    "TracerName": study.sidecar.get("TracerName", "FDG"),
    "VoxelSize_mm": voxel,
    "Sources": [str(study.pet_path)],
    "InputFunction": description,
}
write_json(out.pet_json, sidecar)
print(json.dumps({"input_function": repr(inp)}), file=sys.stderr)
