"""The phantom's anatomy: labels, size presets, the voxel grid and the body's shapes.

Anatomy is built from geometric shapes placed in physical millimetres, so the small demo
body and the full-size body of the paper share one code path: a size preset (:data:`SIZES`,
defined in :mod:`kinpet.resources`)
scales an adult reference body (about 350 x 250 mm transaxially, 900 mm from the upper
thighs to the neck) and sets the field of view; voxels are 1.6 mm (the paper's
reconstructions) unless told otherwise (docs/phantom.md).

Internal volumes are C-ordered [z, y, x] arrays, which is the byte order of a NIfTI volume
of shape (x, y, z); public functions that return volumes say which order they use. The
voxel axes run x right -> left, y anterior -> posterior, z inferior -> superior (NIfTI
orientation "LPS").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

# The size presets and the grid's shape are kinpet.resources' (numpy-free: the Snakefile
# checks a config's memory with them), re-exported ("as") for the phantom's modules.
from kinpet.resources import SIZES as SIZES
from kinpet.resources import PhantomSize as PhantomSize
from kinpet.resources import grid_shape

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


# -- geometry ----------------------------------------------------------------------------------


@dataclass
class Grid:
    """A voxel grid: shape (x, y, z), voxel size (mm) and the patient coordinates of voxels.

    Patient coordinates (mm): X towards the patient's left, Y towards posterior (both 0 at
    the centre of the field of view), Z towards the head, 0 at the bottom of the field of
    view; voxel centres sit at half a voxel from the edges.

    ``world``, when given, is the voxel-to-world (RAS+, mm) affine written to the images
    (a label map's position, :mod:`kinpet.labelmap`); the patient coordinates above stay
    as they are (they place the shapes and the smooth fields).
    """

    shape: tuple
    voxel_mm: float
    world: np.ndarray | None = None

    @classmethod
    def from_fov(cls, fov_mm, voxel_mm: float) -> Grid:
        return cls(grid_shape(fov_mm, voxel_mm), float(voxel_mm))

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
        if self.world is not None:
            return np.array(self.world, dtype=np.float64)
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
    size preset (:func:`kinpet.deformation.deform` makes some organs less geometric).
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
