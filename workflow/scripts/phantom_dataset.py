"""dataset_description.json of the phantom dataset and of its two derivatives."""

from kinpet import simulation
from kinpet.io import write_json
from kinpet.readers import script_log

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
write_json(snakemake.output.raw, simulation.dataset_description())  # noqa: F821
for key, what in (("labels", "organ label maps"), ("truth", "true kinetic parameter maps")):
    write_json(
        snakemake.output[key],  # noqa: F821
        {
            "Name": f"kinpet phantom: {what}",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "kinpet", "Description": "kinpet.phantom"}],
        },
    )
