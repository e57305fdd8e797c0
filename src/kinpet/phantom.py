"""A procedural whole-body dynamic FDG phantom with known truth (docs/phantom.md).

Anatomy is built from geometric shapes placed in physical millimetres, so the small demo
body and the full-size body of the paper share one code path: a size preset (:data:`SIZES`)
scales an adult reference body (about 350 x 250 mm transaxially, 900 mm from the upper
thighs to the neck) and sets the field of view; voxels are 1.6 mm (the paper's
reconstructions) unless told otherwise.

Image formation, per subject:

1. organ labels and per-voxel parameters (K1, k2, k3, Vb): organ population means
   (``config/organ_values.tsv``), a log-normal per-subject factor per organ and parameter,
   and a smooth random field inside each organ, clipped to the paper's bounds;
2. the exact frame-averaged model (:mod:`kinpet.kinetics`), evaluated once per voxel, slab
   by slab along z, into a temporary float32 file ordered [t, z, y, x];
3. frame by frame: Gaussian PSF blur, then Gaussian noise with variance a C / (d dt)
   (d the mean decay factor of the frame, dt its length in minutes), with ``a`` set so that
   the coefficient of variation of the liver in the blurred reference frame (the last
   frame, 300 s in the paper's schedule) equals ``noise_cov``; negative values are clipped to 0 (see
   :func:`add_noise`).

Special voxels:

- aorta and heart blood pools are pure blood: Vb = 1, so their curve is the frame-averaged
  input (evaluated with K1 = 0, k2 = k3 = 0.01, whose tissue term vanishes);
- the bladder fills with excreted tracer, ``C(t) = clearance * int_0^t A``, frame-averaged
  (evaluated exactly as the model with K1 = clearance, k2 = 0, k3 = 1, Vb = 0);
- background (outside the body) is 0.

Internal volumes are C-ordered [z, y, x] arrays, which is the byte order of a NIfTI volume
of shape (x, y, z); public functions that return volumes say which order they use. The
voxel axes run x right -> left, y anterior -> posterior, z inferior -> superior (NIfTI
orientation "LPS").
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from kinpet.constants import F18_HALF_LIFE_MIN as F18_HALF_LIFE_MIN
from kinpet.constants import F18_LAMBDA_PER_MIN as F18_LAMBDA_PER_MIN
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import PAPER_LOWER, PAPER_UPPER, PARAMETER_NAMES, KineticModel, ki

LABELS = {
    0: "background",
    1: "body",
    2: "bones",
    3: "lungs",
    4: "heart",
    5: "liver",
    6: "kidneys",
    7: "spleen",
    8: "aorta",
    9: "heart_blood",
    10: "gallbladder",
    11: "bladder",
    12: "tumour",
}
LABEL_INDEX = {name: index for index, name in LABELS.items()}
PAPER_ORGANS = ("bones", "lungs", "heart", "liver", "kidneys", "spleen", "aorta")
BLOOD_LABELS = ("aorta", "heart_blood")
TRUTH_NAMES = (*PARAMETER_NAMES, "Ki")

# Population means (K1, k2, k3, Vb) used where the organ table has no row: those of
# config/organ_values.tsv, sources in docs/phantom.md; muscle takes the middle of its
# ranges there, and the gallbladder (bile, little uptake) is an assumption.
DEFAULT_VALUES = {
    "liver": (0.65, 0.68, 0.0035, 0.01),
    "lungs": (0.23, 1.5, 0.012, 0.09),
    "kidneys": (0.79, 0.67, 0.008, 0.08),
    "spleen": (1.5, 2.7, 0.007, 0.04),
    "bones": (0.11, 0.64, 0.025, 0.003),
    "heart": (0.6, 1.2, 0.1, 0.05),
    "tumour": (0.24, 0.78, 0.10, 0.05),
    "body": (0.07, 0.5, 0.03, 0.03),
    "gallbladder": (0.02, 0.5, 0.01, 0.01),
}
# Parameters that make the model's curve the frame-averaged input: the tissue term has
# K1 = 0, and k2 + k3 > 0 keeps the model defined.
BLOOD_MODEL_PARAMS = (0.0, 0.01, 0.01, 1.0)
# Bladder: C = clearance * int A (1/min). Feng's input with a 250 kBq/ml peak has ~2000
# kBq min/ml under it after 60 min, so 0.1/min gives ~200 kBq/ml at the end of the scan,
# ~4 times the liver.
BLADDER_CLEARANCE_PER_MIN = 0.1

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
# Slabs hold at most this many voxels: the model's float64 output is then ~130 MB.
_SLAB_VOXELS = 262_144
# gzip level of the 4D image: noisy float32 barely compresses beyond level 1, which is
# several times faster than the default 9.
_GZIP_LEVEL = 1


@dataclass(frozen=True)
class PhantomSize:
    """A body size preset.

    Parameters
    ----------
    name : str
    fov_mm : tuple of 3 floats
        Field of view (x, y, z) in mm.
    scale : tuple of 2 floats
        Transaxial and axial scale of the adult reference body (350 x 250 x 900 mm).
    """

    name: str
    fov_mm: tuple
    scale: tuple


SIZES = {
    # Paper: an adult from the upper thighs to the neck on the Quadra's 1.6-mm grid.
    "paper": PhantomSize("paper", (400.0, 290.0, 900.0), (1.0, 1.0)),
    # Demo: a child-sized body, ~150 x 110 x 250 mm, ~1 million voxels.
    "demo": PhantomSize("demo", (160.0, 118.0, 250.0), (0.43, 0.28)),
    # Tiny: for unit tests only (~120,000 voxels).
    "tiny": PhantomSize("tiny", (82.0, 61.0, 112.0), (0.22, 0.125)),
}


# -- geometry ----------------------------------------------------------------------------------


@dataclass
class Grid:
    """A voxel grid: shape (x, y, z), voxel size (mm) and the patient coordinates of voxels.

    Patient coordinates (mm): X towards the patient's left, Y towards posterior (both 0 at
    the centre of the field of view), Z towards the head, 0 at the bottom of the field of
    view; voxel centres sit at half a voxel from the edges.
    """

    shape: tuple
    voxel_mm: float

    @classmethod
    def from_fov(cls, fov_mm, voxel_mm: float) -> Grid:
        return cls(tuple(int(round(f / voxel_mm)) for f in fov_mm), float(voxel_mm))

    def axis(self, dim: int) -> np.ndarray:
        """Patient coordinate (mm) of the voxel centres along axis 0 (x), 1 (y) or 2 (z)."""
        n, v = self.shape[dim], self.voxel_mm
        index = np.arange(n, dtype=np.float64)
        if dim == 2:
            return (index + 0.5) * v
        return (index - (n - 1) / 2.0) * v

    @property
    def affine(self) -> np.ndarray:
        """Voxel (x, y, z) to RAS+ world (mm): x runs right -> left, y anterior -> posterior."""
        nx, ny, _ = self.shape
        v = self.voxel_mm
        return np.array(
            [
                [-v, 0.0, 0.0, (nx - 1) / 2.0 * v],
                [0.0, -v, 0.0, (ny - 1) / 2.0 * v],
                [0.0, 0.0, v, 0.5 * v],
                [0.0, 0.0, 0.0, 1.0],
            ]
        )

    def box(self, lo_mm, hi_mm, z_range=None):
        """Index slices (z, y, x) of the voxels whose centres may lie in [lo, hi] (mm)."""
        slices = []
        for dim in (2, 1, 0):
            coords = self.axis(dim)
            start = int(np.searchsorted(coords, lo_mm[dim], side="left"))
            stop = int(np.searchsorted(coords, hi_mm[dim], side="right"))
            if dim == 2 and z_range is not None:
                start, stop = max(start, z_range[0]), min(stop, z_range[1])
            slices.append(slice(start, max(start, stop)))
        return tuple(slices)

    def coords(self, box):
        """Broadcastable patient coordinates (Z, Y, X) of a box of index slices (z, y, x)."""
        z = self.axis(2)[box[0]][:, None, None]
        y = self.axis(1)[box[1]][None, :, None]
        x = self.axis(0)[box[2]][None, None, :]
        return z, y, x


@dataclass
class Ellipsoid:
    """An axis-aligned ellipsoid in patient coordinates (mm)."""

    center: np.ndarray
    semi: np.ndarray

    def bounds(self):
        return self.center - self.semi, self.center + self.semi

    def inside(self, z, y, x):
        c, a = self.center, self.semi
        return ((x - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((z - c[2]) / a[2]) ** 2 <= 1


@dataclass
class Tube:
    """A tube around a polyline (mm), with a radius per vertex (linearly interpolated)."""

    points: np.ndarray
    radii: np.ndarray
    step_mm: float = 0.5

    def __post_init__(self):
        # Dense samples of the centre line: a voxel is inside when its nearest sample is
        # closer than that sample's radius (exact up to step_mm).
        seg = np.diff(self.points, axis=0)
        lengths = np.linalg.norm(seg, axis=1)
        s = np.concatenate([[0.0], np.cumsum(lengths)])
        fine = np.linspace(0.0, s[-1], max(2, int(np.ceil(s[-1] / self.step_mm)) + 1))
        self._samples = np.stack([np.interp(fine, s, self.points[:, d]) for d in range(3)], 1)
        self._radius = np.interp(fine, s, self.radii)
        self._tree = cKDTree(self._samples)

    def bounds(self):
        r = self.radii.max()
        return self.points.min(0) - r, self.points.max(0) + r

    def inside(self, z, y, x):
        zz, yy, xx = np.broadcast_arrays(z, y, x)
        query = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], axis=1)
        dist, nearest = self._tree.query(query)
        return (dist <= self._radius[nearest]).reshape(zz.shape)


@dataclass
class Body:
    """The body outline: elliptical cross-sections with semi-axes varying along z (mm); two
    thighs below ``thigh_top``."""

    z_knots: np.ndarray
    semi_x: np.ndarray
    semi_y: np.ndarray
    thigh_top: float
    thigh_x: float
    thigh_semi: np.ndarray

    def bounds(self):
        a = max(self.semi_x.max(), self.thigh_x + self.thigh_semi[0])
        b = max(self.semi_y.max(), self.thigh_semi[1])
        return np.array([-a, -b, self.z_knots[0]]), np.array([a, b, self.z_knots[-1]])

    def inside(self, z, y, x):
        a = np.interp(z, self.z_knots, self.semi_x)
        b = np.interp(z, self.z_knots, self.semi_y)
        torso = ((x / a) ** 2 + (y / b) ** 2 <= 1) & (z >= self.thigh_top)
        tx, ty = self.thigh_semi
        thighs = (np.minimum((x - self.thigh_x) ** 2, (x + self.thigh_x) ** 2) / tx**2) + (
            y / ty
        ) ** 2 <= 1
        return torso | (thighs & (z < self.thigh_top))


@dataclass
class Shape:
    """One painted region: a label, the union of ``parts`` intersected with
    ``within_shapes``."""

    label: str
    parts: list
    within_shapes: list = field(default_factory=list)  # must also lie inside all of these
    within: str | None = None  # paint only over voxels that already carry this label

    def bounds(self):
        lo = np.min([p.bounds()[0] for p in self.parts], axis=0)
        hi = np.max([p.bounds()[1] for p in self.parts], axis=0)
        return lo, hi


@dataclass
class Cut:
    """A half-space ``normal . (p - point) > 0`` (mm), used to shape organs."""

    point: np.ndarray
    normal: np.ndarray

    def bounds(self):
        big = np.full(3, 1e6)
        return -big, big

    def inside(self, z, y, x):
        n, p = self.normal, self.point
        return n[0] * (x - p[0]) + n[1] * (y - p[1]) + n[2] * (z - p[2]) > 0


def _vec(*values) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def build_anatomy(rng: np.random.Generator, size: PhantomSize) -> list:
    """The subject's shapes in painting order (later shapes overwrite earlier ones).

    Positions are those of the adult reference body (mm, patient coordinates), jittered per
    organ (size +-10 %, position +-10 % of the organ's semi-axes) and then scaled by the
    size preset.
    """
    st, sz = size.scale
    scale = _vec(st, st, sz)
    # Whole-body proportions vary a little: width, depth and length of the trunk.
    body_f = rng.uniform(0.93, 1.07, size=3)

    def jitter(center, semi, amount=0.1):
        f = rng.uniform(1 - amount, 1 + amount, size=3)
        shift = rng.uniform(-amount, amount, size=3) * np.asarray(semi)
        return (np.asarray(center) * _vec(1, 1, body_f[2]) + shift) * scale, (
            np.asarray(semi) * f * scale
        )

    def ellipsoid(center, semi, amount=0.1):
        c, a = jitter(_vec(*center), _vec(*semi), amount)
        return Ellipsoid(c, a)

    def tumour(center, radius_mm):
        # Tumours keep at least 5 mm radius so that they survive the PSF in small bodies.
        c = _vec(*center) * _vec(1, 1, body_f[2]) * scale
        r = np.maximum(radius_mm * rng.uniform(0.8, 1.2) * scale, 5.0)
        return Ellipsoid(c, r)

    z_knots = _vec(0, 110, 250, 400, 550, 700, 790, 830, 850, 900)
    semi_x = _vec(165, 165, 175, 160, 165, 170, 175, 120, 65, 60) * body_f[0]
    semi_y = _vec(115, 115, 120, 112, 118, 125, 115, 90, 60, 60) * body_f[1]
    body = Body(
        z_knots=z_knots * body_f[2] * sz,
        semi_x=semi_x * st,
        semi_y=semi_y * st,
        thigh_top=110 * body_f[2] * sz,
        thigh_x=82 * body_f[0] * st,
        thigh_semi=_vec(78, 85) * body_f[:2] * st,
    )

    def spine_y(z_ref):
        # The vertebral bodies sit ~50 mm in front of the back.
        return np.interp(z_ref, [0, 400, 700, 900], [65, 62, 75, 60]) * body_f[1]

    shapes = [Shape("body", [body])]

    # Bones: segmented vertebral column, sacrum, iliac wings, pubis, femoral heads and shafts.
    vertebrae = []
    for z0 in np.arange(300.0, 860.0, 30.0):
        zc = z0 + 12.5
        vertebrae.append(
            Ellipsoid(_vec(0, spine_y(zc), zc * body_f[2]) * scale, _vec(22, 18, 12.5) * scale)
        )
    bones = [
        *vertebrae,
        ellipsoid((0, 75, 255), (40, 22, 50)),
        ellipsoid((-95, 40, 270), (22, 55, 65)),
        ellipsoid((95, 40, 270), (22, 55, 65)),
        ellipsoid((0, -60, 160), (50, 14, 14)),
        ellipsoid((-88, 0, 150), (24, 24, 24)),
        ellipsoid((88, 0, 150), (24, 24, 24)),
        Ellipsoid(_vec(-85, 5, 60) * scale, _vec(15, 15, 85) * scale),
        Ellipsoid(_vec(85, 5, 60) * scale, _vec(15, 15, 85) * scale),
    ]
    shapes.append(Shape("bones", bones))
    shapes.append(
        Shape(
            "lungs",
            [ellipsoid((-75, 15, 705), (62, 90, 135)), ellipsoid((80, 15, 715), (55, 88, 125))],
        )
    )
    liver = ellipsoid((-55, -5, 520), (105, 85, 75))
    # The liver ends ~55 mm left of its centre (a flat medial face).
    medial = Cut(liver.center + _vec(55 * st, 0, 0), _vec(-1, 0, 0))
    shapes.append(Shape("liver", [liver], within_shapes=[medial]))
    shapes.append(Shape("gallbladder", [ellipsoid((-45, -50, 470), (15, 15, 30))]))
    shapes.append(
        Shape(
            "kidneys",
            [ellipsoid((-75, 55, 400), (28, 25, 55)), ellipsoid((80, 55, 415), (28, 25, 55))],
        )
    )
    shapes.append(Shape("spleen", [ellipsoid((95, 55, 525), (30, 45, 55))]))
    # Heart: myocardium shell with a septum between two blood pools.
    hc, ha = jitter(_vec(25, -35, 630), _vec(62, 52, 58), 0.08)
    outer = Ellipsoid(hc, ha)
    inner = Ellipsoid(hc + _vec(2, 2, 0) * scale, ha - 14 * scale)
    septum_l = Cut(hc - _vec(4, 0, 0) * scale, _vec(1, -0.3, 0))
    septum_r = Cut(hc + _vec(4, 0, 0) * scale, _vec(-1, 0.3, 0))
    shapes.append(Shape("heart", [outer]))
    shapes.append(Shape("heart_blood", [inner]))
    shapes.append(Shape("heart", [inner], within_shapes=[septum_l, septum_r]))
    # Aorta: ascending from the heart, an arch towards posterior, descending along the spine
    # to the bifurcation.
    shift = rng.uniform(-5, 5, size=3)
    theta = np.linspace(0.0, np.pi, 13)
    arch = np.stack([12 + 0 * theta, 15 - 30 * np.cos(theta), 745 + 30 * np.sin(theta)], 1)
    line = np.concatenate(
        [
            _vec(18, -30, 635)[None],
            arch,
            _vec(15, 50, 600)[None],
            _vec(5, 38, 450)[None],
            _vec(0, 32, 320)[None],
        ]
    )
    line = (line * _vec(1, 1, body_f[2]) + shift) * scale
    radii = np.concatenate([[14.0], np.linspace(14, 12, 13), [12.0, 11.0, 10.0]]) * st
    shapes.append(Shape("aorta", [Tube(line, np.maximum(radii, 2.5))]))
    shapes.append(Shape("bladder", [ellipsoid((0, -30, 195), (45, 35, 38))]))
    # Tumours: in the liver, the right lung and a lumbar vertebra.
    zv = 300.0 + 30.0 * 5 + 12.5
    shapes.append(Shape("tumour", [tumour((-80, -20, 545), 14)], within="liver"))
    shapes.append(Shape("tumour", [tumour((-85, 0, 745), 11)], within="lungs"))
    shapes.append(Shape("tumour", [tumour((0, spine_y(zv), zv), 11)], within="bones"))
    return shapes


def label_volume(shapes: list, grid: Grid, z_range=None) -> np.ndarray:
    """Paint the shapes into an int16 label volume [z, y, x] (optionally a z range only).

    Every organ is confined to the body (label 1).
    """
    z0, z1 = z_range if z_range is not None else (0, grid.shape[2])
    labels = np.zeros((z1 - z0, grid.shape[1], grid.shape[0]), dtype=np.int16)
    for shape in shapes:
        lo, hi = shape.bounds()
        box = grid.box(lo, hi, z_range=(z0, z1))
        if any(s.stop <= s.start for s in box):
            continue
        z, y, x = grid.coords(box)
        mask = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=bool)
        for part in shape.parts:
            mask |= part.inside(z, y, x)
        for part in shape.within_shapes:
            mask &= part.inside(z, y, x)
        local = (slice(box[0].start - z0, box[0].stop - z0), box[1], box[2])
        target = labels[local]
        if shape.label != "body":
            allowed = target == LABEL_INDEX[shape.within] if shape.within else target > 0
            mask &= allowed
        target[mask] = LABEL_INDEX[shape.label]
    return labels


# -- parameters ------------------------------------------------------------------------------------


def organ_means(organ_values: pd.DataFrame | None) -> dict:
    """Population (K1, k2, k3, Vb) per tissue label from an organ table (plus defaults)."""
    means = {k: np.array(v) for k, v in DEFAULT_VALUES.items()}
    if organ_values is not None:
        for _, row in organ_values.iterrows():
            means[str(row["organ"])] = row[list(PARAMETER_NAMES)].to_numpy(dtype=np.float64)
    tissues = [n for n in LABELS.values() if n not in ("background", *BLOOD_LABELS, "bladder")]
    missing = [n for n in tissues if n not in means]
    if missing:
        raise ValueError(f"organ values missing for: {', '.join(missing)}")
    return {n: means[n] for n in tissues}


def lognormal_factor(rng: np.random.Generator, cv: float, size) -> np.ndarray:
    """Log-normal factors with mean 1 and coefficient of variation ``cv``."""
    sigma = np.sqrt(np.log1p(cv**2))
    return np.exp(sigma * rng.standard_normal(size) - 0.5 * sigma**2)


@dataclass
class SmoothField:
    """A smooth random field with zero mean and unit variance: a sum of plane waves.

    Wavelengths are drawn in the reference body's millimetres (60-160 mm) and scaled with
    the body, so the pattern looks the same in the demo and the paper size.
    """

    wavevectors: np.ndarray  # [n, 3] rad/mm, (x, y, z)
    phases: np.ndarray  # [n]

    @classmethod
    def draw(cls, rng, scale, n_waves: int = 6) -> SmoothField:
        direction = rng.standard_normal((n_waves, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavelength = rng.uniform(60.0, 160.0, size=(n_waves, 1))
        k = 2 * np.pi * direction / wavelength / np.asarray(scale)
        return cls(k, rng.uniform(0, 2 * np.pi, size=n_waves))

    def __call__(self, xyz: np.ndarray) -> np.ndarray:
        """Field values at points ``xyz`` [n, 3] (mm)."""
        waves = np.cos(xyz @ self.wavevectors.T + self.phases)
        return waves.sum(axis=1) * np.sqrt(2.0 / self.phases.size)


# -- subject ------------------------------------------------------------------------------------


@dataclass
class Subject:
    """Everything random about one phantom subject, drawn from ``(seed, number)``."""

    subject_id: str
    seed: int
    number: int
    size: PhantomSize
    grid: Grid
    shapes: list
    organ_params: dict  # label name -> subject mean (K1, k2, k3, Vb)
    fields: dict  # label name -> 4 SmoothFields
    spatial_cv: float
    input_peak_kbq_per_ml: float
    input_delay_s: float
    bladder_clearance_per_min: float

    def input_function(self, frames: FrameSchedule) -> InputFunction:
        """The true input: Feng's model sampled every 1 s to 4 min, 10 s to 10 min, then 60 s.

        The samples sit on whole seconds whatever the delay, so they share knots with the
        frame boundaries; the model then has few distinct step lengths and runs fast.
        """
        end = frames.end_s
        times = np.concatenate(
            [np.arange(0.0, 240.0), np.arange(240.0, 600.0, 10.0), np.arange(600.0, end, 60.0)]
        )
        times = np.unique(np.append(times[times < end], end))
        return InputFunction.feng(
            peak_kbq_per_ml=self.input_peak_kbq_per_ml,
            delay_s=self.input_delay_s,
            end_s=end,
            times_s=times,
        )

    def labels(self, z_range=None) -> np.ndarray:
        """Organ labels, int16 [z, y, x]."""
        return label_volume(self.shapes, self.grid, z_range)

    def voxel_parameters(self, labels: np.ndarray, z0: int):
        """Model parameters and truth of the body voxels of a slab of labels [z, y, x].

        Returns
        -------
        index : numpy.ndarray of int, flat indices into ``labels`` of the body voxels
        model : numpy.ndarray [n, 4], the parameters given to the kinetic model
        truth : numpy.ndarray [n, 4], the true K1, k2, k3, Vb (0 for bladder; blood has
            K1 = k2 = k3 = 0 and Vb = 1)
        """
        flat = labels.ravel()
        index = np.flatnonzero(flat > 0)
        lab = flat[index]
        model = np.zeros((index.size, 4))
        truth = np.zeros((index.size, 4))
        zz, yy, xx = np.unravel_index(index, labels.shape)
        xyz = np.stack(
            [self.grid.axis(0)[xx], self.grid.axis(1)[yy], self.grid.axis(2)[zz + z0]], axis=1
        )
        lower, upper = np.array(PAPER_LOWER), np.array(PAPER_UPPER)
        for value in np.unique(lab):
            name = LABELS[int(value)]
            sel = lab == value
            if name in BLOOD_LABELS:
                model[sel] = BLOOD_MODEL_PARAMS
                truth[sel] = (0.0, 0.0, 0.0, 1.0)
            elif name == "bladder":
                model[sel] = (self.bladder_clearance_per_min, 0.0, 1.0, 0.0)
            else:
                pts = xyz[sel]
                mod = np.stack([np.exp(self.spatial_cv * f(pts)) for f in self.fields[name]], 1)
                p = np.clip(self.organ_params[name] * mod, lower, upper)
                model[sel] = p
                truth[sel] = p
        return index, model, truth


def subject_number(subject_id: str) -> int:
    """The number of a subject id ``sub-<digits>`` (seeds the subject's random draws)."""
    digits = subject_id.removeprefix("sub-")
    if not subject_id.startswith("sub-") or not digits.isdigit():
        raise ValueError(f"phantom subject ids are sub-<number>, not {subject_id!r}")
    return int(digits)


def subject_ids(subjects) -> list:
    """Subject ids from a count (``3`` -> sub-01, sub-02, sub-03) or a list of ids."""
    if isinstance(subjects, int):
        return [f"sub-{i:02d}" for i in range(1, subjects + 1)]
    ids = [str(s) for s in subjects]
    for s in ids:
        subject_number(s)
    return ids


def make_subject(
    subject_id: str,
    seed: int = 0,
    size: str | PhantomSize = "demo",
    organ_values: pd.DataFrame | None = None,
    voxel_mm: float = 1.6,
    input_peak_kbq_per_ml=(200.0, 300.0),
    input_delay_s=(5.0, 20.0),
    parameter_cv: float = 0.2,
    spatial_cv: float = 0.12,
) -> Subject:
    """Draw one subject: anatomy, organ parameters, smooth fields and input function.

    Parameters
    ----------
    subject_id : str
        ``sub-<number>``; the number and ``seed`` seed all random draws.
    seed : int
        Seed of the phantom population.
    size : {"demo", "paper", "tiny"} or PhantomSize
        Body size preset.
    organ_values : pandas.DataFrame, optional
        Population means (columns organ, K1, k2, k3, Vb), e.g. from
        :func:`kinpet.io.read_organ_values`; labels not in it use :data:`DEFAULT_VALUES`.
    voxel_mm : float
        Isotropic voxel size (mm).
    input_peak_kbq_per_ml, input_delay_s : (float, float)
        Ranges of the uniformly drawn Feng input peak (kBq/ml) and delay (s).
    parameter_cv : float
        Between-subject coefficient of variation of each organ parameter (log-normal).
    spatial_cv : float
        Standard deviation of the log of the smooth within-organ variation.
    """
    size = SIZES[size] if isinstance(size, str) else size
    number = subject_number(subject_id)
    rng = np.random.default_rng([seed, number])
    grid = Grid.from_fov(size.fov_mm, voxel_mm)
    shapes = build_anatomy(rng, size)
    means = organ_means(organ_values)
    names = sorted(means)
    factors = lognormal_factor(rng, parameter_cv, (len(names), 4))
    organ_params = {n: means[n] * f for n, f in zip(names, factors, strict=True)}
    st, sz = size.scale
    fields = {n: [SmoothField.draw(rng, (st, st, sz)) for _ in range(4)] for n in names}
    peak = rng.uniform(*input_peak_kbq_per_ml)
    delay = rng.uniform(*input_delay_s)
    clearance = BLADDER_CLEARANCE_PER_MIN * float(lognormal_factor(rng, 0.25, 1)[0])
    return Subject(
        subject_id=subject_id,
        seed=int(seed),
        number=number,
        size=size,
        grid=grid,
        shapes=shapes,
        organ_params=organ_params,
        fields=fields,
        spatial_cv=spatial_cv,
        input_peak_kbq_per_ml=float(peak),
        input_delay_s=float(delay),
        bladder_clearance_per_min=clearance,
    )


# -- noise ----------------------------------------------------------------------------------------


def decay_factors(frames: FrameSchedule) -> np.ndarray:
    """Mean F-18 decay factor over each frame, d = e^{-l ts} (1 - e^{-l dt}) / (l dt)."""
    lam = F18_LAMBDA_PER_MIN
    dt = frames.durations_min
    return np.exp(-lam * frames.starts_min) * -np.expm1(-lam * dt) / (lam * dt)


def noise_scale(noise_cov: float, reference_value: float, frames: FrameSchedule, frame: int):
    """The ``a`` of Var = a C / (d dt) that gives ``noise_cov`` at ``reference_value``.

    Parameters
    ----------
    noise_cov : float
        Target coefficient of variation (e.g. 0.10).
    reference_value : float
        Mean activity (kBq/ml) of the reference region (the liver) in the reference frame.
    frames : FrameSchedule
    frame : int
        Index of the reference frame.

    Returns
    -------
    float, in kBq/ml min.
    """
    d_dt = decay_factors(frames)[frame] * frames.durations_min[frame]
    return noise_cov**2 * reference_value * d_dt


def noise_variance(image: np.ndarray, a: float, frames: FrameSchedule, frame: int):
    """Var = a C / (d dt) of one frame's image (kBq/ml)^2; negative C counts as 0."""
    d_dt = decay_factors(frames)[frame] * frames.durations_min[frame]
    return a * np.maximum(image, 0.0) / d_dt


def add_noise(image, a, frames, frame, rng: np.random.Generator) -> np.ndarray:
    """Add Gaussian noise of variance :func:`noise_variance` and clip negatives to 0.

    Reconstructed images do contain negative values, but PET-BIDS readers (and the
    pipeline's) reject them; clipping biases the mean upwards only where the coefficient
    of variation is large (short early frames in low-uptake tissue, the blurred edge of the
    body). Outside the blurred body C = 0, so the background stays exactly 0.
    """
    sd = np.sqrt(noise_variance(image, a, frames, frame)).astype(np.float32)
    noisy = image + sd * rng.standard_normal(image.shape, dtype=np.float32)
    return np.maximum(noisy, 0.0, out=noisy)


def blur(image: np.ndarray, fwhm_mm: float, voxel_mm: float) -> np.ndarray:
    """Isotropic Gaussian PSF of ``fwhm_mm`` (0: none); zero outside the field of view."""
    if fwhm_mm <= 0:
        return image
    return gaussian_filter(image, sigma=fwhm_mm * FWHM_TO_SIGMA / voxel_mm, mode="constant")


# -- simulation ----------------------------------------------------------------------------------


# -- resources ------------------------------------------------------------------------------------
# What simulate_subject allocates: the label map and the five truth maps of the whole grid
# (22 bytes a voxel), and frame by frame the frame, its blur, the noise and their
# temporaries, and a NIfTI's bytes (about 38 more); the kinetic model of one slab (at
# least one slice; 1.5 kB a body voxel, measured); torch and the rest (under 1 GiB).
# Allocations, not resident pages: the resident peak is lower (zero pages of the
# background are never touched: 17 bytes a voxel measured on the demo body at 1 mm), but
# an allocation larger than the memory fails whatever is touched later.
SIMULATION_BYTES_PER_VOXEL = 60
MODEL_BYTES_PER_VOXEL = 1600
SIMULATION_FIXED_BYTES = 1 << 30


class PhantomResourceError(ValueError):
    """A simulation that would not fit in memory or on disk."""


def available_memory() -> int:
    """Bytes of memory this process may use: the physical memory (``os.sysconf``), or the
    cgroup's limit when lower (a SLURM job's ``mem_mb``, a container)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def simulation_needs(grid: Grid, n_frames: int) -> dict:
    """Estimated peak memory and scratch disk (bytes) of simulating on ``grid``.

    The scratch file holds the noise-free frames, 4 bytes a voxel and frame, beside the
    output; the memory estimate is :data:`SIMULATION_BYTES_PER_VOXEL` a voxel of the grid,
    :data:`MODEL_BYTES_PER_VOXEL` a voxel of one slab and :data:`SIMULATION_FIXED_BYTES`.
    """
    voxels = int(np.prod(grid.shape, dtype=np.int64))
    slab = max(_SLAB_VOXELS, grid.shape[0] * grid.shape[1])
    return {
        "voxels": voxels,
        "memory": SIMULATION_FIXED_BYTES
        + SIMULATION_BYTES_PER_VOXEL * voxels
        + MODEL_BYTES_PER_VOXEL * slab,
        "disk": 4 * voxels * int(n_frames),
    }


def check_simulation_resources(
    subject: Subject, n_frames: int, root, setting: str = "voxel_mm", memory=None
) -> None:
    """Refuse a simulation that cannot fit, before anything is computed or written.

    Parameters
    ----------
    subject : Subject
    n_frames : int
    root : path-like
        The dataset folder the subject is written to (its file system must hold the
        scratch file).
    setting : str
        How the voxel size is named in the message (``config phantom.voxel_mm``).
    memory : int, optional
        Bytes available (default: :func:`available_memory`).

    Raises
    ------
    PhantomResourceError
        Naming the setting and its value, the grid, the estimate and what is available.
    """
    grid = subject.grid
    needs = simulation_needs(grid, n_frames)
    memory = available_memory() if memory is None else int(memory)
    shape = " x ".join(map(str, grid.shape))
    what = (
        f"{setting} {grid.voxel_mm:g} mm: simulating {subject.subject_id} "
        f"({subject.size.name} body) on a {shape} grid ({needs['voxels'] / 1e6:.1f} million "
        "voxels) needs about"
    )
    if needs["memory"] > memory:
        raise PhantomResourceError(
            f"{what} {needs['memory'] / 2**30:.2f} GiB of memory, more than the "
            f"{memory / 2**30:.2f} GiB available: use a larger voxel size"
        )
    folder = Path(root).resolve()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needs["disk"] > free:
        raise PhantomResourceError(
            f"{what} {needs['disk'] / 2**30:.2f} GiB of scratch space in {folder}, more "
            f"than the {free / 2**30:.2f} GiB free: use a larger voxel size or free space"
        )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def simulate_subject(
    subject: Subject,
    root,
    frames: FrameSchedule | None = None,
    fwhm_mm: float = 4.0,
    noise_cov: float = 0.10,
    log=_log,
    threads: int = 1,
) -> dict:
    """Simulate one subject and write its PET-BIDS files under ``root`` (see README).

    Memory stays bounded for any body size: the noise-free model is written slab by slab to
    a temporary [t, z, y, x] float32 file beside the output (about 4 bytes x voxels x
    frames on disk), then every frame is read back, blurred, made noisy and streamed into
    the gzipped NIfTI.

    ``threads`` sets torch's threads for the model while this runs: one per job is fastest
    when jobs run side by side (torch's thread pool spins when cores are busy).

    Returns
    -------
    dict
        Summary: shape, voxels, noise scale ``a``, reference value, timings (s).

    Raises
    ------
    PhantomResourceError
        Before anything is written, when the grid would not fit in memory or its scratch
        file on disk (:func:`check_simulation_resources`).
    """
    frames = FrameSchedule.paper() if frames is None else frames
    check_simulation_resources(subject, len(frames), root)
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        return _simulate_subject(subject, root, frames, fwhm_mm, noise_cov, log)
    finally:
        torch.set_num_threads(previous)


def _simulate_subject(subject, root, frames, fwhm_mm, noise_cov, log) -> dict:
    from kinpet import io

    frames = FrameSchedule.paper() if frames is None else frames
    root = Path(root)
    sid = subject.subject_id
    grid = subject.grid
    nx, ny, nz = grid.shape
    nt = len(frames)
    t_start = time.perf_counter()
    pet_dir = root / sid / "pet"
    label_dir = root / "derivatives" / "labels" / sid
    truth_dir = root / "derivatives" / "truth" / sid
    for d in (pet_dir, label_dir, truth_dir):
        d.mkdir(parents=True, exist_ok=True)

    inp = subject.input_function(frames)
    model = KineticModel(inp, frames, sampling="average")
    reference_frame = nt - 1
    slab = max(1, _SLAB_VOXELS // (nx * ny))
    labels = np.zeros((nz, ny, nx), dtype=np.int16)
    truth = np.zeros((5, nz, ny, nx), dtype=np.float32)
    frame_bytes = nx * ny * nz * 4
    log(
        f"{sid}: grid {nx} x {ny} x {nz} voxels of {grid.voxel_mm} mm, {nt} frames, "
        f"input peak {subject.input_peak_kbq_per_ml:.1f} kBq/ml, "
        f"delay {subject.input_delay_s:.1f} s"
    )
    with tempfile.TemporaryFile(dir=pet_dir) as clean:
        # Reserve the whole file so slabs can be written at their offsets.
        clean.truncate(frame_bytes * nt)
        for z0 in range(0, nz, slab):
            z1 = min(nz, z0 + slab)
            lab = subject.labels((z0, z1))
            labels[z0:z1] = lab
            index, params, true_params = subject.voxel_parameters(lab, z0)
            tac = np.zeros((nt, lab.size), dtype=np.float32)
            if index.size:
                tac[:, index] = model(params).T
            t = truth[:, z0:z1].reshape(5, -1)
            t[:4, index] = true_params.T
            with np.errstate(invalid="ignore", divide="ignore"):
                t[4, index] = ki(true_params)  # 0/0 for blood and bladder: set to 0 below
            for f in range(nt):
                clean.seek(f * frame_bytes + z0 * ny * nx * 4)
                clean.write(tac[f].tobytes())
            log(f"{sid}: model slices {z0}-{z1 - 1} of {nz} ({index.size} body voxels)")
        t_model = time.perf_counter() - t_start
        # Blood voxels have K1 = k2 = k3 = 0 in the truth, so Ki = 0 (not NaN).
        np.nan_to_num(truth[4], copy=False)
        # The reference is the liver's mean in the blurred reference frame: the image the
        # noise is added to, so the liver's CoV there is noise_cov.
        clean.seek(reference_frame * frame_bytes)
        image = np.frombuffer(clean.read(frame_bytes), dtype=np.float32).reshape(nz, ny, nx)
        liver = labels == LABEL_INDEX["liver"]
        image = blur(image, fwhm_mm, grid.voxel_mm)
        reference = float(image[liver].astype(np.float64).mean()) if liver.any() else 0.0
        a = noise_scale(noise_cov, reference, frames, reference_frame) if noise_cov > 0 else 0.0
        log(f"{sid}: liver in the reference frame {reference:.3f} kBq/ml, noise a = {a:.5g}")
        header = io.nifti_header(grid.shape + (nt,), grid.affine, np.float32, frames)
        with io.NiftiFrameWriter(pet_dir / f"{sid}_pet.nii.gz", header) as writer:
            for f in range(nt):
                clean.seek(f * frame_bytes)
                image = np.frombuffer(clean.read(frame_bytes), dtype=np.float32)
                image = blur(image.reshape(nz, ny, nx), fwhm_mm, grid.voxel_mm)
                if a > 0:
                    rng = np.random.default_rng([subject.seed, subject.number, 1, f])
                    image = add_noise(image, a, frames, f, rng)
                writer.write(image)
                if f % 10 == 9 or f == nt - 1:
                    log(f"{sid}: wrote frame {f + 1} of {nt}")
    t_frames = time.perf_counter() - t_start - t_model

    io.write_nifti_zyx(label_dir / f"{sid}_dseg.nii.gz", labels, grid.affine)
    io.write_label_table(label_dir / f"{sid}_dseg.tsv", LABELS)
    truth_notes = (
        "True parameter of the irreversible two-tissue model used to simulate the image. "
        "Aorta and heart blood pools are blood: Vb = 1, K1 = k2 = k3 = Ki = 0. The bladder "
        "is not a 2TC voxel (excreted tracer, C = clearance x integral of the input): all its "
        "values are 0. Background (outside the body) is 0."
    )
    units = dict(zip(TRUTH_NAMES, ("mL/cm3/min", "1/min", "1/min", "1", "mL/cm3/min"), strict=True))
    for i, name in enumerate(TRUTH_NAMES):
        path = truth_dir / f"{sid}_desc-{name}_truth.nii.gz"
        io.write_nifti_zyx(path, truth[i], grid.affine)
        io.write_json(
            path.with_name(path.name.replace(".nii.gz", ".json")),
            {"Description": truth_notes, "Parameter": name, "Units": units[name]},
        )
    rows = [(n, *subject.organ_params[n]) for n in sorted(subject.organ_params)]
    table = pd.DataFrame(rows, columns=["organ", *PARAMETER_NAMES])
    io.write_tsv(truth_dir / f"{sid}_organs.tsv", table)
    # The maps differ from these means: each organ gets a smooth within-organ field and
    # every voxel is clipped to the paper's bounds (liver k3 ~0.003 -> 0.01, for instance).
    described = (
        "This subject's mean of the parameter in the organ, before the within-organ field and "
        "before the per-voxel clip to the paper's bounds that the truth maps (desc-*_truth) "
        "hold; average a truth map over the organ's labels to compare with a fit."
    )
    io.write_json(
        truth_dir / f"{sid}_organs.json",
        {
            "organ": {"Description": "Organ name, as in the label table (dseg.tsv)."},
            **{n: {"Description": described, "Units": units[n]} for n in PARAMETER_NAMES},
        },
    )
    io.write_blood_tsv(
        pet_dir / f"{sid}_recording-idif_blood.tsv",
        inp,
        description=(
            f"True input function of the kinpet phantom: Feng et al. 1993 model 2, peak "
            f"{subject.input_peak_kbq_per_ml:.3f} kBq/mL, delay {subject.input_delay_s:.3f} s"
        ),
    )
    sidecar = pet_sidecar(frames, subject, fwhm_mm, noise_cov, a, reference_frame, reference)
    io.write_json(pet_dir / f"{sid}_pet.json", sidecar)
    elapsed = time.perf_counter() - t_start
    log(f"{sid}: done in {elapsed:.1f} s (model {t_model:.1f} s, frames {t_frames:.1f} s)")
    return {
        "shape": grid.shape + (nt,),
        "body_voxels": int((labels > 0).sum()),
        "noise_a": a,
        "reference_kbq_per_ml": reference,
        "seconds": elapsed,
    }


def pet_sidecar(frames, subject, fwhm_mm, noise_cov, a, reference_frame, reference) -> dict:
    """The ``_pet.json`` of a phantom subject (PET-BIDS fields and the phantom's settings)."""
    return {
        "Manufacturer": "kinpet digital phantom",
        "Modality": "PT",
        "TracerName": "FDG",
        "TracerRadionuclide": "F18",
        "Units": "kBq/mL",
        "TimeZero": "00:00:00",
        "InjectionStart": 0,
        "ScanStart": 0,
        "ImageDecayCorrected": True,
        "ImageDecayCorrectionTime": 0,
        **frames.to_bids(),
        "ReconFilterType": "Gaussian" if fwhm_mm > 0 else "none",
        "ReconFilterSize": float(fwhm_mm),
        "ImageVoxelSize": [subject.grid.voxel_mm] * 3,
        "PhantomSeed": subject.seed,
        "PhantomSize": subject.size.name,
        "PhantomNoiseModel": (
            "Gaussian, Var = a*C/(d*dt): C the blurred noise-free frame (kBq/mL), dt the "
            "frame duration (min), d the mean F-18 decay factor over the frame; a set so that "
            "the liver's coefficient of variation in the reference frame is PhantomNoiseCoV; "
            "negative values clipped to 0"
        ),
        "PhantomNoiseCoV": float(noise_cov),
        "PhantomNoiseScaleA": float(a),
        "PhantomNoiseReferenceFrame": int(reference_frame),
        "PhantomNoiseReferenceValue": float(reference),
        "PhantomPSFFWHM": float(fwhm_mm),
        "PhantomInputPeak": subject.input_peak_kbq_per_ml,
        "PhantomInputDelay": subject.input_delay_s,
        "PhantomBladderClearance": subject.bladder_clearance_per_min,
    }


def dataset_description() -> dict:
    """``dataset_description.json`` of a phantom dataset."""
    return {
        "Name": "kinpet whole-body dynamic FDG digital phantom",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "kinpet", "Description": "kinpet.phantom"}],
    }


def write_dataset(
    root,
    subjects,
    seed=0,
    size="demo",
    organ_values=None,
    frames=None,
    voxel_mm=1.6,
    fwhm_mm=4.0,
    noise_cov=0.10,
    log=_log,
    threads=1,
    **draw,
) -> list:
    """Simulate several subjects and the dataset-level files (a convenience for the CLI)."""
    from kinpet import io

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    io.write_json(root / "dataset_description.json", dataset_description())
    out = []
    for sid in subject_ids(subjects):
        subject = make_subject(sid, seed, size, organ_values, voxel_mm, **draw)
        out.append(simulate_subject(subject, root, frames, fwhm_mm, noise_cov, log, threads))
    return out


def coronal_slice_index(labels_xyz: np.ndarray) -> int:
    """The y index of the coronal plane that shows the most of the paper's seven organs.

    Ties go to the plane with the most organ voxels. ``labels_xyz`` is (x, y, z).
    """
    organs = [LABEL_INDEX[n] for n in PAPER_ORGANS]
    best, best_key = 0, (-1, -1)
    for y in range(labels_xyz.shape[1]):
        plane = labels_xyz[:, y, :]
        present = np.isin(organs, plane)
        key = (int(present.sum()), int(np.isin(plane, organs).sum()))
        if key > best_key:
            best, best_key = y, key
    return best
