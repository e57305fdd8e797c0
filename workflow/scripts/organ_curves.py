"""Model curves of each organ in every sampling mode, as one long table.

Each organ's curve uses the input it sees (the organ table's optional input columns,
kinpet.organinput), as the phantom simulates it."""

import sys

import pandas as pd

from kinpet.inputfunction import InputFunction
from kinpet.io import frames_from_spec, read_organ_values
from kinpet.kinetics import PARAMETER_NAMES, SAMPLING_MODES, irreversible_2tc
from kinpet.organinput import organ_input_function, organ_inputs
from kinpet.readers import script_log

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
frames = frames_from_spec(snakemake.params.frames)  # noqa: F821
inp = InputFunction.from_blood_tsv(snakemake.input.blood)  # noqa: F821
organs = read_organ_values(snakemake.input.organs)  # noqa: F821
params = organs[list(PARAMETER_NAMES)].to_numpy(dtype=float)
seen = {name: organ_input_function(inp, i) for name, i in organ_inputs(organs).items()}
rows = []
for sampling in SAMPLING_MODES:
    for organ, p in zip(organs["organ"], params, strict=True):
        curve = irreversible_2tc(p, seen[str(organ)], frames, sampling=sampling)
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
