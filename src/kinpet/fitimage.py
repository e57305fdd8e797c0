"""Parametric maps of a whole dynamic image, slab by slab, without Snakemake.

The driver of ``kinpet fit-image``: the image is read a few axial slices at a time (a slab
within a memory budget), the masked voxels of each slab are fitted with any model of the
registry (:func:`kinpet.modelfit.fit_model`), and the maps are assembled. With a fitted input delay
the usual practice is followed: one delay per region (each label of a label map, or the
whole mask), fitted on the region's mean curve and then held for its voxels.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.models import bids_label, get_model, map_names, result_columns


def map_units(model: str) -> dict[str, str]:
    """Unit of each map of a fit of ``model`` (and of the delay map)."""
    spec = get_model(model)
    return {**spec.units, "SSE": "(kBq/ml)^2", "delay": "s"}


def slab_slices(shape, budget_mb: float) -> int:
    """Axial slices per slab so that one float32 slab [X, Y, n, T] fits ``budget_mb``."""
    x, y, z, t = shape
    per_slice_mb = x * y * t * 4 / 2**20
    return int(min(z, max(1, budget_mb // max(per_slice_mb, 1e-9))))


def slab_bounds(n_slices: int, per_slab: int) -> list[tuple[int, int]]:
    return [(z0, min(z0 + per_slab, n_slices)) for z0 in range(0, n_slices, per_slab)]


def region_mean_curves(read_slab: Callable, regions: np.ndarray, per_slab: int):
    """Mean curve of each region (label > 0) of ``regions`` [X, Y, Z]: (labels, [R, T])."""
    labels = np.unique(regions[regions > 0])
    sums, counts = None, np.zeros(len(labels))
    for z0, z1 in slab_bounds(regions.shape[2], per_slab):
        slab = read_slab(z0, z1)
        if sums is None:
            sums = np.zeros((len(labels), slab.shape[-1]))
        part = regions[:, :, z0:z1]
        for i, label in enumerate(labels):
            inside = part == label
            sums[i] += slab[inside].sum(axis=0, dtype=np.float64)
            counts[i] += inside.sum()
    return labels, sums / counts[:, None]


def region_delays(
    read_slab: Callable,
    regions: np.ndarray,
    per_slab: int,
    input_function: InputFunction,
    frames: FrameSchedule,
    delay_bounds_s,
    model: str = "irreversible_2tc",
    **fit_options,
) -> dict[int, float]:
    """The input delay (s) of each region, fitted on its mean curve (label -> delay)."""
    from kinpet.modelfit import fit_model

    labels, curves = region_mean_curves(read_slab, regions, per_slab)
    result = fit_model(curves, model, input_function, frames, delay_bounds_s=delay_bounds_s,
                       **fit_options)  # fmt: skip
    return {int(label): float(d) for label, d in zip(labels, result.delay_s, strict=True)}


def fit_image(
    read_slab: Callable,
    regions: np.ndarray,
    input_function: InputFunction,
    frames: FrameSchedule,
    per_slab: int,
    delays: dict[int, float] | None = None,
    progress: Callable[[str], None] | None = None,
    model: str = "irreversible_2tc",
    **fit_options,
) -> np.ndarray:
    """Fit every voxel with ``regions > 0``; maps [X, Y, Z, M] (the ``model``'s
    :func:`kinpet.models.map_names`, NaN elsewhere and where a fit failed, float32).

    Parameters
    ----------
    read_slab : callable
        ``read_slab(z0, z1)`` -> the image's slices [X, Y, z1 - z0, T] (kBq/ml).
    regions : int array [X, Y, Z]
        0 outside; with ``delays``, the label of each voxel's region.
    input_function, frames
        The measured input and the frames.
    per_slab : int
        Slices read and fitted at a time (:func:`slab_slices`).
    delays : dict, optional
        Region label -> input delay (s) held for its voxels.
    progress : callable, optional
        Called with one line per slab.
    model : str
        A model of :data:`kinpet.models.MODELS`.
    **fit_options
        Passed to :func:`kinpet.modelfit.fit_model` (method, weights, sampling, fixed,
        blood_function, ...); a region's delay shifts ``blood_function`` too.
    """
    from kinpet.modelfit import fit_model

    spec = get_model(model)
    names = map_names(spec)
    shape = regions.shape
    maps = np.full((*shape, len(names)), np.nan, dtype=np.float32)
    bounds = slab_bounds(shape[2], per_slab)
    total = int((regions > 0).sum())
    done, started = 0, time.perf_counter()
    blood = fit_options.pop("blood_function", None)
    for i, (z0, z1) in enumerate(bounds):
        slab = read_slab(z0, z1)
        part = regions[:, :, z0:z1]
        groups = {0: part > 0} if delays is None else {k: part == k for k in delays}
        for label, inside in groups.items():
            n = int(inside.sum())
            if not n:
                continue
            d = 0.0 if delays is None else delays[label]
            whole_blood = None if blood is None else blood.delayed(d)
            result = fit_model(slab[inside], model, input_function.delayed(d), frames,
                               blood_function=whole_blood, **fit_options)  # fmt: skip
            columns = result_columns(spec, result)
            values = np.column_stack([columns[name] for name in names])
            values[~result.ok] = np.nan
            maps[:, :, z0:z1][inside] = values
            done += n
        if progress is not None:
            elapsed = time.perf_counter() - started
            eta = elapsed / done * (total - done) if done else float("nan")
            progress(
                f"slab {i + 1}/{len(bounds)}: slices {z0}-{z1 - 1}, {done}/{total} voxels, "
                f"{elapsed:.1f} s, about {eta:.0f} s left"
            )
    return maps


def map_file_names(prefix: str, model: str, delay: bool) -> dict[str, str]:
    """PET-BIDS derivative names of the maps of a fit of ``model``:
    ``<prefix>_model-<label>_meas-<map>_mimap.nii.gz`` (label: :func:`bids_label`)."""
    spec = get_model(model)
    names = [*map_names(spec), "delay"] if delay else list(map_names(spec))
    label = bids_label(spec)
    return {name: f"{prefix}_model-{label}_meas-{name}_mimap.nii.gz" for name in names}
