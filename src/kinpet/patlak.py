"""Patlak's graphical analysis: Ki and the intercept from a straight line, per curve.

For tissue that takes the tracer up irreversibly, once the reversible part has come to
equilibrium with the plasma (after a time t*), the tissue curve C over the input A gives a
straight line against the "normalised time" int_0^t A / A(t) (Patlak, Blasberg and
Fenstermacher 1983):

    C(t) / A(t) = Ki * int_0^t A / A(t) + V0,   t >= t*,

Ki the net influx rate (ml/cm^3/min) and V0 the intercept (ml/cm^3; blood volume plus the
reversible compartment's distribution volume). Here both ratios are taken with frame
averages, as the frames measure them: the frame average of A and of its integral, from
the piecewise-linear input in closed form (:class:`kinpet.kinetics.KineticModel` with K1 = 1,
k2 = 0, and with Vb = 1), so that a noise-free curve's line is the model's own.

For the irreversible two-tissue model with blood volume the slope is (1 - Vb) Ki, not Ki:
the blood term Vb A only adds Vb to the intercept, while the tissue is the remaining
1 - Vb. It reaches that value only as the free compartment's curve approaches a constant
multiple of the input: at t* = 20 min it still carries the input's decline, more for
slow exchange (small k2 + k3), and less the later t* (tests/test_patlak.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import irreversible_2tc

DEFAULT_T_STAR_MIN = 20.0


@dataclass
class PatlakResult:
    """Patlak fits of N curves.

    Attributes
    ----------
    ki : ndarray [N]
        Slope, ml/cm^3/min.
    intercept : ndarray [N]
        V0, ml/cm^3.
    r2 : ndarray [N]
        Coefficient of determination of the line over the frames used.
    frames_used : int
        Frames with a mid-time at or after t*.
    t_star_min : float
    ok : ndarray of bool [N]
        The curve passed the compartment fits' screen (:func:`kinpet.fitting.screen_curves`)
        and its line is finite; :func:`kinpet.fitting.flag_negative` may clear it.
    status : ndarray of int8 [N]
        Why a curve is not ok: an index into :data:`kinpet.fitting.STATUS_NAMES`.
    """

    ki: np.ndarray
    intercept: np.ndarray
    r2: np.ndarray
    frames_used: int
    t_star_min: float
    ok: np.ndarray
    status: np.ndarray

    def reasons(self) -> list[str]:
        """The status of every curve in words."""
        from kinpet.fitting import STATUS_NAMES

        return [STATUS_NAMES[s] for s in self.status]


def patlak_coordinates(input_function: InputFunction, frames: FrameSchedule):
    """Frame averages of the input A and of int_0^t A (kBq/ml, kBq/ml x min), each [T]."""
    blood = irreversible_2tc(np.array([0.0, 0.0, 1.0, 1.0]), input_function, frames)
    integral = irreversible_2tc(np.array([1.0, 0.0, 1.0, 0.0]), input_function, frames)
    return blood, integral


def patlak(
    tacs,
    input_function: InputFunction,
    frames: FrameSchedule,
    t_star_min: float = DEFAULT_T_STAR_MIN,
) -> PatlakResult:
    """Patlak Ki and intercept of curves by least squares over the frames after t*.

    Parameters
    ----------
    tacs : array_like [N, T] or [T]
        Frame averages (the input's unit).
    input_function, frames
        The input and the frames.
    t_star_min : float
        Frames whose mid-time is at or after this time (min) make the line.

    Raises
    ------
    ValueError
        Fewer than 2 frames after t*, or the input is 0 in one of them.
    """
    y = np.atleast_2d(np.asarray(tacs, dtype=np.float64))
    if y.shape[1] != len(frames):
        raise ValueError(f"tacs must have {len(frames)} frames, got shape {np.shape(tacs)}")
    use = frames.mids_min >= t_star_min
    if use.sum() < 2:
        raise ValueError(
            f"Patlak needs at least 2 frames after t* = {t_star_min:g} min; the last frame's "
            f"mid-time is {frames.mids_min[-1]:.4g} min"
        )
    blood, integral = patlak_coordinates(input_function, frames)
    if (blood[use] <= 0).any():
        raise ValueError(f"the input is 0 in a frame after t* = {t_star_min:g} min")
    x = integral[use] / blood[use]  # [F], min
    ratio = y[:, use] / blood[use]  # [N, F]
    xc = x - x.mean()
    yc = ratio - ratio.mean(axis=1, keepdims=True)
    slope = yc @ xc / (xc @ xc)
    intercept = ratio.mean(axis=1) - slope * x.mean()
    residual = yc - slope[:, None] * xc
    total = (yc**2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(total > 0, 1.0 - (residual**2).sum(axis=1) / total, np.nan)
    # The compartment fits' screen and status codes, so that a table of Patlak fits says
    # which regions to trust as theirs do; a curve screened out has no line (NaN).
    from kinpet.fitting import STATUS_FAILED, STATUS_OK, screen_curves

    status = screen_curves(y)
    failed = (status == STATUS_OK) & ~(np.isfinite(slope) & np.isfinite(intercept))
    status[failed] = STATUS_FAILED
    ok = status == STATUS_OK
    slope, intercept, r2 = (np.where(ok, v, np.nan) for v in (slope, intercept, r2))
    return PatlakResult(slope, intercept, r2, int(use.sum()), float(t_star_min), ok, status)
