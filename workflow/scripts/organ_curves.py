"""Model curves of each organ in every sampling mode, as one long table."""

import sys

import pandas as pd

from kinpet.inputfunction import InputFunction
from kinpet.io import frames_from_spec, read_organ_values
from kinpet.kinetics import PARAMETER_NAMES, SAMPLING_MODES, irreversible_2tc
from kinpet.readers import script_log

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
frames = frames_from_spec(snakemake.params.frames)  # noqa: F821
inp = InputFunction.from_blood_tsv(snakemake.input.blood)  # noqa: F821
organs = read_organ_values(snakemake.input.organs)  # noqa: F821
params = organs[list(PARAMETER_NAMES)].to_numpy(dtype=float)
rows = []
for sampling in SAMPLING_MODES:
    curves = irreversible_2tc(params, inp, frames, sampling=sampling)
    for organ, curve in zip(organs["organ"], curves, strict=True):
        rows.append(
            pd.DataFrame(
                {
                    "organ": organ,
                    "sampling": sampling,
                    "frame": range(len(frames)),
                    "frame_start_s": frames.starts_s,
                    "frame_duration_s": frames.durations_s,
                    "activity_kbq_per_ml": curve,
                }
            )
        )
pd.concat(rows).to_csv(snakemake.output[0], sep="\t", index=False, float_format="%.8g")  # noqa: F821
print(f"{len(organs)} organs x {len(SAMPLING_MODES)} sampling modes", file=sys.stderr)
