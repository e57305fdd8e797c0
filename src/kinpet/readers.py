"""Reading the pipeline's intermediate files, and the workflow scripts' one-line errors.

Every reader here turns a missing, truncated or corrupt file into a
:class:`~kinpet.io.KinpetInputError` whose message names the file and the problem, never a
traceback from deep inside nibabel, numpy or pandas. :func:`script_log` makes a workflow
script end on such an error with one line ``ERROR: <message>`` in its log.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from kinpet.frames import FrameScheduleError
from kinpet.inputfunction import InputFunctionError
from kinpet.io import KinpetInputError, _naming_corrupt_file


def _exists(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise KinpetInputError(f"{path}: file not found")
    return path


def _open_nifti(path) -> nib.Nifti1Image:
    path = _exists(path)
    if path.stat().st_size == 0:
        raise KinpetInputError(f"{path}: empty file (0 bytes)")
    try:
        return nib.load(path)
    except Exception as err:  # noqa: BLE001 - nibabel raises many error types
        raise KinpetInputError(
            f"{path}: cannot read as NIfTI ({type(err).__name__}: {err})"
        ) from None


@dataclass(frozen=True)
class NiftiGrid:
    """The grid of a NIfTI image, from its header.

    Attributes
    ----------
    shape : tuple of int
        ``(x, y, z[, t])``.
    affine : ndarray, shape (4, 4)
        Voxel-to-world (RAS+, mm) affine, float64.
    zooms : tuple of float
        Voxel size in mm (and the frame step in s for a 4-D image, 0 if the frames differ).
    """

    shape: tuple[int, ...]
    affine: np.ndarray
    zooms: tuple[float, ...]


def read_nifti_header(path) -> NiftiGrid:
    """The shape, affine and voxel size of a NIfTI image, without reading its data.

    Parameters
    ----------
    path : path-like
        A ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    NiftiGrid

    Raises
    ------
    KinpetInputError
        Naming the file: missing, empty, or not a readable NIfTI header.
    """
    image = _open_nifti(path)
    with _naming_corrupt_file(path, "reading the header"):
        return NiftiGrid(
            shape=tuple(int(n) for n in image.shape),
            affine=np.asarray(image.affine, dtype=np.float64),
            zooms=tuple(float(z) for z in image.header.get_zooms()),
        )


def read_volume(path, dtype=None, slab=None, ndim: int | None = None) -> np.ndarray:
    """The voxel values of a NIfTI image (scaled by its slope and intercept).

    nibabel reads lazily: a truncated or corrupt ``.nii.gz`` shows only when the data are
    read, which this does, inside the check.

    Parameters
    ----------
    path : path-like
        A ``.nii`` or ``.nii.gz`` file.
    dtype : numpy dtype, optional
        Type of the returned array; default the type nibabel gives (the stored type, or
        float64 for scaled data).
    slab : tuple of slices and ints, optional
        Read only this part of the image, e.g. ``np.s_[:, :, z0:z1]`` (axial slices
        ``z0..z1-1``) or ``np.s_[:, y, :]`` (one coronal plane). For a ``.nii.gz`` the
        stream is still decompressed up to the last voxel needed, but only the slab is kept.
    ndim : int, optional
        The number of dimensions the image must have (3 for a volume, 4 for a dynamic
        image).

    Returns
    -------
    ndarray
        In the image's stored orientation ``(x, y, z[, t])`` and units (kBq/ml for the
        pipeline's PET, model units for the parameter maps).

    Raises
    ------
    KinpetInputError
        Naming the file and the problem: missing, empty, not NIfTI, truncated or corrupt,
        or not ``ndim``-dimensional.
    """
    image = _open_nifti(path)
    if ndim is not None and len(image.shape) != ndim:
        raise KinpetInputError(f"{path}: expected a {ndim}-D image, got shape {image.shape}")
    what = "reading the data" if slab is None else f"reading the slab {slab}"
    with _naming_corrupt_file(path, what):
        data = image.dataobj if slab is None else image.dataobj[slab]
        return np.asarray(data, dtype=dtype)


def dynamic_slab_reader(path):
    """``read_slab(z0, z1)`` -> slices [X, Y, z1 - z0, T] (float32) of a 4-D NIfTI.

    The file stays open between calls, so a ``.nii.gz`` read slab after slab is
    decompressed in one forward pass, not once per slab; only one slab is in memory.

    Raises
    ------
    KinpetInputError
        Naming the file: missing, empty, not NIfTI, not 4-D, truncated or corrupt.
    """
    image = _open_nifti(path)
    if len(image.shape) != 4:
        raise KinpetInputError(f"{path}: expected a 4-D image, got shape {image.shape}")
    image = nib.load(Path(path), keep_file_open=True)

    def read_slab(z0: int, z1: int) -> np.ndarray:
        with _naming_corrupt_file(path, f"reading slices {z0}-{z1 - 1}"):
            return np.asarray(image.dataobj[:, :, z0:z1, :], dtype=np.float32)

    return read_slab


def read_npz(path, keys=None) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` file, read into memory (no pickled objects).

    Parameters
    ----------
    path : path-like
    keys : sequence of str, optional
        Read only these arrays (each must be in the file); default all. The others are
        not decompressed.

    Returns
    -------
    dict
        Array name -> array.

    Raises
    ------
    KinpetInputError
        Naming the file and the problem: missing, empty, truncated or corrupt, holding
        pickled objects, or lacking one of ``keys``.
    """
    path = _exists(path)
    if path.stat().st_size == 0:
        raise KinpetInputError(f"{path}: empty file (0 bytes)")
    with _naming_corrupt_file(path, "reading as .npz"):
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys or () if k not in data.files]
            if missing:
                raise KinpetInputError(
                    f"{path}: missing array(s) {', '.join(missing)} "
                    f"(arrays: {', '.join(data.files) or 'none'})"
                )
            return {key: data[key] for key in (data.files if keys is None else keys)}


def read_table(path, required_columns=(), sep: str = "\t") -> pd.DataFrame:
    """A delimited text table (TSV by default) with its header row.

    Parameters
    ----------
    path : path-like
    required_columns : sequence of str
        Columns that must be in the header.
    sep : str
        Field separator: ``"\\t"`` for the pipeline's ``.tsv`` files, ``","`` for ``.csv``.

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    KinpetInputError
        Naming the file and the problem: missing, empty, not parseable (e.g. rows with
        more fields than the header), or lacking a required column.
    """
    path = _exists(path)
    try:
        table = pd.read_csv(path, sep=sep)
    except pd.errors.EmptyDataError:
        raise KinpetInputError(f"{path}: empty file (no header row)") from None
    except Exception as err:  # noqa: BLE001 - pandas raises many parser errors
        kind = "TSV" if sep == "\t" else f"a table separated by {sep!r}"
        raise KinpetInputError(
            f"{path}: cannot read as {kind} ({type(err).__name__}: {err})"
        ) from None
    missing = [c for c in required_columns if c not in table.columns]
    if missing:
        raise KinpetInputError(
            f"{path}: missing column(s) {', '.join(missing)} "
            f"(columns: {', '.join(map(str, table.columns))})"
        )
    return table


def read_json(path) -> dict:
    """A JSON file holding one object (a sidecar), as a dict.

    Raises
    ------
    KinpetInputError
        Naming the file and the problem: missing, not UTF-8 text, not valid JSON (with the
        line and column), or not a JSON object.
    """
    path = _exists(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise KinpetInputError(f"{path}: not UTF-8 text ({err})") from None
    except json.JSONDecodeError as err:
        raise KinpetInputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise KinpetInputError(f"{path}: expected a JSON object, not {type(meta).__name__}")
    return meta


# -- the workflow scripts' errors ----------------------------------------------------------

# Errors whose message names the file (or config key) and the problem: a workflow script
# that stops on one of these writes the message, not a traceback. Errors of kinpet modules
# that a script may not import are looked up by name when one is raised.
_NAMED_ERRORS = (KinpetInputError, FrameScheduleError, InputFunctionError)
_NAMED_ERRORS_ELSEWHERE = {
    "kinpet.preprocessing": "PreprocessingError",
    "kinpet.evaluation": "EvaluationError",
    "kinpet.resources": "PhantomResourceError",
    "kinpet.checkpoints": "TrainingBusyError",
}


def named_errors() -> tuple[type[Exception], ...]:
    """The exception types that :func:`script_log` reports in one line."""
    found = [
        getattr(sys.modules[module], name)
        for module, name in _NAMED_ERRORS_ELSEWHERE.items()
        if module in sys.modules
    ]
    return (*_NAMED_ERRORS, *found)


def report_error(err: BaseException, stream=None) -> bool:
    """Write ``ERROR: <message>`` for an error of :func:`named_errors`; True if written."""
    if not isinstance(err, named_errors()):
        return False
    stream = sys.stderr if stream is None else stream
    print(f"ERROR: {err}", file=stream, flush=True)
    return True


def script_log(path):
    """Send a workflow script's ``sys.stderr`` to its log and end it on bad input in one line.

    Call it first in a script run by Snakemake's ``script:`` directive (a Python process of
    its own), with ``snakemake.log[0]``. From then on, an uncaught
    :class:`~kinpet.io.KinpetInputError` (or another error of :func:`named_errors`, whose
    messages name the file and the problem) writes ``ERROR: <message>`` to the log instead
    of a traceback, and the script exits with status 1; any other error keeps its
    traceback. The script's outputs are written atomically (:mod:`kinpet.atomic`), so a
    script that stops leaves none half-written.

    Parameters
    ----------
    path : path-like
        The log file (truncated).

    Returns
    -------
    file object
        The log stream, now ``sys.stderr``.
    """
    stream = open(path, "w")  # noqa: SIM115 - the log stays open while the script runs
    sys.stderr = stream
    previous = sys.excepthook

    def hook(kind, err, tb):
        if not report_error(err, sys.stderr):
            previous(kind, err, tb)

    sys.excepthook = hook
    return stream
