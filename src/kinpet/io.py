"""Reading and writing files: organ value tables, label tables, blood recordings, region
curves, preprocessed outputs, deterministic NIfTI/JSON/TSV writers (PET-BIDS datasets are
read by :mod:`kinpet.bids`)."""

from __future__ import annotations

import gzip
import json
import os
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

# atomic_path is re-exported ("as"): the writers import it from kinpet.io.
from kinpet.atomic import atomic_path as atomic_path
from kinpet.atomic import new_temporary
from kinpet.frames import FrameSchedule, check_scan_length
from kinpet.inputfunction import InputFunction, units_to_kbq_per_ml

# Images may have slightly negative voxels (noise in short frames of some reconstructions);
# they are kept as they are (clipping would bias low-activity regions upwards). An image
# whose minimum is below -NEGATIVE_TOLERANCE x its maximum is rejected (kinpet.bids), and a
# region curve that far below 0 is flagged (fit-tacs): that is not noise but a wrong scale,
# an offset or a corrupt file.
NEGATIVE_TOLERANCE = 0.05


class KinpetInputError(ValueError):
    """An input file is missing or malformed; the message names the file."""


# What reading a truncated or damaged gzip or zip stream raises: the decompressors' own
# errors (EOFError, zlib.error, BadZipFile) and the parsers' when they meet garbage.
_CORRUPT_ERRORS = (EOFError, OSError, zlib.error, zipfile.BadZipFile, ValueError, KeyError)


@contextmanager
def _naming_corrupt_file(path, what: str = ""):
    """Turn a decompression or parse error while reading ``path`` into a
    :class:`KinpetInputError` that names the file."""
    try:
        yield
    except KinpetInputError:
        raise
    except _CORRUPT_ERRORS as err:
        detail = f"{what}: " if what else ""
        raise KinpetInputError(
            f"{path}: truncated or corrupt file ({detail}{type(err).__name__}: {err})"
        ) from None


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
    # Both files through temporaries: the .json lands first, the .tsv (the output that
    # Snakemake rules name first) last.
    with atomic_path(path) as tmp, atomic_path(path.with_suffix(".json")) as tmp_json:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.10g")
        tmp_json.write_text(json.dumps(meta, indent=2) + "\n")


def read_organ_values(path) -> pd.DataFrame:
    """Read a TSV of organ parameters (columns organ, K1, k2, k3, Vb) with checks.

    Optional columns give an organ its own input (``kinpet.organinput.INPUT_COLUMNS``:
    delay_s, dispersion_s, arterial_fraction, portal_transit_s; empty cells take the
    arterial input's values).
    """
    # Imported here: kinetics needs torch, which the PET-BIDS readers do not.
    from kinpet.kinetics import PARAMETER_NAMES

    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t")
    except FileNotFoundError:
        raise KinpetInputError(f"{path}: file not found") from None
    except Exception as err:  # noqa: BLE001 - pandas raises many parser errors
        raise KinpetInputError(f"{path}: cannot read as TSV ({err})") from None
    missing = [c for c in ("organ", *PARAMETER_NAMES) if c not in table.columns]
    if missing:
        raise KinpetInputError(f"{path}: missing column(s) {', '.join(missing)}")
    values = table[list(PARAMETER_NAMES)].apply(pd.to_numeric, errors="coerce")
    if not np.isfinite(values.to_numpy(dtype=float)).all():
        raise KinpetInputError(f"{path}: organ values must be finite numbers")
    if (values.to_numpy(dtype=float) < 0).any():
        raise KinpetInputError(f"{path}: organ values must be >= 0")
    check_organ_inputs(path, table)
    return table


def check_organ_inputs(path, table: pd.DataFrame) -> None:
    """Check an organ table's optional input columns (:mod:`kinpet.organinput`)."""
    from kinpet.organinput import INPUT_COLUMNS, organ_inputs

    for name in INPUT_COLUMNS:
        if name in table.columns:
            column = pd.to_numeric(table[name], errors="coerce")
            bad = column.isna() & table[name].notna()
            if bad.any():
                organ = table["organ"][bad].iloc[0]
                raise KinpetInputError(
                    f"{path}: {name} of {organ} is not a number ({table[name][bad].iloc[0]!r})"
                )
            table[name] = column
    try:
        organ_inputs(table)
    except ValueError as err:
        raise KinpetInputError(f"{path}: {err}") from None


def read_label_table(path) -> dict:
    """Read a ``_dseg.tsv`` (columns ``index``, ``name``) as a dict name -> index."""
    path = Path(path)
    if not path.exists():
        raise KinpetInputError(f"{path}: file not found")
    try:
        table = pd.read_csv(path, sep="\t")
    except Exception as err:  # noqa: BLE001
        raise KinpetInputError(f"{path}: cannot read as TSV ({err})") from None
    missing = [c for c in ("index", "name") if c not in table.columns]
    if missing:
        raise KinpetInputError(f"{path}: missing column(s) {', '.join(missing)}")
    try:
        index = table["index"].to_numpy(dtype=np.int64)
    except (TypeError, ValueError):
        raise KinpetInputError(f"{path}: the index column must hold integers") from None
    names = table["name"].astype(str).str.strip().tolist()
    for what, values in (("index", list(index)), ("name", names)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise KinpetInputError(f"{path}: repeated {what} {', '.join(repeated)}")
    return {name: int(i) for name, i in zip(names, index, strict=True)}


# -- writing, atomically (kinpet.atomic) ---------------------------------------------------


def write_nifti(path, data, affine, dtype=None) -> None:
    """Write an array with its voxel-to-world affine as NIfTI (atomically)."""
    data = np.asarray(data if dtype is None else np.asarray(data, dtype=dtype))
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(data.dtype)
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


def write_json(path, meta: dict) -> None:
    """Write a JSON sidecar (atomically)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")


def write_slices(path, **arrays) -> None:
    """Write the slice dataset of one subject as a compressed ``.npz`` (atomically)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        np.savez_compressed(out, **arrays)


SLICE_KEYS = ("tacs", "labels", "z", "crop", "frame_start_s", "frame_duration_s", "subject")


def read_slices(path) -> dict:
    """Read a subject's slice dataset (``results/slices/sub-XX.npz``) as a dict of arrays.

    Keys: ``tacs`` [S, T, H, W] float32 kBq/ml, ``labels`` [S, H, W] int16, ``z`` [S],
    ``crop`` [2] (x0, y0), ``frame_start_s`` [T], ``frame_duration_s`` [T], ``subject``
    (str), ``shape`` [3] and ``affine`` [4, 4] of the 2.5-mm grid, ``label_index`` and
    ``label_name`` (the label table).
    """
    from kinpet.readers import read_npz

    out = read_npz(path)
    missing = [k for k in SLICE_KEYS if k not in out]
    if missing:
        raise KinpetInputError(f"{path}: missing array(s) {', '.join(missing)}")
    out["subject"] = str(out["subject"])
    return out


# -- deterministic NIfTI, JSON and TSV writers ------------------------------------------------
# Every writer goes through a temporary name and renames at the end (never a half-written
# output) and writes the same bytes for the same data: gzip streams get mtime 0 and no
# file name.

_NIFTI_VOX_OFFSET = 352  # 348-byte header + 4-byte (empty) extension flag


def nifti_header(shape, affine, dtype, frames: FrameSchedule | None = None):
    """A NIfTI-1 header (mm, s) for an image of ``shape`` (x, y, z[, t]) and ``affine``."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(tuple(int(n) for n in shape))
    header.set_data_dtype(dtype)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    if frames is not None and len(shape) == 4:
        zooms = list(header.get_zooms())
        # pixdim[4]: the frames are not equally long; 0 says "no fixed step".
        header.set_zooms((*zooms[:3], 0.0))
    header["vox_offset"] = _NIFTI_VOX_OFFSET
    return header


class NiftiFrameWriter:
    """Stream a 4D NIfTI-1 ``.nii.gz`` frame by frame (constant memory).

    A NIfTI volume of shape (x, y, z) is stored x fastest, which is the C order of a
    [z, y, x] array: :meth:`write` takes one frame as a [z, y, x] array.
    """

    def __init__(self, path, header, compresslevel: int = 1):
        self.path = Path(path)
        self.header = header
        self.dtype = header.get_data_dtype()
        self.shape = header.get_data_shape()
        self.frames_written = 0
        self._tmp = new_temporary(self.path)
        self._raw = open(self._tmp, "wb")
        self._gz = gzip.GzipFile(
            filename="", mode="wb", fileobj=self._raw, compresslevel=compresslevel, mtime=0
        )
        raw_header = header.binaryblock
        self._gz.write(raw_header + b"\0" * (_NIFTI_VOX_OFFSET - len(raw_header)))

    def write(self, frame_zyx: np.ndarray) -> None:
        nx, ny, nz = self.shape[:3]
        if frame_zyx.shape != (nz, ny, nx):
            raise ValueError(f"frame shape {frame_zyx.shape} is not (z, y, x) = {(nz, ny, nx)}")
        self._gz.write(np.ascontiguousarray(frame_zyx, dtype=self.dtype).tobytes())
        self.frames_written += 1

    def close(self, ok: bool = True) -> None:
        self._gz.close()
        self._raw.close()
        if ok and self.frames_written == self.shape[3]:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)
            if ok:
                raise ValueError(f"{self.path}: {self.frames_written} of {self.shape[3]} frames")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(ok=exc_type is None)


def write_nifti_zyx(path, volume_zyx: np.ndarray, affine, compresslevel: int = 6) -> None:
    """Write a 3D volume given as a C-ordered [z, y, x] array as a NIfTI image (x, y, z)."""
    path = Path(path)
    nz, ny, nx = volume_zyx.shape
    header = nifti_header((nx, ny, nz), affine, volume_zyx.dtype)
    raw_header = header.binaryblock
    payload = raw_header + b"\0" * (_NIFTI_VOX_OFFSET - len(raw_header))
    payload += np.ascontiguousarray(volume_zyx, dtype=header.get_data_dtype()).tobytes()
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(payload, compresslevel=compresslevel, mtime=0))


def write_tsv(path, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.10g")


def write_label_table(path, labels: dict) -> None:
    """A label lookup table (TSV with columns index, name)."""
    write_tsv(path, pd.DataFrame({"index": list(labels), "name": list(labels.values())}))


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
        other = {"s": "min", "min": "s"}[time_units]
        try:
            frames = FrameSchedule(starts, durations, source=str(path))
            check_scan_length(
                frames,
                f"columns {time_col!r} and {duration_col!r} read as {time_units}: if they are "
                f"in {other}, give --time-units {other}",
            )
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
            inp.check_not_zero()
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
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep=sep, index=False, float_format="%.6g")
