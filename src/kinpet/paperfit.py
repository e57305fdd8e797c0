"""The published organ curve fit (method ``curve_fit_paper`` of :func:`kinpet.fitting.fit`).

De Benetti et al. 2023 fit the organ-mean curves of Fig. 2 (KP_CF) with
``organ_curve_fit.py`` of the published code (github FrancescaDB/self_supervised_PBPK_modelling).
Its objective is not kinpet's ``curve_fit`` on frame values; everything lives on the
discrete 0.1-min grid of the published model (``sampling: paper``, :mod:`kinpet.kinetics`):

- the grid t = arange(first frame start, last frame start, 0.1) min, frame starts rounded
  to 0.01 min;
- the tissue curve's frame values placed at the frame starts and linearly interpolated
  onto the grid (about 600 points for the paper's 62 frames, most of them inside the
  5-min frames);
- the input function's value per frame (the published IDIF holds one value per frame)
  placed at the frame starts too and interpolated onto the grid the same way;
- the discrete model C = (1 - Vb) conv(A, h) 0.1 + Vb A, h = K1/beta (k3 + k2 exp(-beta t)),
  conv with the published one-step delay, on every grid point;
- ``scipy.optimize.curve_fit`` from p0 = (0.1, 0.1, 0.01, 0.01) within the paper's bounds,
  ``diff_step=0.001``, equal weights on the grid points.

The published code evaluates this in float32 torch; here it is float64 numpy (the same
arithmetic to about 1e-7 of the curve). Times in minutes, activities in the input's unit
(kBq/ml).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from kinpet.curvefit import PAPER_P0, bounded_curve_fit
from kinpet.fitting import (
    STATUS_FAILED,
    STATUS_OK,
    FitResult,
    check_bounds,
    screen_curves,
)
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import (
    PAPER_STEP_MIN,
    _interp_linear_extrapolate,
    _paper_plan,
    irreversible_2tc,
)

METHOD = "curve_fit_paper"
# diff_step of the published call (organ_curve_fit.py; the paper, Sec. 2.3: "step 0.001").
PAPER_DIFF_STEP = 0.001
# An input sampled within this of every frame mid-time is an image-derived input (one
# value per frame, as the published IDIF), used as it is (s).
_MID_TOLERANCE_S = 0.5


def per_frame_input(input_function: InputFunction, frames: FrameSchedule) -> np.ndarray:
    """The input function's value per frame, the counterpart of the published IDIF.

    Parameters
    ----------
    input_function : InputFunction
        An image-derived input sampled once per frame at the frame mid-times (as
        :func:`kinpet.preprocessing.image_derived_input` makes it) gives its samples as
        they are; any other input (a blood recording) gives the exact average of its
        piecewise-linear curve over each frame, what a blood-pool region would measure.
    frames : FrameSchedule

    Returns
    -------
    ndarray, shape [n_frames]
        Activity per frame, in the input's unit (kBq/ml).
    """
    t = input_function.times_s
    if t.size == len(frames) and np.allclose(t, frames.mids_s, rtol=0, atol=_MID_TOLERANCE_S):
        return np.array(input_function.values, dtype=np.float64)
    # Vb = 1: the model is the input itself, averaged over each frame.
    return irreversible_2tc(np.array([0.0, 1.0, 1.0, 1.0]), input_function, frames, "average")


class PaperOrganModel:
    """The published organ fit's model and data on its 0.1-min grid, for one subject.

    Parameters
    ----------
    input_function : InputFunction
        The subject's input; its per-frame values (:func:`per_frame_input`) are what the
        model sees, placed at the frame starts.
    frames : FrameSchedule

    Attributes
    ----------
    grid : ndarray
        The grid (min): first frame start to last frame start (excluded), step 0.1.
    input_on_grid : ndarray
        The per-frame input interpolated onto the grid (kBq/ml).
    """

    def __init__(self, input_function: InputFunction, frames: FrameSchedule):
        starts_min = np.round(frames.starts_min, 2)
        self.starts_min = starts_min
        self.idif = per_frame_input(input_function, frames)
        # The published IDIF, one value per frame at the frame starts: as an input function
        # it gives _paper_plan (the sampling: paper model's grid and interpolation).
        at_starts = InputFunction(starts_min * 60.0, self.idif, source=input_function.source)
        plan = _paper_plan(at_starts, frames)
        self._plan = plan
        self.grid = plan["t0"] + PAPER_STEP_MIN * np.arange(plan["grid_a"].size)
        self.input_on_grid = plan["grid_a"]
        # conv(A, k3-part)[i] = 0.1 sum_{m<i} A[i-1-m]: the running sum, one step late.
        self._running = PAPER_STEP_MIN * np.concatenate([[0.0], np.cumsum(self.input_on_grid)[:-1]])

    def tac_on_grid(self, tac) -> np.ndarray:
        """A curve's frame values (placed at the frame starts) interpolated onto the grid."""
        return _interp_linear_extrapolate(self.grid, self.starts_min, np.asarray(tac, np.float64))

    def on_grid(self, params) -> np.ndarray:
        """The published discrete model on the grid, for one parameter set (K1, k2, k3, Vb)."""
        k1, k2, k3, vb = (float(p) for p in params)
        beta = k2 + k3
        a = self.input_on_grid
        # The k2 part of h; the one-step delay: conv[0] = 0, conv[i] = full[i - 1].
        decay = np.exp(-beta * self.grid)
        tissue = PAPER_STEP_MIN * np.concatenate([[0.0], np.convolve(a, decay)[: a.size - 1]])
        c = k1 / beta * (k3 * self._running + k2 * tissue)
        return (1.0 - vb) * c + vb * a

    def at_starts(self, params) -> np.ndarray:
        """The grid model read at the frame starts (linear, the last start extrapolated),
        as ``sampling: paper`` reads it: the fit's model per frame."""
        curve = self.on_grid(params)
        seg, weight = self._plan["seg"], self._plan["weight"]
        return curve[seg] + weight * (curve[seg + 1] - curve[seg])

    def fit_one(self, tac, lower, upper) -> tuple[np.ndarray, float]:
        """Fit one curve as ``organ_curve_fit.py`` does.

        Returns
        -------
        params : ndarray [4]
            K1, k2, k3, Vb (NaN when curve_fit fails).
        sse : float
            Sum over the frames of (tac - model at the frame starts)^2, (kBq/ml)^2, on the
            scale of the other methods' SSE (the objective itself sums over grid points).
        """
        from scipy.optimize import OptimizeWarning

        target = self.tac_on_grid(tac)
        p0 = np.clip(PAPER_P0, lower, upper)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                p = bounded_curve_fit(
                    lambda _t, params: self.on_grid(params),
                    self.grid,
                    target,
                    p0,
                    lower,
                    upper,
                    diff_step=PAPER_DIFF_STEP,
                )
        except (RuntimeError, ValueError):
            return np.full(4, np.nan), np.nan
        residual = np.asarray(tac, np.float64) - self.at_starts(p)
        return p, float(np.sum(residual**2))


def _fit_block(model: PaperOrganModel, block: np.ndarray, lower, upper):
    out = [model.fit_one(y, lower, upper) for y in block]
    return np.array([p for p, _ in out]).reshape(-1, 4), np.array([s for _, s in out])


def fit_curve_fit_paper(
    tacs,
    input_function: InputFunction,
    frames: FrameSchedule,
    weights="none",
    bounds=None,
    *,
    n_jobs: int = 1,
) -> FitResult:
    """Fit curves with the published organ curve fit (module docstring).

    Parameters
    ----------
    tacs : array_like, shape [N, n_frames] or [n_frames]
        Frame values (kBq/ml, the input's unit).
    input_function : InputFunction
    frames : FrameSchedule
    weights : "none"
        The published fit weighs every grid point equally; other weights are refused.
    bounds : (lower, upper), optional
        Default the paper's K1 [0.01, 2], k2 [0.01, 3], k3 [0.01, 1], Vb [0, 1].
    n_jobs : int
        Worker processes (1: in this process; -1: all cores).

    Returns
    -------
    FitResult
        ``method`` "curve_fit_paper", ``sampling`` "paper", ``weights`` "none"; ``sse``
        as :meth:`PaperOrganModel.fit_one` defines it.
    """
    if not (isinstance(weights, str) and weights == "none"):
        shown = weights if isinstance(weights, str) else "an array"
        raise ValueError(
            f"method={METHOD!r} fits the published objective, equal weights on the 0.1-min "
            f"grid: weights must be 'none', not {shown!r}"
        )
    y = np.asarray(tacs)
    if y.ndim == 1:
        y = y[None, :]
    if y.ndim != 2 or y.shape[1] != len(frames):
        raise ValueError(f"tacs must have shape [N, {len(frames)}], got {np.shape(tacs)}")
    y = y.astype(np.float64)
    lower, upper = check_bounds(bounds)
    input_function.check_not_zero()
    model = PaperOrganModel(input_function, frames)
    status = screen_curves(y)
    params = np.full((y.shape[0], 4), np.nan)
    sse = np.full(y.shape[0], np.nan)
    good = np.flatnonzero(status == STATUS_OK)
    if n_jobs == -1:
        n_jobs = os.cpu_count() or 1
    if good.size and (n_jobs <= 1 or good.size < 2):
        params[good], sse[good] = _fit_block(model, y[good], lower, upper)
    elif good.size:
        blocks = np.array_split(good, min(good.size, 4 * n_jobs))
        with ProcessPoolExecutor(n_jobs) as pool:
            parts = pool.map(
                _fit_block, *zip(*((model, y[b], lower, upper) for b in blocks), strict=True)
            )
            for b, (p, s) in zip(blocks, parts, strict=True):
                params[b], sse[b] = p, s
    failed = (status == STATUS_OK) & ~(np.isfinite(params).all(axis=1) & np.isfinite(sse))
    status[failed] = STATUS_FAILED
    params[status != STATUS_OK] = np.nan
    sse[status != STATUS_OK] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        ki = params[:, 0] * params[:, 2] / (params[:, 1] + params[:, 2])
    return FitResult(params, ki, sse, status == STATUS_OK, status, METHOD, "paper", "none")
