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


# -- region curves for fitting (kinpet fit-tacs) -------------------------------------------

# Column-name suffixes that state a concentration unit, e.g. "liver_bq_per_ml".
_UNIT_SUFFIXES = {"_kbq_per_ml": "kBq/ml", "_mbq_per_ml": "MBq/ml", "_bq_per_ml": "Bq/ml"}
_INPUT_HINTS = ("aorta", "input", "blood", "aif", "idif", "plasma")


def _read_table(path) -> pd.DataFrame:
    path = Path(path)
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        table = pd.read_csv(path, sep=sep, comment="#")
    except FileNotFoundError:
        raise KinpetInputError(f"{path}: file not found") from None
    except Exception as err:  # noqa: BLE001 - pandas raises many parser errors
        raise KinpetInputError(f"{path}: cannot read as a table ({err})") from None
    if table.empty:
        raise KinpetInputError(f"{path}: the table has no rows")
    return table


def _column_units(path, column: str, units: str | None) -> float:
    """Factor to kBq/ml for a column: from ``units`` or from the column name's suffix."""
    from kinpet.inputfunction import units_to_kbq_per_ml

    if units is None:
        for suffix, unit in _UNIT_SUFFIXES.items():
            if column.lower().endswith(suffix):
                units = unit
                break
        else:
            raise KinpetInputError(
                f"{path}: units of column {column!r} unknown: name it *_bq_per_ml or "
                "*_kbq_per_ml, or give --units (e.g. Bq/ml)"
            )
    try:
        return units_to_kbq_per_ml(units, source=str(path))
    except ValueError as err:
        raise KinpetInputError(str(err)) from None


def _numeric(path, table: pd.DataFrame, column: str) -> np.ndarray:
    if column not in table.columns:
        raise KinpetInputError(
            f"{path}: no column {column!r} (columns: {', '.join(map(str, table.columns))})"
        )
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(np.isnan(values) & table[column].notna().to_numpy())
    if bad.size:
        value = table[column].iloc[bad[0]]
        raise KinpetInputError(
            f"{path}: column {column!r} row {bad[0] + 1}: not a number {value!r}"
        )
    return values


def read_region_curves(
    path,
    tissue_cols=None,
    time_col: str = "frame_start_s",
    duration_col: str = "frame_duration_s",
    input_col: str | None = "auto",
    units: str | None = None,
    time_units: str = "s",
    frames: FrameSchedule | None = None,
):
    """Read region time-activity curves (one row per frame) from a TSV or CSV file.

    Parameters
    ----------
    path : path-like
        The table; ``.csv`` is read comma-separated, anything else tab-separated.
    tissue_cols : list of str, optional
        Region columns; default every column that is not time, duration or input.
    time_col, duration_col : str
        Frame start and duration columns (ignored when ``frames`` is given).
    input_col : str or None
        The image-derived input column, sampled per frame and used at frame mid-times;
        ``"auto"`` picks the one column whose name contains aorta/input/blood/aif/idif;
        ``None`` when the input comes from elsewhere (a PET-BIDS blood recording).
    units : str, optional
        Units of the activity columns (Bq/ml, kBq/ml, ...); default from a column-name
        suffix such as ``_bq_per_ml``. Values are converted to kBq/ml.
    time_units : {"s", "min"}
    frames : FrameSchedule, optional
        The frame schedule when it comes from a PET-BIDS ``_pet.json``.

    Returns
    -------
    frames : FrameSchedule
    input_function : InputFunction or None
    names : list of str
    curves : numpy.ndarray, shape [n_regions, n_frames], kBq/ml
    """
    path = Path(path)
    table = _read_table(path)
    if frames is None:
        factor = {"s": 1.0, "min": 60.0}.get(time_units)
        if factor is None:
            raise KinpetInputError(f"time units must be s or min, not {time_units!r}")
        starts = _numeric(path, table, time_col) * factor
        durations = _numeric(path, table, duration_col) * factor
        try:
            frames = FrameSchedule(starts, durations, source=str(path))
        except ValueError as err:
            raise KinpetInputError(str(err)) from None
        used = [time_col, duration_col]
    else:
        if len(table) != len(frames):
            raise KinpetInputError(
                f"{path}: {len(table)} rows but the frame schedule has {len(frames)} frames"
            )
        used = [c for c in (time_col, duration_col) if c in table.columns]
    if input_col == "auto":
        hits = [c for c in table.columns if any(h in str(c).lower() for h in _INPUT_HINTS)]
        hits = [c for c in hits if c not in used]
        if len(hits) != 1:
            raise KinpetInputError(
                f"{path}: cannot tell the input column ({'none' if not hits else ', '.join(hits)} "
                "match aorta/input/blood/aif/idif): give --input-col"
            )
        input_col = hits[0]
    inp = None
    if input_col is not None:
        values = _numeric(path, table, input_col) * _column_units(path, input_col, units)
        if not np.isfinite(values).all():
            raise KinpetInputError(f"{path}: input column {input_col!r} has missing values")
        try:
            inp = InputFunction(frames.mids_s, values, source=f"{path}:{input_col}")
        except ValueError as err:
            raise KinpetInputError(str(err)) from None
        used.append(input_col)
    if tissue_cols is None:
        tissue_cols = [c for c in table.columns if c not in used]
    if not tissue_cols:
        raise KinpetInputError(f"{path}: no tissue columns to fit")
    curves = np.stack(
        [_numeric(path, table, c) * _column_units(path, c, units) for c in tissue_cols]
    )
    return frames, inp, [str(c) for c in tissue_cols], curves


def write_table_atomic(path, table: pd.DataFrame) -> None:
    """Write a TSV (or CSV for ``.csv``) in one piece: never a half-written file."""
    path = Path(path)
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        table.to_csv(tmp, sep=sep, index=False, float_format="%.6g")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
