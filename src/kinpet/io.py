"""Reading and writing files: PET-BIDS sidecars and blood recordings, organ value tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import PARAMETER_NAMES


class KinpetInputError(ValueError):
    """An input file is missing or malformed; the message names the file."""


def frames_from_spec(spec: str) -> FrameSchedule:
    """A frame schedule from a config value: ``"paper"`` or the path of a ``_pet.json``."""
    if spec == "paper":
        return FrameSchedule.paper()
    return FrameSchedule.from_bids_json(spec)


def write_blood_tsv(path, input_function: InputFunction, description: str = "") -> None:
    """Write an input function as a PET-BIDS blood recording (``.tsv`` plus ``.json``).

    Values go in the ``whole_blood_radioactivity`` column, in kBq/ml.
    """
    path = Path(path)
    table = pd.DataFrame(
        {"time": input_function.times_s, "whole_blood_radioactivity": input_function.values}
    )
    table.to_csv(path, sep="\t", index=False, float_format="%.10g")
    meta = {
        "Description": description or "Arterial input function",
        "PlasmaAvail": False,
        "WholeBloodAvail": True,
        "MetaboliteAvail": False,
        "DispersionCorrected": False,
        "time": {"Description": "Time after injection", "Units": "s"},
        "whole_blood_radioactivity": {
            "Description": "Radioactivity concentration in whole blood",
            "Units": "kBq/mL",
        },
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def read_organ_values(path) -> pd.DataFrame:
    """Read a TSV of organ parameters (columns organ, K1, k2, k3, Vb) with checks."""
    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t")
    except FileNotFoundError:
        raise KinpetInputError(f"{path}: file not found") from None
    missing = [c for c in ("organ", *PARAMETER_NAMES) if c not in table.columns]
    if missing:
        raise KinpetInputError(f"{path}: missing column(s) {', '.join(missing)}")
    values = table[list(PARAMETER_NAMES)]
    if not np.isfinite(values.to_numpy(dtype=float)).all():
        raise KinpetInputError(f"{path}: organ values must be finite numbers")
    if (values.to_numpy(dtype=float) < 0).any():
        raise KinpetInputError(f"{path}: organ values must be >= 0")
    return table
