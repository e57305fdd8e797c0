"""Write the configured model input function as a PET-BIDS blood recording."""

import sys

from kinpet.inputfunction import InputFunction
from kinpet.io import frames_from_spec, write_blood_tsv
from kinpet.readers import script_log

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
spec = snakemake.params.input_function  # noqa: F821
frames = frames_from_spec(snakemake.params.frames)  # noqa: F821
inp = InputFunction.feng(
    peak_kbq_per_ml=spec.get("peak_kbq_per_ml", 250.0),
    delay_s=spec.get("delay_s", 0.0),
    end_s=frames.end_s,
)
write_blood_tsv(
    snakemake.output.tsv,  # noqa: F821
    inp,
    description=f"Feng et al. 1993 model 2, peak {spec.get('peak_kbq_per_ml')} kBq/ml, "
    f"delay {spec.get('delay_s')} s",
)
print(inp, file=sys.stderr)
