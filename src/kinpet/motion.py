"""Respiratory motion of the phantom, averaged within each frame (docs/phantom.md).

Breathing moves the thorax and upper abdomen along z (head-feet) and y (anterior-posterior).
At breathing state s in [0, 1] (0: end-exhale, the position of the labels and the truth)
every voxel of axial slice z is displaced by

    d(z, s) = s w(z) (amplitude_z, amplitude_y)

with w(z) a stretch profile: 0 at the lung apex, rising linearly to 1 at the top of the
liver (the diaphragm's dome, which moves most), falling linearly to 0 at the lower pole of
the kidneys; 0 above and below. Each slice moves rigidly, and slices move by different
amounts. The state follows s(t) = sin^2(pi t / period), a smooth breathing cycle with
longer end-exhale dwell than a sine.

A frame records the time average of the moving activity. With the cycle cut into ``bins``
equal phase bins, the frame's image is the sum over bins of the displaced frame image at
the bin's middle state, each weighted by the share of the frame spent in it (exact for any
frame length: whole cycles and the partial ones at either end). Activity that changes
within a frame is displaced as its frame mean, as a scanner's frame averages it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from kinpet.anatomy import LABEL_INDEX
from kinpet.constants import FWHM_TO_SIGMA

PHASE_BINS = 8


@dataclass(frozen=True)
class Breathing:
    """Respiratory motion settings (``phantom.motion`` in the config).

    Parameters
    ----------
    amplitude_z_mm, amplitude_y_mm : float
        Displacement at the diaphragm at end-inhale, mm: along z towards the feet and along
        y towards the front (anterior) when positive.
    period_s : float
        Length of one breathing cycle (s).
    bins : int
        Phase bins of the cycle that each frame's average is made of.
    cardiac_fwhm_mm : float
        Heartbeat: the heart's activity (myocardium and the blood pools within its extent)
        spread by a Gaussian of this FWHM (mm) in every frame, the frame average of its
        beating (every frame, 2 s or longer, spans a beat); 0: none.
    """

    amplitude_z_mm: float = 0.0
    amplitude_y_mm: float = 0.0
    period_s: float = 4.0
    bins: int = PHASE_BINS
    cardiac_fwhm_mm: float = 0.0

    def __post_init__(self):
        for name in ("amplitude_z_mm", "amplitude_y_mm", "period_s", "cardiac_fwhm_mm"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"phantom motion {name} must be a finite number")
        if self.cardiac_fwhm_mm < 0:
            raise ValueError(
                f"phantom motion cardiac_fwhm_mm must be >= 0 mm, not {self.cardiac_fwhm_mm}"
            )
        if self.period_s <= 0:
            raise ValueError(f"phantom motion period_s must be > 0 s, not {self.period_s}")
        if int(self.bins) != self.bins or self.bins < 2:
            raise ValueError(f"phantom motion bins must be an integer >= 2, not {self.bins}")

    @property
    def breathes(self) -> bool:
        """Respiratory motion: an amplitude other than 0."""
        return self.amplitude_z_mm != 0.0 or self.amplitude_y_mm != 0.0

    @property
    def is_still(self) -> bool:
        """No motion: both amplitudes 0 and no cardiac blur."""
        return not self.breathes and self.cardiac_fwhm_mm == 0.0


def breathing_state(t_s, period_s: float) -> np.ndarray:
    """s(t) = sin^2(pi t / period): 0 at end-exhale, 1 at end-inhale."""
    return np.sin(np.pi * np.asarray(t_s, dtype=np.float64) / period_s) ** 2


def phase_weights(start_s: float, end_s: float, period_s: float, bins: int) -> np.ndarray:
    """The share of the frame [start_s, end_s) spent in each of ``bins`` equal phase bins."""
    edges = np.arange(bins + 1) / bins  # phase in cycles
    first, last = start_s / period_s, end_s / period_s
    cycles = np.arange(np.floor(first), np.ceil(last) + 1)
    lo = cycles[:, None] + edges[None, :-1]
    hi = cycles[:, None] + edges[None, 1:]
    overlap = np.clip(np.minimum(hi, last) - np.maximum(lo, first), 0.0, None)
    weights = overlap.sum(axis=0)
    return weights / weights.sum()


def bin_states(period_s: float, bins: int) -> np.ndarray:
    """The breathing state at the middle of each phase bin."""
    return breathing_state((np.arange(bins) + 0.5) / bins * period_s, period_s)


def stretch_profile(z_mm: np.ndarray, apex_mm: float, dome_mm: float, low_mm: float):
    """w(z): 0 at the lung apex, 1 at the diaphragm's dome, 0 at the kidneys' lower pole."""
    if not low_mm < dome_mm < apex_mm:
        raise ValueError(
            "respiratory motion needs the kidneys' lower pole below the top of the liver "
            f"below the lung apex (z = {low_mm:.1f}, {dome_mm:.1f}, {apex_mm:.1f} mm)"
        )
    z = np.asarray(z_mm, dtype=np.float64)
    return np.interp(z, [low_mm, dome_mm, apex_mm], [0.0, 1.0, 0.0], left=0.0, right=0.0)


def organ_extent_mm(labels_zyx: np.ndarray, label: int, z_mm: np.ndarray, which: str):
    """The lowest (``"low"``) or highest (``"high"``) z (mm) of slices holding ``label``."""
    slices = np.flatnonzero((labels_zyx == label).any(axis=(1, 2)))
    if slices.size == 0:
        return None
    return float(z_mm[slices[0]] if which == "low" else z_mm[slices[-1]])


def breathing_profile(labels_zyx: np.ndarray, z_mm: np.ndarray, source: str) -> np.ndarray:
    """w(z) of :func:`stretch_profile` from the labels' lungs, liver and kidneys.

    ``z_mm`` is the z coordinate of each axial slice; ``source`` names the anatomy in the
    error when one of the three organs is missing.
    """
    bounds = {
        "lungs": organ_extent_mm(labels_zyx, LABEL_INDEX["lungs"], z_mm, "high"),
        "liver": organ_extent_mm(labels_zyx, LABEL_INDEX["liver"], z_mm, "high"),
        "kidneys": organ_extent_mm(labels_zyx, LABEL_INDEX["kidneys"], z_mm, "low"),
    }
    missing = [name for name, value in bounds.items() if value is None]
    if missing:
        raise ValueError(
            f"{source}: respiratory motion (phantom.motion) is placed by the lungs, the liver "
            f"and the kidneys; this anatomy has no {', '.join(missing)} (set the amplitudes "
            "to 0)"
        )
    return stretch_profile(z_mm, bounds["lungs"], bounds["liver"], bounds["kidneys"])


def _shifted(plane: np.ndarray, k: int) -> np.ndarray:
    """out[i] = plane[i + k] along axis 0, 0 where i + k falls outside."""
    out = np.zeros_like(plane)
    n = plane.shape[0]
    if -n < k < n:
        if k >= 0:
            out[: n - k] = plane[k:]
        else:
            out[-k:] = plane[: n + k]
    return out


def _sample(array: np.ndarray, position: float) -> np.ndarray:
    """array at a fractional index along axis 0 (linear; 0 outside)."""
    k = int(np.floor(position))
    f = position - k

    def at(i):
        return array[i] if 0 <= i < array.shape[0] else np.zeros(array.shape[1:])

    return (1.0 - f) * at(k) + f * at(k + 1)


def displaced(image_zyx: np.ndarray, dz_vox: np.ndarray, dy_vox: np.ndarray) -> np.ndarray:
    """The image moved by (dz, dy) voxels per axial slice: out(z, y) = in(z - dz, y - dy).

    Linear interpolation in z and y (x is not moved); what moves in from outside the field
    of view is 0. Slice by slice, so memory stays at one image.
    """
    image = np.asarray(image_zyx, dtype=np.float64)
    out = np.empty_like(image)
    for z in range(image.shape[0]):
        plane = _sample(image, z - float(dz_vox[z]))  # [y, x]
        source_y = -float(dy_vox[z])
        k = int(np.floor(source_y))
        g = source_y - k
        out[z] = (1.0 - g) * _shifted(plane, k) + g * _shifted(plane, k + 1)
    return out


def frame_average(
    image_zyx: np.ndarray,
    start_s: float,
    end_s: float,
    breathing: Breathing,
    profile: np.ndarray,
    voxel_mm: float,
) -> np.ndarray:
    """The frame's image as the time average of the breathing body over [start_s, end_s).

    ``profile`` is w(z) per axial slice (:func:`stretch_profile`).
    """
    if not breathing.breathes:
        return image_zyx
    weights = phase_weights(start_s, end_s, breathing.period_s, breathing.bins)
    states = bin_states(breathing.period_s, breathing.bins)
    out = np.zeros(image_zyx.shape, dtype=np.float64)
    for weight, state in zip(weights, states, strict=True):
        if weight == 0.0:
            continue
        # z runs feet to head and y front to back: inhaling moves both towards lower indices.
        dz = -state * profile * breathing.amplitude_z_mm / voxel_mm
        dy = -state * profile * breathing.amplitude_y_mm / voxel_mm
        out += weight * displaced(image_zyx, dz, dy)
    return out.astype(image_zyx.dtype)


def frame_states(starts_s, durations_s, breathing: Breathing) -> np.ndarray:
    """The mean breathing state each frame records (0: still at end-exhale, 1: at
    end-inhale), as the simulation weighs the phase bins: the motion trace of a frame."""
    states = bin_states(breathing.period_s, breathing.bins)
    return np.array(
        [
            phase_weights(t0, t0 + d, breathing.period_s, breathing.bins) @ states
            for t0, d in zip(starts_s, durations_s, strict=True)
        ]
    )


def heart_mask(labels_zyx: np.ndarray) -> np.ndarray:
    """The beating heart: its myocardium and the blood pools within the heart's bounding box
    (its chambers; the vessels beyond stay still)."""
    heart = labels_zyx == LABEL_INDEX["heart"]
    if not heart.any():
        return heart
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(heart))
    pools = np.zeros_like(heart)
    pools[box] = labels_zyx[box] == LABEL_INDEX["heart_blood"]
    return heart | pools


def cardiac_blur(image_zyx: np.ndarray, heart: np.ndarray, fwhm_mm: float, voxel_mm: float):
    """The frame's image with the heart's activity spread by a Gaussian of ``fwhm_mm``: the
    time average of a beating heart, its activity kept (the spread part may leave the mask:
    the beat moves it there); the rest of the image unchanged."""
    if fwhm_mm == 0.0 or not heart.any():
        return image_zyx
    part = np.where(heart, image_zyx, 0.0).astype(np.float64)
    sigma = fwhm_mm * FWHM_TO_SIGMA / voxel_mm
    spread = gaussian_filter(part, sigma=sigma, mode="constant")
    return (image_zyx - part + spread).astype(image_zyx.dtype)
