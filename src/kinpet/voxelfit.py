"""Voxel-wise fitting of whole volumes, cut into chunks of axial slices.

The pipeline fits each (subject, chunk, method) in its own job and gathers the chunks
into parametric maps; these functions do the cutting, the fitting of one chunk and the
gathering, on arrays.

A chunk job reads only its slices: the 4-D image is written once per subject, slice-major
and uncompressed (:func:`write_slabs`), and each job maps the bytes of its slices alone
(:func:`read_slab`). The gzipped NIfTI cannot be read that way: its slices are spread over
every frame of the file, so any slice range decompresses the whole of it.

Importing this module is light (numpy only): the fitter, and torch with it, is imported by
:func:`fit_chunk`, the organ tables by :func:`figure_slice`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

# Channels of a fitted chunk of the irreversible two-tissue model: the four parameters, Ki
# and the weighted SSE (another model's: kinpet.models.map_names).
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


def write_slabs(image, path) -> tuple[int, ...]:
    """Write a 4-D image (an array [X, Y, Z, T], or a nibabel image) as a float32 ``.npy``
    of shape [Z, X, Y, T] (C order: the slices one after the other), atomically; return
    the shape.

    The values are those :func:`read_chunk` returns; :func:`read_slab` reads them back
    slices [z0, z1) at a time. The image is decompressed once, here, instead of once per
    chunk job.
    """
    from kinpet.atomic import atomic_path

    data = np.asarray(getattr(image, "dataobj", image), dtype=np.float32)
    if data.ndim != 4:
        raise ValueError(f"not a 4-D image: shape {data.shape}")
    shape = (data.shape[2], data.shape[0], data.shape[1], data.shape[3])
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        for z in range(shape[0]):
            out[z] = data[:, :, z, :]
        out.flush()
        del out
    return shape


def slab_layout(path) -> tuple[tuple[int, ...], int]:
    """Shape [Z, X, Y, T] and data offset (bytes) of a file of :func:`write_slabs`.

    Raises
    ------
    KinpetInputError
        Naming the file and the problem: missing, empty, not a ``.npy`` header, not a slab
        file (C-ordered float32 [Z, X, Y, T]), or shorter than its header says (a copy or
        a write that stopped part way).
    """
    # kinpet.io imports nibabel and pandas: imported here to keep this module light.
    from kinpet.io import KinpetInputError, _naming_corrupt_file

    path = Path(path)
    if not path.exists():
        raise KinpetInputError(f"{path}: file not found")
    size = path.stat().st_size
    if size == 0:
        raise KinpetInputError(f"{path}: empty file (0 bytes)")
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    with _naming_corrupt_file(path, "reading the .npy header"), open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in readers:
            raise KinpetInputError(f"{path}: .npy format version {version} is not supported")
        shape, fortran, dtype = readers[version](f)
        offset = f.tell()
    if len(shape) != 4 or fortran or dtype != np.dtype(np.float32):
        raise KinpetInputError(
            f"{path}: not a slab file (C-ordered float32 [Z, X, Y, T]); found shape "
            f"{shape}, dtype {dtype}, {'Fortran' if fortran else 'C'} order"
        )
    # Checked here, not left to np.memmap: its "mmap length is greater than file size"
    # names no file, and a chunk within the file's short length would read without error.
    expected = offset + 4 * int(np.prod(shape))
    if size != expected:
        raise KinpetInputError(
            f"{path}: truncated or corrupt file ({size} bytes; its header's shape "
            f"{list(shape)} needs {expected})"
        )
    return tuple(int(n) for n in shape), offset


def read_slab(path, z0: int, z1: int) -> np.ndarray:
    """Slices [z0, z1) of a file of :func:`write_slabs`, as [X, Y, z1 - z0, T] float32.

    The same values as :func:`read_chunk` on the image the file was written from. Only the
    bytes of those slices are mapped (an empty range maps nothing), so a job reads its
    slab and no more.

    Raises
    ------
    KinpetInputError
        Naming the file and the problem (:func:`slab_layout`; an error reading the bytes).
    ValueError
        If [z0, z1) is not within the file's slices.
    """
    from kinpet.io import _naming_corrupt_file

    (n_z, n_x, n_y, n_t), offset = slab_layout(path)
    if not 0 <= z0 <= z1 <= n_z:
        raise ValueError(f"slices {z0}-{z1} are not within the {n_z} slices of {path}")
    if z1 == z0:
        return np.zeros((n_x, n_y, 0, n_t), dtype=np.float32)
    plane = n_x * n_y * n_t * 4  # bytes per slice
    # The file may change between the size check and the read (a rerun rewriting it).
    with _naming_corrupt_file(path, f"reading slices {z0}-{z1 - 1}"):
        mapped = np.memmap(
            Path(path),
            dtype=np.float32,
            mode="r",
            offset=offset + z0 * plane,
            shape=(z1 - z0, n_x, n_y, n_t),
        )
        slab = np.array(mapped)  # read now, then let the map go
    del mapped
    return np.moveaxis(slab, 0, 2)


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
    from kinpet.evaluation import axial_slice

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


def fit_chunk(
    pet,
    mask,
    z0,
    z1,
    covered,
    input_function,
    frames,
    method="fast",
    timing=None,
    model="irreversible_2tc",
    **options,
):
    """Fit every masked voxel of slices [z0, z1) that ``covered`` selects with ``model``.

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
    timing : dict, optional
        Given, ``timing["fit_s"]`` is set to the wall seconds of the fitter's own call
        (:func:`kinpet.modelfit.fit_model`; 0 when no voxel is fitted).
    model : str
        A model of :data:`kinpet.models.MODELS`.
    options
        Passed to :func:`kinpet.modelfit.fit_model` (weights, sampling, n_jobs, ...).

    Returns
    -------
    maps : float32 array [X, Y, z1 - z0, M]
        The model's :func:`kinpet.models.map_names` (:data:`MAP_NAMES` for
        ``irreversible_2tc``: K1, k2, k3, Vb, Ki and SSE); NaN where no voxel was fitted.
    n_fitted : int
    """
    from kinpet.models import get_model, map_names, result_columns

    spec = get_model(model)
    names = map_names(spec)
    sub_mask = mask[:, :, z0:z1] & covered[None, None, z0:z1]
    out = np.full((*mask.shape[:2], z1 - z0, len(names)), np.nan, dtype=np.float32)
    n = int(sub_mask.sum())
    seconds = 0.0
    if n:
        from kinpet.modelfit import fit_model

        tacs = np.asarray(pet[:, :, z0:z1, :])[sub_mask]
        start = time.perf_counter()
        result = fit_model(tacs, model, input_function, frames, method=method, **options)
        seconds = time.perf_counter() - start
        columns = result_columns(spec, result)
        values = np.column_stack([columns[name] for name in names])
        values[~result.ok] = np.nan
        out[sub_mask] = values
    if timing is not None:
        timing["fit_s"] = seconds
    return out, n


def gather_chunks(chunks, bounds, shape) -> np.ndarray:
    """Assemble chunk maps ([X, Y, z1 - z0, C] each) into a volume [X, Y, Z, C]."""
    out = np.full((*shape[:3], chunks[0].shape[-1]), np.nan, dtype=np.float32)
    for maps, (z0, z1) in zip(chunks, bounds, strict=True):
        if maps.shape[2] != z1 - z0 or maps.shape[:2] != tuple(shape[:2]):
            raise ValueError(f"chunk of shape {maps.shape} does not fit slices {z0}-{z1}")
        out[:, :, z0:z1] = maps
    return out
