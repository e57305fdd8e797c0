"""A procedural whole-body dynamic FDG phantom with known truth: its subjects (docs/phantom.md).

A subject is everything random about one phantom body, drawn from ``(seed, number)``: the
anatomy (:mod:`kinpet.anatomy`), organ parameters and the input function; given a label
map's anatomy (:mod:`kinpet.labelmap`), every subject shares it and differs by the rest.
Its image is made by :mod:`kinpet.simulation`. Per-voxel parameters (K1, k2, k3, Vb) are
organ population means (``config/organ_values.tsv``), a log-normal per-subject factor per
organ and parameter, and a smooth random field inside each organ, clipped to the paper's
bounds.

Special voxels:

- aorta and heart blood pools are pure blood: Vb = 1, so their curve is the frame-averaged
  input (evaluated with K1 = 0, k2 = k3 = 0.01, whose tissue term vanishes);
- the bladder fills with excreted tracer, ``C(t) = clearance * int_0^t A``, frame-averaged
  (evaluated exactly as the model with K1 = clearance, k2 = 0, k3 = 1, Vb = 0);
- background (outside the body) is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kinpet.anatomy import (
    BLOOD_LABELS,
    LABELS,
    SIZES,
    Grid,
    PhantomSize,
    build_anatomy,
    label_volume,
)
from kinpet.deformation import deform
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import PAPER_LOWER, PAPER_UPPER, PARAMETER_NAMES
from kinpet.organinput import OrganInput, organ_inputs

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
# The organ deformation's random stream, (seed, number, 2): apart from the subject's own
# (seed, number) and the noise's (seed, number, 1, frame).
DEFORM_STREAM = 2
ARTERIAL = OrganInput()


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
    label_map: np.ndarray | None = None  # a label map's labels [z, y, x]; None: the shapes
    anatomy: str = "procedural"  # or the label map's file name
    # label name -> the input it sees (kinpet.organinput); absent: the arterial input
    organ_inputs: dict = field(default_factory=dict)

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

    def organ_input(self, name: str) -> OrganInput:
        """How the input label ``name`` sees differs from the arterial one (blood, the
        bladder and organs without input columns: not at all)."""
        return self.organ_inputs.get(name, ARTERIAL)

    def input_groups(self, labels: np.ndarray) -> list:
        """(OrganInput, boolean selection) per distinct input among voxels of ``labels``."""
        groups = {}
        for value in np.unique(labels):
            organ_input = self.organ_input(LABELS[int(value)])
            groups[organ_input] = groups.get(organ_input, False) | (labels == value)
        return list(groups.items())

    def labels(self, z_range=None) -> np.ndarray:
        """Organ labels, int16 [z, y, x]."""
        if self.label_map is not None:
            z0, z1 = z_range if z_range is not None else (0, self.grid.shape[2])
            return self.label_map[z0:z1].copy()
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
    anatomy=None,
    deform_mm: float = 0.0,
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
        Its optional columns delay_s, dispersion_s, arterial_fraction and
        portal_transit_s give each organ's own input (:mod:`kinpet.organinput`); without
        them every organ sees the arterial input.
    voxel_mm : float
        Isotropic voxel size (mm).
    input_peak_kbq_per_ml, input_delay_s : (float, float)
        Ranges of the uniformly drawn Feng input peak (kBq/ml) and delay (s).
    parameter_cv : float
        Between-subject coefficient of variation of each organ parameter (log-normal).
    spatial_cv : float
        Standard deviation of the log of the smooth within-organ variation.
    anatomy : kinpet.labelmap.LabelAnatomy, optional
        A label map's anatomy on a grid of ``voxel_mm`` voxels, in place of the shapes
        (``size`` is then unused): the body, its organs and their sizes are the label map's
        for every subject, at the scale of a real body.
    deform_mm : float
        Standard deviation (mm) of a smooth random displacement of the procedural liver,
        spleen and kidneys (:func:`kinpet.deformation.deform`); 0: their geometric shapes. Its
        random stream is its own (``(seed, number, 2)``): the rest of the subject is the
        same with and without it.
    """
    number = subject_number(subject_id)
    rng = np.random.default_rng([seed, number])
    label_map, source = None, "procedural"
    if anatomy is None:
        size = SIZES[size] if isinstance(size, str) else size
        grid = Grid.from_fov(size.fov_mm, voxel_mm)
        shapes = build_anatomy(rng, size)
        if deform_mm > 0:
            st, sz = size.scale
            deform_rng = np.random.default_rng([seed, number, DEFORM_STREAM])
            shapes = deform(shapes, deform_rng, deform_mm, (st, st, sz))
    else:
        if deform_mm > 0:
            raise ValueError(
                f"{anatomy.source}: deform_mm deforms the procedural organs only; a label "
                "map's anatomy is used as it is (set deform_mm to 0)"
            )
        grid = anatomy.grid
        if abs(grid.voxel_mm - float(voxel_mm)) > 1e-9:
            raise ValueError(
                f"{anatomy.source}: read on {grid.voxel_mm:g}-mm voxels, not the {voxel_mm:g} mm "
                "asked for"
            )
        fov = tuple(n * grid.voxel_mm for n in grid.shape)
        size = PhantomSize("labelmap", fov, (1.0, 1.0))
        shapes, label_map, source = [], anatomy.labels_zyx, anatomy.source
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
        label_map=label_map,
        anatomy=source,
        organ_inputs={n: v for n, v in organ_inputs(organ_values).items() if n in means},
    )
