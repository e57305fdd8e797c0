"""Less geometric organs for the procedural phantom: a smooth random deformation of shapes.

``phantom.deform_mm`` (0 by default: the shapes of :mod:`kinpet.anatomy` as they are) moves
the surfaces of the liver, spleen and kidneys by a smooth random displacement field, so
that they lose their ellipsoidal outline while keeping their place and their volume
(docs/phantom.md). A point is inside a deformed part when the point displaced by the field
lies inside the original part. The field has no divergence (transverse waves), so the
Jacobian determinant of p -> p + d(p) stays near 1: over 50 seeds on a 41^3 grid its
minimum was 0.87 at 2 mm and 0.45 at 4 mm in the demo body, 0.86 at 6 mm and 0.37 at 12 mm
in the paper's adult (longer wavelengths); the mapping folds (surfaces make small islands
and holes) beyond about 5 mm in the demo body and 14 mm in the adult.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kinpet.anatomy import Shape


@dataclass
class Displacement:
    """A smooth random displacement field (mm) that keeps volumes: a sum of transverse plane
    waves, each displacing across its own direction, so that the field has no divergence
    and a deformed organ keeps its volume up to second order in the field's gradient.

    Wavelengths are drawn in the reference body's millimetres (80-200 mm, longer than the
    organs' semi-axes, so that a surface bulges rather than ripples) and scaled with the
    body, as the within-organ fields of :mod:`kinpet.phantom`. ``rms_mm`` is the
    root-mean-square length of the displacement.
    """

    wavevectors: np.ndarray  # [n, 3] rad/mm, (x, y, z)
    amplitudes: np.ndarray  # [n, 3] unit vectors across their wave, times the scale below
    phases: np.ndarray  # [n]
    rms_mm: float

    @classmethod
    def draw(cls, rng, rms_mm: float, scale, n_waves: int = 6) -> Displacement:
        direction = rng.standard_normal((n_waves, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavelength = rng.uniform(80.0, 200.0, size=(n_waves, 1))
        k = 2 * np.pi * direction / wavelength / np.asarray(scale)
        # A random direction across each (scaled) wavevector: transverse waves.
        across = rng.standard_normal((n_waves, 3))
        unit_k = k / np.linalg.norm(k, axis=1, keepdims=True)
        across -= (across * unit_k).sum(axis=1, keepdims=True) * unit_k
        across /= np.linalg.norm(across, axis=1, keepdims=True)
        # Each wave's mean square length is amplitude^2 / 2: sqrt(2 / n) gives rms_mm.
        amplitudes = across * (float(rms_mm) * np.sqrt(2.0 / n_waves))
        return cls(k, amplitudes, rng.uniform(0, 2 * np.pi, size=n_waves), float(rms_mm))

    @property
    def max_mm(self) -> float:
        """An upper bound of the displacement's length (mm)."""
        return float(np.linalg.norm(self.amplitudes, axis=1).sum())

    def __call__(self, z, y, x):
        """Displacements (dx, dy, dz) in mm at broadcastable patient coordinates (mm)."""
        out = [0.0, 0.0, 0.0]
        for k, a, phase in zip(self.wavevectors, self.amplitudes, self.phases, strict=True):
            wave = np.cos(k[0] * x + k[1] * y + k[2] * z + phase)
            out = [out[c] + a[c] * wave for c in range(3)]
        return out


@dataclass
class Warped:
    """A part (an ellipsoid, a cut) whose surface is moved by a displacement field: a point
    is inside when the point displaced by the field lies inside the part."""

    part: object
    field: Displacement

    def bounds(self):
        lo, hi = self.part.bounds()
        return lo - self.field.max_mm, hi + self.field.max_mm

    def inside(self, z, y, x):
        dx, dy, dz = self.field(z, y, x)
        return self.part.inside(z + dz, y + dy, x + dx)


# Organs that phantom.deform_mm deforms (docs/phantom.md): the solid abdominal organs.
DEFORMED_ORGANS = ("liver", "spleen", "kidneys")


def deform(shapes: list, rng: np.random.Generator, rms_mm: float, scale) -> list:
    """The shapes with :data:`DEFORMED_ORGANS` moved by a smooth random displacement of
    root-mean-square length ``rms_mm`` (mm), one field per organ (its parts and cuts share
    it).

    Parameters
    ----------
    shapes : list of Shape
        From :func:`kinpet.anatomy.build_anatomy`.
    rng : numpy.random.Generator
        The deformation's own stream, so that the rest of the subject is the same with and
        without it.
    rms_mm : float
        Root-mean-square length of the displacement (mm); 0 leaves the shapes as they are.
    scale : (float, float, float)
        The size preset's scale of the reference body along x, y, z (wavelengths scale
        with it).

    Returns
    -------
    list of Shape
    """
    out = []
    for shape in shapes:
        if shape.label in DEFORMED_ORGANS and rms_mm > 0:
            field = Displacement.draw(rng, rms_mm, scale)
            shape = Shape(
                shape.label,
                [Warped(p, field) for p in shape.parts],
                [Warped(c, field) for c in shape.within_shapes],
                shape.within,
            )
        out.append(shape)
    return out
