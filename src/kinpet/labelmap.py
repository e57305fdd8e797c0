"""The phantom's anatomy from a label map: a segmentation becomes kinpet's tissue classes.

A label map (a NIfTI of integer labels, e.g. TotalSegmentator's "total" task) replaces the
procedural shapes of :mod:`kinpet.anatomy` (``phantom.anatomy``, docs/phantom.md). Each
label's name is looked up in a class table (``config/totalsegmentator_classes.tsv``:
columns index, name, class) that assigns it one of kinpet's labels
(:data:`kinpet.anatomy.LABELS`), so the kinetics follow ``config/organ_values.tsv``.

- Label names come from a TSV beside the label map (``<name>.tsv`` for ``<name>.nii.gz``,
  columns index, name: the BIDS ``dseg`` layout), else from the class table's index
  column (TotalSegmentator v2's class numbers).
- A name kinpet itself uses (``liver``, ``kidneys``, ``body``, ...) keeps its class; a name
  in neither the table nor kinpet's labels, and a value the label table lacks, becomes
  :data:`DEFAULT_CLASS` (soft tissue).
- The body outline is the union of the labels named in :data:`BODY_OUTLINE_NAMES`, the body
  found in a CT on the label map's grid (:func:`body_from_ct`, when one is given) and every
  labelled voxel. Without an outline label or a CT there is no body to put the organs in:
  an error says so.

The classes are assigned on the label map's own grid, then resampled by nearest neighbour
onto the canonical grid of the simulation (``phantom.voxel_mm``): axis-aligned, x towards
the patient's left, y towards posterior, z towards the head, in the label map's world
coordinates (:func:`kinpet.preprocessing.resample_to_spacing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from kinpet.anatomy import LABEL_INDEX, LABELS, Grid
from kinpet.io import KinpetInputError

# Label names outside kinpet's organs get this class: soft tissue and muscle.
DEFAULT_CLASS = "body"
# Labels that outline the body: kinpet's own name and TotalSegmentator's "body" task.
BODY_OUTLINE_NAMES = ("body", "body_trunc", "body_extremities")
# CT voxels above this are tissue (air and lung parenchyma lie below about -500 HU).
BODY_THRESHOLD_HU = -500.0
# Where the class table lives in the repository (the workflow's and the CLI's default).
DEFAULT_CLASS_TABLE = "config/totalsegmentator_classes.tsv"


class AnatomyError(KinpetInputError):
    """A label map that cannot become a phantom (no body outline, no known organ, ...)."""


@dataclass
class LabelAnatomy:
    """A label map's anatomy on the simulation grid.

    Attributes
    ----------
    labels_zyx : numpy.ndarray of int16, [z, y, x]
        kinpet's labels (:data:`kinpet.anatomy.LABELS`).
    grid : Grid
        The simulation grid, with the label map's world position (``Grid.world``).
    source : str
        The label map's file name (for the PET sidecar).
    volumes_ml : dict
        kinpet label name -> volume (ml) in the label map before resampling.
    unknown : list of str
        Label names (or ``value N``) that became :data:`DEFAULT_CLASS` without being in the
        class table.
    """

    labels_zyx: np.ndarray
    grid: Grid
    source: str
    volumes_ml: dict
    unknown: list


# -- computing -----------------------------------------------------------------------------


def body_from_ct(ct_hu: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """The body in a CT: tissue above ``threshold_hu``, holes filled, the largest piece.

    Holes are filled slice by slice along the last axis (axial slices of an ``(x, y, z)``
    array), which closes the lungs and bowel gas inside the outline even where they touch
    the top or bottom of the scan; the largest connected piece drops the table and
    blankets.

    Parameters
    ----------
    ct_hu : numpy.ndarray, (x, y, z)
        CT values in Hounsfield units.
    threshold_hu : float
        Tissue lies above this (HU).

    Returns
    -------
    numpy.ndarray of bool, (x, y, z)
    """
    tissue = np.asarray(ct_hu) > threshold_hu
    for z in range(tissue.shape[2]):
        tissue[:, :, z] = ndimage.binary_fill_holes(tissue[:, :, z])
    pieces, n = ndimage.label(tissue)
    if n == 0:
        return tissue
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    return pieces == int(np.argmax(sizes))


def class_of_name(name: str | None, class_table: dict) -> tuple[str, bool]:
    """kinpet's class of a label name and whether the name is known.

    The class table comes first, then kinpet's own label names; anything else (and a value
    without a name, ``None``) is :data:`DEFAULT_CLASS` and unknown.
    """
    if name is None:
        return DEFAULT_CLASS, False
    if name in class_table:
        return class_table[name], True
    if name in LABEL_INDEX and name != "background":
        return name, True
    return DEFAULT_CLASS, False


def anatomy_from_labels(
    labels: np.ndarray,
    names: dict,
    class_table: dict,
    body: np.ndarray | None = None,
    voxel_ml: float = 1.0,
    source: str = "label map",
) -> tuple[np.ndarray, dict, list]:
    """kinpet's labels of a label map, on the label map's grid.

    Parameters
    ----------
    labels : numpy.ndarray of int, any shape
        The label map (0: background).
    names : dict
        Label value -> name (the label map's table).
    class_table : dict
        Label name -> kinpet label name (:func:`read_class_table`).
    body : numpy.ndarray of bool, optional
        A body mask on the same grid (e.g. :func:`body_from_ct`), added to the outline.
    voxel_ml : float
        Volume of one voxel (ml), for the returned volumes.
    source : str
        File name for error messages.

    Returns
    -------
    classes : numpy.ndarray of int16, same shape as ``labels``
        kinpet's labels: organs by their class, the rest of the body ``body``, outside 0.
    volumes_ml : dict
        kinpet label name -> volume (ml) of its voxels in ``classes``.
    unknown : list of str
        Names (``value N`` for values without one) that became :data:`DEFAULT_CLASS`.

    Raises
    ------
    AnatomyError
        When no label is an organ kinpet knows, or there is no body outline (no label of
        :data:`BODY_OUTLINE_NAMES` and no ``body`` mask).
    """
    labels = np.asarray(labels)
    values = [int(v) for v in np.unique(labels) if v != 0]
    classes = {}
    unknown = []
    outline = []
    for value in values:
        name = names.get(value)
        cls, known = class_of_name(name, class_table)
        classes[value] = cls
        if not known:
            unknown.append(name if name is not None else f"value {value}")
        if name in BODY_OUTLINE_NAMES:
            outline.append(value)
    organs = sorted({c for c in classes.values() if c != DEFAULT_CLASS})
    if not organs:
        shown = ", ".join(str(names.get(v, f"value {v}")) for v in values[:8])
        shown += ", ..." if len(values) > 8 else ""
        raise AnatomyError(
            f"{source}: none of its {len(values)} labels ({shown}) "
            "is an organ kinpet knows; name them as TotalSegmentator v2 or kinpet does "
            f"({DEFAULT_CLASS_TABLE})"
        )
    if not outline and body is None:
        raise AnatomyError(
            f"{source}: no body outline: the label map has no label named "
            f"{' or '.join(BODY_OUTLINE_NAMES)} and no CT was given (phantom.anatomy_ct) to "
            "find the body in; the phantom needs the soft tissue around the organs"
        )
    inside = labels != 0
    if body is not None:
        inside = inside | np.asarray(body, dtype=bool)
    out = np.where(inside, LABEL_INDEX["body"], 0).astype(np.int16)
    lookup = np.zeros(max(values) + 1, dtype=np.int16)
    for value, cls in classes.items():
        lookup[value] = LABEL_INDEX[cls]
    labelled = labels > 0
    out[labelled] = lookup[labels[labelled]]
    counts = np.bincount(out.ravel(), minlength=len(LABELS))
    volumes = {LABELS[i]: float(counts[i]) * voxel_ml for i in range(1, len(LABELS)) if counts[i]}
    return out, volumes, unknown


# -- reading --------------------------------------------------------------------------------


def read_class_table(path) -> tuple[dict, dict]:
    """The class table: label name -> kinpet class, and index -> name where given.

    Parameters
    ----------
    path : path-like
        TSV with columns ``name`` and ``class`` (kinpet label names, not ``background``)
        and optionally ``index`` (the label value in TotalSegmentator v2's "total" task;
        empty for names outside it).

    Returns
    -------
    classes : dict
        name -> class.
    names : dict
        index -> name, for the rows with an index.
    """
    from kinpet.readers import read_table

    table = read_table(path, required_columns=("name", "class"))
    names = table["name"].astype(str).str.strip()
    cls = table["class"].astype(str).str.strip()
    bad = sorted(set(cls) - (set(LABEL_INDEX) - {"background"}))
    if bad:
        raise AnatomyError(
            f"{path}: unknown class(es) {', '.join(bad)}; classes are kinpet's labels: "
            + ", ".join(n for n in LABEL_INDEX if n != "background")
        )
    repeated = sorted(set(names[names.duplicated()]))
    if repeated:
        raise AnatomyError(f"{path}: repeated name(s) {', '.join(repeated)}")
    index = {}
    if "index" in table.columns:
        for i, n in zip(table["index"], names, strict=True):
            if not (isinstance(i, float) and np.isnan(i)):
                if float(i) != int(i):
                    raise AnatomyError(f"{path}: index {i} of {n} is not a whole number")
                index[int(i)] = n
    return dict(zip(names, cls, strict=True)), index


def label_table_beside(path) -> Path:
    """Where a label map's own table sits: ``<name>.tsv`` beside ``<name>.nii(.gz)``."""
    path = Path(path)
    stem = path.name.removesuffix(".gz").removesuffix(".nii")
    return path.with_name(f"{stem}.tsv")


def read_label_anatomy(path, voxel_mm: float, class_table=DEFAULT_CLASS_TABLE, ct=None, log=None):
    """Read a label map (and optionally its CT) as a :class:`LabelAnatomy` on the
    simulation grid of ``voxel_mm`` voxels (mm).

    Parameters
    ----------
    path : path-like
        NIfTI label map; its names from :func:`label_table_beside` when that file exists,
        else from the class table's index column.
    voxel_mm : float
        Voxel size (mm) of the simulation grid.
    class_table : path-like
        The class table (:func:`read_class_table`).
    ct : path-like, optional
        A CT (HU) on the label map's grid, whose body (:func:`body_from_ct`) is the
        outline.
    log : callable, optional
        Takes one line of text: what was read, unknown names, volumes.
    """
    from kinpet.io import read_label_table
    from kinpet.preprocessing import resample_to_spacing, voxel_volume_ml
    from kinpet.readers import read_nifti_header, read_volume

    log = log or (lambda message: None)
    path = Path(path)
    header = read_nifti_header(path)
    if len(header.shape) != 3:
        raise AnatomyError(f"{path}: a label map is a 3-D image, not of shape {header.shape}")
    labels = read_volume(path, ndim=3)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.array_equal(labels, np.round(labels)):
            raise AnatomyError(f"{path}: label values must be whole numbers")
        labels = labels.astype(np.int64)
    if labels.min(initial=0) < 0:
        raise AnatomyError(f"{path}: label values must be >= 0")
    classes, v2_names = read_class_table(class_table)
    beside = label_table_beside(path)
    if beside.exists():
        names = {i: n for n, i in read_label_table(beside).items()}
        log(f"{path}: label names from {beside}")
    else:
        names = v2_names
        log(f"{path}: no {beside.name} beside it; label names are TotalSegmentator v2's")
    body = None
    if ct is not None:
        ct_header = read_nifti_header(ct)
        if ct_header.shape[:3] != labels.shape or not np.allclose(
            ct_header.affine, header.affine, atol=1e-3
        ):
            raise AnatomyError(
                f"{ct}: not on the grid of the label map {path} (shape {ct_header.shape} vs "
                f"{labels.shape}, or another affine)"
            )
        body = body_from_ct(read_volume(ct, np.float32, ndim=3))
    out, volumes, unknown = anatomy_from_labels(
        labels, names, classes, body, voxel_volume_ml(header.affine), str(path)
    )
    if unknown:
        log(f"{path}: {DEFAULT_CLASS} for the labels not in {class_table}: {', '.join(unknown)}")
    resampled, affine = resample_to_spacing(out, header.affine, voxel_mm, "nearest", str(path))
    grid = Grid(tuple(int(n) for n in resampled.shape), float(voxel_mm), world=affine)
    log(
        f"{path}: {labels.shape} voxels -> simulation grid {grid.shape} of {voxel_mm:g} mm; "
        + ", ".join(f"{n} {v:.0f} ml" for n, v in volumes.items())
    )
    return LabelAnatomy(
        labels_zyx=np.ascontiguousarray(resampled.transpose(2, 1, 0)),
        grid=grid,
        source=path.name,
        volumes_ml=volumes,
        unknown=unknown,
    )
