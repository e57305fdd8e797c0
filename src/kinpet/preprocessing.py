"""Preprocessing computations: resampling, the slice range (lungs to bladder), cropping.

Pure functions on arrays (file reading and writing live in :mod:`kinpet.io`).

Conventions
-----------
Arrays are indexed like NIfTI data, ``[x, y, z]`` or ``[x, y, z, t]``, with a 4x4 affine
that maps voxel indices to millimetres in nibabel's RAS+ world. The *canonical* grid of
the pipeline is axis-aligned LPS+: index x increases towards the patient's left, y towards
posterior, z towards the head (superior), the orientation the phantom writes and the one
ITK uses for its physical space. :func:`resample_to_spacing` always returns this grid,
whatever the orientation (flipped, permuted or oblique) of its input.

Slices are ``[H, W] = [y, x]``: rows run anterior to posterior and columns from the
patient's right to left, the usual radiological display of an axial slice.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import SimpleITK as sitk

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction

# nibabel's world is RAS+, ITK's physical space is LPS+: flip x and y.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

# An extent within this many voxels of a whole number of output voxels is not rounded up
# (float rounding in affines must not add an empty slice).
_EXTENT_SLACK = 1e-6

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


class PreprocessingError(ValueError):
    """Preprocessing cannot go on (e.g. a label needed for the slice range is missing)."""


# -- resampling -------------------------------------------------------------------------


def canonical_grid(shape, affine, spacing_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """The LPS-aligned grid of ``spacing_mm`` voxels covering an image's physical extent.

    Parameters
    ----------
    shape : sequence of int
        Spatial shape of the input image (the first three dimensions are used).
    affine : array_like, shape (4, 4)
        Voxel-to-world (RAS+, mm) affine of the input.
    spacing_mm : float
        Isotropic voxel size of the output grid (mm).

    Returns
    -------
    shape : tuple of 3 int
        Output grid shape; just enough voxels to cover the input's bounding box (the outer
        edges of its voxels), the box centred in the output grid.
    affine : ndarray, shape (4, 4)
        Output voxel-to-world (RAS+, mm) affine: ``diag(-s, -s, s)`` plus a translation.
    """
    affine = np.asarray(affine, dtype=np.float64)
    n = np.asarray(shape[:3], dtype=np.float64)
    # The eight corners of the box of voxel edges, in LPS millimetres.
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    edge_index = corners * n - 0.5
    world = _RAS_TO_LPS @ (affine[:3, :3] @ edge_index.T + affine[:3, 3:4])
    low, high = world.min(axis=1), world.max(axis=1)
    extent = high - low
    size = np.maximum(1, np.ceil(extent / spacing_mm - _EXTENT_SLACK)).astype(int)
    # Centre of the first output voxel, so that the input box sits in the middle.
    origin_lps = low + (extent - size * spacing_mm) / 2 + spacing_mm / 2
    out = np.eye(4)
    out[:3, :3] = _RAS_TO_LPS * spacing_mm
    out[:3, 3] = _RAS_TO_LPS @ origin_lps
    return tuple(int(s) for s in size), out


def _to_sitk(volume: np.ndarray, affine: np.ndarray, source: str | None) -> sitk.Image:
    """A 3-D array ``[x, y, z]`` with a RAS+ affine as a SimpleITK image (LPS space)."""
    lps = _RAS_TO_LPS @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        where = f"{source}: " if source else ""
        raise PreprocessingError(f"{where}the affine has shear; only rotations are supported")
    # GetImageFromArray reads numpy arrays as [z, y, x].
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.T))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(d) for d in direction.ravel()))
    image.SetOrigin(tuple(float(o) for o in _RAS_TO_LPS @ affine[:3, 3]))
    return image


def resample_to_spacing(
    volume,
    affine,
    spacing_mm: float = 2.5,
    interpolation: str = "linear",
    source: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample an image onto the canonical grid of isotropic ``spacing_mm`` voxels.

    SimpleITK ``Resample`` with an identity transform: the physical space is kept, only
    the grid changes (see :func:`canonical_grid`). Voxels of the new grid outside the
    input get 0. A 4-D input is resampled frame by frame.

    Parameters
    ----------
    volume : array_like, shape (x, y, z) or (x, y, z, t)
        Image values (PET: concentrations, e.g. kBq/ml; labels: integers).
    affine : array_like, shape (4, 4)
        Voxel-to-world (RAS+, mm) affine of ``volume``.
    spacing_mm : float
        Output voxel size (mm), 2.5 in the paper.
    interpolation : {"linear", "nearest"}
        Linear for activity, nearest neighbour for label maps.
    source : str, optional
        File name for error messages.

    Returns
    -------
    resampled : ndarray, shape (X, Y, Z) or (X, Y, Z, t)
        float32 for linear interpolation, int16 for nearest neighbour.
    affine : ndarray, shape (4, 4)
        The output's voxel-to-world (RAS+, mm) affine.
    """
    if interpolation not in _INTERPOLATORS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATORS)}")
    volume = np.asarray(volume)
    affine = np.asarray(affine, dtype=np.float64)
    if volume.ndim == 4:
        frames = [
            resample_to_spacing(volume[..., t], affine, spacing_mm, interpolation, source)[0]
            for t in range(volume.shape[3])
        ]
        return np.stack(frames, axis=-1), canonical_grid(volume.shape, affine, spacing_mm)[1]
    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D or 4-D array, got shape {volume.shape}")
    if interpolation == "linear":
        volume, pixel = volume.astype(np.float32, copy=False), sitk.sitkFloat32
    else:
        if np.abs(volume).max(initial=0) > np.iinfo(np.int16).max:
            raise PreprocessingError("label values do not fit in int16")
        volume, pixel = volume.astype(np.int16, copy=False), sitk.sitkInt16
    shape, out_affine = canonical_grid(volume.shape, affine, spacing_mm)
    image = _to_sitk(volume, affine, source)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(shape)
    resampler.SetOutputSpacing((float(spacing_mm),) * 3)
    resampler.SetOutputOrigin(tuple(float(o) for o in _RAS_TO_LPS @ out_affine[:3, 3]))
    resampler.SetOutputDirection(tuple(np.eye(3).ravel()))
    resampler.SetTransform(sitk.Transform())
    resampler.SetInterpolator(_INTERPOLATORS[interpolation])
    resampler.SetDefaultPixelValue(0)
    resampler.SetOutputPixelType(pixel)
    out = sitk.GetArrayFromImage(resampler.Execute(image)).T
    return np.ascontiguousarray(out), out_affine


def voxel_volume_ml(affine) -> float:
    """Volume of one voxel (ml = cm³) from a voxel-to-world affine in mm."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


# -- image-derived input ------------------------------------------------------------------


def mean_curve(frames: Iterable[np.ndarray], mask: np.ndarray) -> np.ndarray:
    """Mean of each 3-D frame over a boolean mask (same units as the frames).

    ``frames`` may be a 4-D array ``[x, y, z, t]`` or any iterable of 3-D frames, so that
    large images can be streamed one frame at a time.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise PreprocessingError("the mask is empty")
    if isinstance(frames, np.ndarray) and frames.ndim == 4:
        volume = frames
        frames = (volume[..., t] for t in range(volume.shape[3]))
    return np.array([float(np.mean(frame[mask], dtype=np.float64)) for frame in frames])


def image_derived_input(
    pet, labels, aorta_index: int, frames: FrameSchedule, source: str | None = None
) -> InputFunction:
    """The paper's image-derived input: mean aorta activity per frame at frame mid-times.

    Parameters
    ----------
    pet : ndarray [x, y, z, t] or iterable of [x, y, z] frames
        Decay-corrected activity concentrations (kBq/ml).
    labels : ndarray [x, y, z]
        Integer label map on the PET grid.
    aorta_index : int
        Label value of the aorta.
    frames : FrameSchedule
        The scan's frames; one mean per frame.

    Returns
    -------
    InputFunction
        Samples at ``frames.mids_s``. The kinetic model holds the last value for the
        second half of the last frame (documented in :mod:`kinpet.inputfunction`).
    """
    values = mean_curve(pet, np.asarray(labels) == aorta_index)
    if values.size != len(frames):
        raise PreprocessingError(f"{values.size} image frames but {len(frames)} frame times")
    return InputFunction(frames.mids_s, values, source=source or "image-derived (aorta)")


# -- slices and crops ---------------------------------------------------------------------


# The default slice range: the bottom of the bladder to the top of the lungs (the paper's).
DEFAULT_SLICE_BOUNDS = ("bladder", "lungs")
_OVERRIDE = (
    "set preprocess.slice_range: [lo, hi] (z in mm, or two organ names) for a scan without it"
)


def slice_range_labels(bounds=None) -> dict:
    """The organs a slice range needs, each with what an error about it adds.

    Parameters
    ----------
    bounds : (lo, hi), optional
        As :func:`slice_range`; None: the default, bladder to lungs.

    Returns
    -------
    dict
        Organ name -> the end of the message when it is missing: the default range's names
        the override (``preprocess.slice_range``), a chosen range's the setting.
    """
    if bounds is None:
        hint = "; the slice range runs from the bottom of the bladder to the top of the lungs: "
        return {name: hint + _OVERRIDE for name in DEFAULT_SLICE_BOUNDS}
    return {name: " (preprocess.slice_range)" for name in bounds if isinstance(name, str)}


def _label_z_extent(labels, label_names: dict, name: str, source, default: bool) -> np.ndarray:
    where = f"{source}: " if source else ""
    hint = slice_range_labels(None if default else (name,))[name]
    if name not in label_names:
        raise PreprocessingError(
            f"{where}no label named {name!r} (labels: {', '.join(label_names)}){hint}"
        )
    z = np.flatnonzero((labels == label_names[name]).any(axis=(0, 1)))
    if z.size == 0:
        raise PreprocessingError(f"{where}label {name!r} has no voxels{hint}")
    return z


def _bound_index(bound, end: str, labels, label_names, voxel_mm, z0_mm, source, default) -> int:
    """Slice index of one end (``"lo"`` or ``"hi"``) of the range: an organ's lowest or
    highest slice, or the first (last) slice whose centre lies at or above (below) a z in
    mm."""
    if isinstance(bound, str):
        z = _label_z_extent(labels, label_names, bound, source, default)
        return int(z.min() if end == "lo" else z.max())
    position = (float(bound) - z0_mm) / voxel_mm
    # A bound on a slice centre (up to float rounding in the affine) includes that slice.
    if end == "lo":
        return int(np.ceil(position - 1e-6))
    return int(np.floor(position + 1e-6))


def slice_range(
    labels,
    label_names: dict,
    voxel_mm: float,
    margins_mm=(0.0, 0.0),
    n_slices: int | None = None,
    source: str | None = None,
    bounds=None,
    z0_mm: float = 0.0,
) -> np.ndarray:
    """Axial slice indices from the bottom of the bladder to the top of the lungs, or
    between other bounds.

    Parameters
    ----------
    labels : ndarray, shape (x, y, z)
        Label map on the canonical grid (z index increases towards the head).
    label_names : dict
        Label name -> value; needs the organs that ``bounds`` names.
    voxel_mm : float
        Slice thickness (mm) of the grid, to convert the margins and bounds in mm.
    margins_mm : (float, float)
        Extra distance (mm) above the top and below the bottom of the range; rounded to the
        nearest whole slice (halves up) and clipped to the image.
    n_slices : int, optional
        Keep this many slices, evenly spaced over the range (the paper keeps 75 per
        patient); all slices of the range when None or when the range is shorter.
    source : str, optional
        File name for error messages.
    bounds : (lo, hi), optional
        The bottom and top of the range (``preprocess.slice_range``), each an organ name
        (``lo``: the organ's lowest slice, ``hi``: its highest) or a z coordinate in mm
        (the world z of the image's affine; slices whose centres lie between the two).
        Default :data:`DEFAULT_SLICE_BOUNDS`, bladder to lungs.
    z0_mm : float
        World z (mm) of the centre of slice 0 (the affine's ``[2, 3]``), for bounds in mm.

    Returns
    -------
    ndarray of int
        Slice indices along z, increasing (from the bottom of the range upwards).
    """
    labels = np.asarray(labels)
    default = bounds is None
    lo, hi = DEFAULT_SLICE_BOUNDS if default else bounds
    where = f"{source}: " if source else ""
    args = (labels, label_names, voxel_mm, z0_mm, source, default)
    top = _bound_index(hi, "hi", *args)
    bottom = _bound_index(lo, "lo", *args)
    if default and bottom > top:
        raise PreprocessingError(
            f"{where}the bladder (lowest slice {bottom}) lies above the top of the lungs "
            f"(slice {top}); is the image upside down?"
        )
    n_z = labels.shape[2]
    if bottom > top or top < 0 or bottom > n_z - 1:
        raise PreprocessingError(
            f"{where}preprocess.slice_range {list(bounds)} holds no slice of the image "
            f"(slices 0-{n_z - 1} at z {z0_mm:g} to {z0_mm + (n_z - 1) * voxel_mm:g} mm; "
            f"the range's ends at slices {bottom} and {top})"
        )
    # floor(x + 0.5): halves round up (Python's round() would round 2.5 down to 2).
    above, below = (int(np.floor(m / voxel_mm + 0.5)) for m in margins_mm)
    z0 = max(0, bottom - below)
    z1 = min(n_z - 1, top + above)
    z = np.arange(z0, z1 + 1)
    if n_slices is not None and 0 < n_slices < z.size:
        z = np.unique(np.round(np.linspace(z0, z1, n_slices)).astype(int))
    return z


def centre_crop_offsets(labels, z, crop_size, background_index: int | None = 0) -> tuple[int, int]:
    """First x and y index of a crop centred on the body, one crop for all slices.

    Parameters
    ----------
    labels : ndarray, shape (x, y, z)
        Label map on the canonical grid.
    z : array_like of int
        The slices that will be cropped.
    crop_size : (int, int)
        Crop size along x and y (voxels).
    background_index : int, optional
        Label value outside the body. The crop is centred on the bounding box of all
        other labels in the slices ``z``; on the array centre when there is none.

    Returns
    -------
    (x0, y0) : tuple of int
        The crop covers ``x0 .. x0 + crop_x - 1`` and ``y0 .. y0 + crop_y - 1``. It is
        kept inside the image when the image is larger than the crop; when the image is
        smaller, the offset is negative (or zero) and the missing part is zero padding.
    """
    labels = np.asarray(labels)
    sub = labels[:, :, np.asarray(z, dtype=int)]
    body = sub != background_index if background_index is not None else sub != 0
    offsets = []
    for axis, (n, width) in enumerate(zip(labels.shape[:2], crop_size, strict=True)):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(body.any(axis=other))
        centre = (present[0] + present[-1]) / 2 if present.size else (n - 1) / 2
        # floor(x + 0.5): deterministic rounding of half-voxel centres.
        start = int(np.floor(centre - (width - 1) / 2 + 0.5))
        start = min(max(start, min(0, n - width)), max(0, n - width))
        offsets.append(start)
    return offsets[0], offsets[1]


def _crop_xy(volume: np.ndarray, x0: int, y0: int, crop_size) -> np.ndarray:
    """Crop (with zero padding) the first two axes of ``volume``."""
    wx, wy = crop_size
    out = np.zeros((wx, wy, *volume.shape[2:]), dtype=volume.dtype)
    xs, ys = max(x0, 0), max(y0, 0)
    xe, ye = min(x0 + wx, volume.shape[0]), min(y0 + wy, volume.shape[1])
    if xe > xs and ye > ys:
        out[xs - x0 : xe - x0, ys - y0 : ye - y0] = volume[xs:xe, ys:ye]
    return out


def extract_slices(pet, labels, z, crop_offsets, crop_size) -> tuple[np.ndarray, np.ndarray]:
    """Cut cropped axial slices out of a 4-D PET image and its label map.

    Parameters
    ----------
    pet : ndarray, shape (x, y, z, t)
        Activity (kBq/ml) on the canonical grid.
    labels : ndarray, shape (x, y, z)
        Labels on the same grid.
    z : array_like of int
        Slice indices.
    crop_offsets : (int, int)
        ``(x0, y0)`` from :func:`centre_crop_offsets`.
    crop_size : (int, int)
        Crop size along x and y: ``W = crop_size[0]``, ``H = crop_size[1]``.

    Returns
    -------
    tacs : ndarray, shape (S, T, H, W), float32
        ``tacs[s, t, h, w] = pet[x0 + w, y0 + h, z[s], t]`` (zero outside the image).
    labels : ndarray, shape (S, H, W), int16
    """
    z = np.asarray(z, dtype=int)
    x0, y0 = crop_offsets
    pet_crop = _crop_xy(np.asarray(pet)[:, :, z, :], x0, y0, crop_size)  # [W, H, S, T]
    lab_crop = _crop_xy(np.asarray(labels)[:, :, z], x0, y0, crop_size)  # [W, H, S]
    tacs = np.ascontiguousarray(pet_crop.transpose(2, 3, 1, 0), dtype=np.float32)
    return tacs, np.ascontiguousarray(lab_crop.transpose(2, 1, 0), dtype=np.int16)


def slices_to_volume(values, z, crop_offsets, shape, fill: float = 0.0) -> np.ndarray:
    """Put per-slice maps back into the full volume (the inverse of :func:`extract_slices`).

    Parameters
    ----------
    values : ndarray, shape (S, H, W) or (S, C, H, W)
        Per-slice values (e.g. predicted parameters, C channels).
    z : array_like of int, shape (S,)
        Slice index of each slice.
    crop_offsets : (int, int)
        ``(x0, y0)`` of the crop.
    shape : (int, int, int)
        Shape ``(x, y, z)`` of the full canonical grid.
    fill : float
        Value outside the slices and crops.

    Returns
    -------
    ndarray, shape (x, y, z) or (x, y, z, C)
    """
    values = np.asarray(values)
    single = values.ndim == 3
    if single:
        values = values[:, None]
    n_s, n_c, height, width = values.shape
    x0, y0 = crop_offsets
    out = np.full((*shape[:3], n_c), fill, dtype=values.dtype)
    xs, ys = max(x0, 0), max(y0, 0)
    xe, ye = min(x0 + width, shape[0]), min(y0 + height, shape[1])
    # [S, C, H, W] -> [W, H, S, C]
    block = values.transpose(3, 2, 0, 1)[xs - x0 : xe - x0, ys - y0 : ye - y0]
    out[xs:xe, ys:ye][:, :, np.asarray(z, dtype=int)] = block
    return out[..., 0] if single else out
