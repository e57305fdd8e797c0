import os
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

# Scripts import the kinpet package from src/, installed or not (e.g. in --use-conda
# environments or on cluster nodes sharing the checkout).
_SRC = str(Path(workflow.basedir) / "src")
os.environ.update(
    PYTHONPATH=os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH")) if p)
)


def phantom_subject_ids(subjects):
    """sub-01 ... sub-NN from a count, or the listed ids."""
    if isinstance(subjects, int):
        return [f"sub-{i:02d}" for i in range(1, subjects + 1)]
    return [str(s) for s in subjects]


wildcard_constraints:
    subject=r"sub-[0-9]+",
