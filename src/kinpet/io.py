"""Reading and writing files: PET-BIDS sidecars and blood recordings, organ value tables."""

from __future__ import annotations

import gzip
import json
import os
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


# -- deterministic NIfTI, JSON and TSV writers ------------------------------------------------
# Every writer goes through a temporary name and renames at the end (never a half-written
# output) and writes the same bytes for the same data: gzip streams get mtime 0 and no
# file name.

_NIFTI_VOX_OFFSET = 352  # 348-byte header + 4-byte (empty) extension flag


def _atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


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
        self._tmp = _atomic_path(self.path)
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


def write_nifti(path, volume_zyx: np.ndarray, affine, compresslevel: int = 6) -> None:
    """Write a 3D volume given as a C-ordered [z, y, x] array as a NIfTI image (x, y, z)."""
    path = Path(path)
    nz, ny, nx = volume_zyx.shape
    header = nifti_header((nx, ny, nz), affine, volume_zyx.dtype)
    raw_header = header.binaryblock
    payload = raw_header + b"\0" * (_NIFTI_VOX_OFFSET - len(raw_header))
    payload += np.ascontiguousarray(volume_zyx, dtype=header.get_data_dtype()).tobytes()
    tmp = _atomic_path(path)
    tmp.write_bytes(gzip.compress(payload, compresslevel=compresslevel, mtime=0))
    os.replace(tmp, path)


def write_json(path, data: dict) -> None:
    path = Path(path)
    tmp = _atomic_path(path)
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_tsv(path, table: pd.DataFrame) -> None:
    path = Path(path)
    tmp = _atomic_path(path)
    table.to_csv(tmp, sep="\t", index=False, float_format="%.10g")
    os.replace(tmp, path)


def write_label_table(path, labels: dict) -> None:
    """A label lookup table (TSV with columns index, name)."""
    write_tsv(path, pd.DataFrame({"index": list(labels), "name": list(labels.values())}))
