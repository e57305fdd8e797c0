"""Reading and writing files: PET-BIDS datasets (images, sidecars, blood recordings, label
maps) with validation, organ value tables, preprocessed outputs."""

from __future__ import annotations

import gzip
import json
import os
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

# atomic_path is re-exported ("as"): the writers import it from kinpet.io.
from kinpet.atomic import atomic_path as atomic_path
from kinpet.atomic import new_temporary
from kinpet.frames import FrameSchedule, check_scan_length
from kinpet.inputfunction import InputFunction, units_to_kbq_per_ml


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
    """Read a TSV of organ parameters (columns organ, K1, k2, k3, Vb) with checks."""
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
    return table


# -- PET-BIDS datasets ------------------------------------------------------------------

# Images may have slightly negative voxels (noise in short frames of some reconstructions);
# they are kept as they are (clipping would bias low-activity regions upwards). An image
# whose minimum is below -NEGATIVE_TOLERANCE x its maximum is rejected: that is not noise
# but a wrong scale, an offset or a corrupt file.
NEGATIVE_TOLERANCE = 0.05

# Voxel-to-world affines of the PET and the label map may differ by float32 rounding (mm).
_AFFINE_TOLERANCE_MM = 1e-3

PET_REQUIRED_FIELDS = ("FrameTimesStart", "FrameDuration", "Units")


def bids_paths(root, subject: str, blood_recording: str = "idif") -> dict[str, Path]:
    """The files of one subject in a PET-BIDS dataset (see the README's layout).

    Parameters
    ----------
    root : path-like
        The dataset folder (holding ``sub-XX/`` and ``derivatives/``).
    subject : str
        Subject folder name with its prefix, e.g. ``"sub-01"``.
    blood_recording : str
        The ``<label>`` of ``sub-XX_recording-<label>_blood.tsv``.
    """
    root = Path(root)
    pet = root / subject / "pet"
    labels = root / "derivatives" / "labels" / subject
    return {
        "pet": pet / f"{subject}_pet.nii.gz",
        "pet_json": pet / f"{subject}_pet.json",
        "blood": pet / f"{subject}_recording-{blood_recording}_blood.tsv",
        "dseg": labels / f"{subject}_dseg.nii.gz",
        "dseg_tsv": labels / f"{subject}_dseg.tsv",
    }


@dataclass(eq=False)
class PetStudy:
    """One subject's dynamic PET study, read and validated by :func:`read_pet_bids`.

    Attributes
    ----------
    subject : str
    pet_path : Path
    image : nibabel.Nifti1Image
        The 4-D image as stored (native orientation, stored units); use :meth:`frame`.
    affine : ndarray, shape (4, 4)
        Voxel-to-world (RAS+, mm) affine of the image and of the labels.
    frames : FrameSchedule
        Times in seconds after the injection (the sidecar's times minus InjectionStart).
    units : str
        The sidecar's Units.
    unit_factor : float
        Factor from ``units`` to kBq/ml.
    input_function : InputFunction or None
        In kBq/ml; from the blood recording or the aorta (None if not asked for).
    labels : ndarray, shape (x, y, z), int
        Label map on the PET grid (native orientation).
    label_names : dict
        Label name -> value, from ``_dseg.tsv``.
    sidecar : dict
        The whole ``_pet.json``.
    """

    subject: str
    pet_path: Path
    image: nib.Nifti1Image
    affine: np.ndarray
    frames: FrameSchedule
    units: str
    unit_factor: float
    input_function: InputFunction | None
    labels: np.ndarray
    label_names: dict
    sidecar: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the 4-D image ``(x, y, z, t)``."""
        return tuple(self.image.shape)

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as a float32 array ``[x, y, z]`` in kBq/ml (native orientation).

        Frames are read one at a time, so that whole-body images need not fit in memory;
        read them in order (gzip files are read forward).
        """
        with _naming_corrupt_file(self.pet_path, f"reading frame {index}"):
            data = np.asarray(self.image.dataobj[..., index], dtype=np.float32)
        return data * np.float32(self.unit_factor)

    def iter_frames(self):
        """All frames in order, as :meth:`frame` gives them."""
        for index in range(len(self.frames)):
            yield self.frame(index)


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise KinpetInputError(f"{path}: file not found")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise KinpetInputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise KinpetInputError(f"{path}: expected a JSON object")
    return meta


def _load_nifti(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise KinpetInputError(f"{path}: file not found")
    try:
        # keep_file_open: frames read in order do not decompress the file from the start.
        return nib.load(path, keep_file_open=True)
    except Exception as err:  # noqa: BLE001 - nibabel raises many error types
        raise KinpetInputError(f"{path}: cannot read as NIfTI ({err})") from None


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


def read_labels(dseg_path, tsv_path, required=()) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a label map and its names; check that every value is named.

    Parameters
    ----------
    dseg_path, tsv_path : path-like
        ``_dseg.nii.gz`` (integer labels) and ``_dseg.tsv`` (index, name).
    required : sequence of str
        Label names that must be in the table and have voxels.

    Returns
    -------
    labels : ndarray (x, y, z) int32
    affine : ndarray (4, 4)
    names : dict name -> index
    """
    dseg_path = Path(dseg_path)
    names = read_label_table(tsv_path)
    image = _load_nifti(dseg_path)
    if len(image.shape) != 3:
        raise KinpetInputError(f"{dseg_path}: a label map must be 3-D, got shape {image.shape}")
    with _naming_corrupt_file(dseg_path):
        data = np.asarray(image.dataobj)
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise KinpetInputError(f"{dseg_path}: label values must be integers")
    labels = data.astype(np.int32)
    unnamed = sorted(set(np.unique(labels).tolist()) - set(names.values()))
    if unnamed:
        raise KinpetInputError(
            f"{dseg_path}: label value(s) {', '.join(map(str, unnamed))} are not listed in "
            f"{Path(tsv_path).name}"
        )
    for name in required:
        if name not in names:
            raise KinpetInputError(
                f"{tsv_path}: no label named {name!r} (labels: {', '.join(names)})"
            )
        if not np.any(labels == names[name]):
            raise KinpetInputError(f"{dseg_path}: label {name!r} ({names[name]}) has no voxels")
    return labels, image.affine, names


def read_pet_bids(
    root,
    subject: str,
    input_function: str | None = "blood",
    blood_recording: str = "idif",
    blood_column: str = "whole_blood",
    required_labels=("lungs", "bladder"),
    negative_tolerance: float = NEGATIVE_TOLERANCE,
) -> PetStudy:
    """Read and validate one subject of a PET-BIDS dataset.

    Parameters
    ----------
    root : path-like
        Dataset folder (layout in the README, section "Your own PET-BIDS data").
    subject : str
        e.g. ``"sub-01"``.
    input_function : {"blood", "aorta", None}
        ``"blood"``: the blood recording ``sub-XX_recording-<blood_recording>_blood.tsv``;
        ``"aorta"``: the mean of the aorta label per frame at frame mid-times (the paper's
        image-derived input); None: no input function.
    blood_recording : str
        Label of the blood recording.
    blood_column : {"whole_blood", "plasma"}
        Which curve of the recording.
    required_labels : sequence of str
        Label names that must exist with voxels (``"aorta"`` is added for an
        image-derived input).
    negative_tolerance : float
        Reject the image when its minimum is below ``-negative_tolerance`` times its
        maximum; smaller negative values are kept.

    Returns
    -------
    PetStudy

    Raises
    ------
    KinpetInputError
        Naming the file and the problem: a missing file or sidecar field, unknown units,
        a frame count that differs between the image and the sidecar, NaN, infinite or
        strongly negative image values, a label map on another grid, unnamed or missing
        labels, an input function that does not cover the scan.
    """
    if input_function not in ("blood", "aorta", None):
        raise ValueError(f"input_function must be 'blood', 'aorta' or None, not {input_function!r}")
    paths = bids_paths(root, subject, blood_recording)
    for key in ("pet", "pet_json", "dseg", "dseg_tsv") + (
        ("blood",) if input_function == "blood" else ()
    ):
        if not paths[key].exists():
            raise KinpetInputError(f"{paths[key]}: file not found")

    # Sidecar: frames and units.
    sidecar = _read_json(paths["pet_json"])
    missing = [k for k in PET_REQUIRED_FIELDS if k not in sidecar]
    if missing:
        raise KinpetInputError(
            f"{paths['pet_json']}: missing PET-BIDS field(s) {', '.join(missing)}"
        )
    decay_corrected = sidecar.get("ImageDecayCorrected", True)
    if not isinstance(decay_corrected, bool):
        # A string "false" is truthy: read as given it would pass as decay corrected.
        raise KinpetInputError(
            f"{paths['pet_json']}: ImageDecayCorrected must be a JSON boolean (true or "
            f"false), not {decay_corrected!r}"
        )
    if decay_corrected is False:
        raise KinpetInputError(
            f"{paths['pet_json']}: ImageDecayCorrected is false; the kinetic model needs "
            "decay-corrected images"
        )
    # PET-BIDS times count from TimeZero; the kinetic model counts from the injection.
    injection_s = sidecar.get("InjectionStart", 0.0)
    if not isinstance(injection_s, int | float) or not np.isfinite(injection_s):
        raise KinpetInputError(f"{paths['pet_json']}: InjectionStart must be a number (s)")
    try:
        frames = FrameSchedule.from_bids_json(paths["pet_json"])
        if injection_s != 0:
            frames = FrameSchedule(
                frames.starts_s - injection_s, frames.durations_s, source=frames.source
            )
        unit_factor = units_to_kbq_per_ml(str(sidecar["Units"]), source=str(paths["pet_json"]))
    except ValueError as err:
        raise KinpetInputError(str(err)) from None

    # Image: 4-D, one volume per frame.
    image = _load_nifti(paths["pet"])
    if len(image.shape) != 4:
        raise KinpetInputError(
            f"{paths['pet']}: expected a 4-D image (x, y, z, frames), got shape {image.shape}"
        )
    if image.shape[3] != len(frames):
        raise KinpetInputError(
            f"{paths['pet']}: the image has {image.shape[3]} frames but "
            f"{paths['pet_json'].name} lists {len(frames)}"
        )

    # Labels on the same grid.
    required = tuple(required_labels) + (("aorta",) if input_function == "aorta" else ())
    labels, label_affine, names = read_labels(paths["dseg"], paths["dseg_tsv"], required)
    if labels.shape != image.shape[:3]:
        raise KinpetInputError(
            f"{paths['dseg']}: label map shape {labels.shape} differs from the PET grid "
            f"{image.shape[:3]} of {paths['pet'].name}"
        )
    if not np.allclose(label_affine, image.affine, rtol=0, atol=_AFFINE_TOLERANCE_MM):
        raise KinpetInputError(
            f"{paths['dseg']}: label map affine differs from the PET affine of "
            f"{paths['pet'].name} (the labels must be on the PET grid)\n"
            f"labels:\n{np.round(label_affine, 4)}\nPET:\n{np.round(image.affine, 4)}"
        )

    # The blood recording before the image pass: small files fail fast.
    blood = None
    if input_function == "blood":
        try:
            blood = InputFunction.from_blood_tsv(paths["blood"], column=blood_column)
            if injection_s != 0:
                blood = InputFunction(blood.times_s - injection_s, blood.values, blood.source)
            blood.check_covers(frames, strict=True)
        except ValueError as err:
            raise KinpetInputError(str(err)) from None

    study = PetStudy(
        subject=subject,
        pet_path=paths["pet"],
        image=image,
        affine=np.asarray(image.affine, dtype=np.float64),
        frames=frames,
        units=str(sidecar["Units"]),
        unit_factor=unit_factor,
        input_function=blood,
        labels=labels,
        label_names=names,
        sidecar=sidecar,
    )

    # One pass over the frames: value checks and, if asked, the aorta curve.
    aorta = labels == names["aorta"] if input_function == "aorta" else None
    low, high, aorta_means = np.inf, -np.inf, []
    for index, frame in enumerate(study.iter_frames()):
        if not np.all(np.isfinite(frame)):
            kind = "NaN" if np.isnan(frame).any() else "infinite"
            raise KinpetInputError(f"{paths['pet']}: frame {index} contains {kind} values")
        low, high = min(low, float(frame.min())), max(high, float(frame.max()))
        if aorta is not None:
            aorta_means.append(float(np.mean(frame[aorta], dtype=np.float64)))
    if high <= 0:
        raise KinpetInputError(f"{paths['pet']}: the image has no positive values")
    if low < -negative_tolerance * high:
        raise KinpetInputError(
            f"{paths['pet']}: negative values down to {low:.4g} kBq/ml, more than "
            f"{negative_tolerance:.0%} of the maximum {high:.4g} kBq/ml (wrong scale or offset?)"
        )

    if input_function == "aorta":
        try:
            study.input_function = InputFunction(
                frames.mids_s, aorta_means, source=f"{paths['pet']} (mean of the aorta label)"
            )
            study.input_function.check_not_zero()
        except ValueError as err:
            raise KinpetInputError(str(err)) from None
    return study


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
