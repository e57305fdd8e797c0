"""Voxel-wise fitting of whole volumes, cut into chunks of axial slices.

The pipeline fits each (subject, chunk, method) in its own job and gathers the chunks
into parametric maps; these functions do the cutting, the fitting of one chunk and the
gathering, on arrays.
"""

from __future__ import annotations

import numpy as np

from kinpet.evaluation import axial_slice
from kinpet.fitting import fit

# Channels of a fitted chunk: the four parameters, Ki and the weighted SSE.
MAP_NAMES = ("K1", "k2", "k3", "Vb", "Ki", "SSE")
# The organs the paper's Fig. 4 outlines on its axial slice.
FIGURE4_ORGANS = ("liver", "spleen", "kidneys")


def chunk_bounds(n_slices: int, n_chunks: int, chunk: int) -> tuple[int, int]:
    """Slices [z0, z1) of chunk ``chunk`` when ``n_slices`` are cut into ``n_chunks``.

    With more chunks than slices some chunks are empty (z0 == z1): they fit nothing and
    :func:`gather_chunks` takes them as they are.
    """
    if not 0 <= chunk < n_chunks:
        raise ValueError(f"chunk {chunk} is not in 0..{n_chunks - 1}")
    edges = np.linspace(0, n_slices, n_chunks + 1).round().astype(int)
    return int(edges[chunk]), int(edges[chunk + 1])


def read_chunk(image, z0: int, z1: int) -> np.ndarray:
    """Slices [z0, z1) of a 4-D image (nibabel, [X, Y, Z, T]) as float32.

    A chunk may hold no slice (more chunks than slices, see :func:`chunk_bounds`): it
    reads nothing, because nibabel's proxy fails on an empty slice range (OSError 22).
    """
    if z1 <= z0:
        return np.zeros((*image.shape[:2], 0, *image.shape[3:]), dtype=np.float32)
    return np.asarray(image.dataobj[:, :, z0:z1, ...], dtype=np.float32)


def figure_slice(labels: np.ndarray, names: dict, organs=FIGURE4_ORGANS) -> int:
    """The axial slice that shows the most of ``organs`` (the slice of Fig. 4).

    Parameters
    ----------
    labels : array of int [X, Y, Z]
        Label map.
    names : dict
        Label name -> value (labels.tsv).
    organs : sequence of str
        Organs to show; names missing from ``names`` are ignored.

    Returns
    -------
    int
        The slice holding the largest number of the organs, and among those the most of
        their voxels (:func:`kinpet.evaluation.axial_slice` over all slices).
    """
    present = {o: names[o] for o in organs if o in names}
    if not present:
        raise ValueError(f"none of the organs {list(organs)} is in the label table")
    if not np.isin(labels, list(present.values())).any():
        raise ValueError(f"none of the organs {list(organs)} has voxels in the label map")
    return axial_slice(np.ones(labels.shape[2], dtype=bool), labels, present)


def covered_slices(n_slices: int, spec, figure_z: int | None = None) -> np.ndarray:
    """Which axial slices a method fits.

    ``spec`` is ``"all"``, every ``N``-th slice (an int, centred), a list of slice indices,
    or ``"figure4"``: the slice ``figure_z`` (see :func:`figure_slice`).
    """
    covered = np.zeros(n_slices, dtype=bool)
    if spec == "figure4":
        if figure_z is None:
            raise ValueError('reference slices "figure4" need the figure\'s slice (figure_z)')
        covered[figure_z] = True
    elif spec == "all":
        covered[:] = True
    elif isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"a slice stride must be >= 1, not {spec}")
        covered[spec // 2 :: spec] = True  # centred strides, away from the body's ends
    else:
        index = np.asarray(spec, dtype=int)
        covered[index[(index >= 0) & (index < n_slices)]] = True
    return covered


def fit_chunk(pet, mask, z0, z1, covered, input_function, frames, method="fast", **options):
    """Fit every masked voxel of slices [z0, z1) that ``covered`` selects.

    Parameters
    ----------
    pet : array [X, Y, Z, T]
        Dynamic image (kBq/ml).
    mask : array of bool [X, Y, Z]
        Voxels to fit (e.g. the body).
    z0, z1 : int
        The chunk's slices.
    covered : array of bool [Z]
        Slices this method fits (:func:`covered_slices`).
    options
        Passed to :func:`kinpet.fitting.fit` (weights, sampling, n_jobs, ...).

    Returns
    -------
    maps : float32 array [X, Y, z1 - z0, 6]
        K1, k2, k3, Vb, Ki and SSE; NaN where no voxel was fitted.
    n_fitted : int
    """
    sub_mask = mask[:, :, z0:z1] & covered[None, None, z0:z1]
    out = np.full((*mask.shape[:2], z1 - z0, len(MAP_NAMES)), np.nan, dtype=np.float32)
    n = int(sub_mask.sum())
    if n:
        tacs = np.asarray(pet[:, :, z0:z1, :])[sub_mask]
        result = fit(tacs, input_function, frames, method=method, **options)
        values = np.column_stack([result.params, result.ki, result.sse])
        values[~result.ok] = np.nan
        out[sub_mask] = values
    return out, n


def gather_chunks(chunks, bounds, shape) -> np.ndarray:
    """Assemble chunk maps ([X, Y, z1 - z0, C] each) into a volume [X, Y, Z, C]."""
    out = np.full((*shape[:3], chunks[0].shape[-1]), np.nan, dtype=np.float32)
    for maps, (z0, z1) in zip(chunks, bounds, strict=True):
        if maps.shape[2] != z1 - z0 or maps.shape[:2] != tuple(shape[:2]):
            raise ValueError(f"chunk of shape {maps.shape} does not fit slices {z0}-{z1}")
        out[:, :, z0:z1] = maps
    return out
