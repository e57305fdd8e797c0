"""Write the configured model input function as a PET-BIDS blood recording."""

import sys

from kinpet.inputfunction import InputFunction
from kinpet.io import frames_from_spec, write_blood_tsv

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects the object)
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
