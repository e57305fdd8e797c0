"""Fitting the irreversible two-tissue model to many time-activity curves at once.

One entry point, :func:`fit`, with two methods (docs/fitting.md):

``curve_fit``
    The paper's reference: :func:`scipy.optimize.curve_fit` one curve at a time, start
    p0 = (0.1, 0.1, 0.01, 0.01), the paper's bounds, ``diff_step=0.001``. Slow but
    faithful; ``n_jobs`` spreads curves over processes (:mod:`kinpet.curvefit`).
``fast``
    A global fitter for many curves. For a fixed beta = k2 + k3 the model is linear in
    three coefficients, ``y = p1 I + p2 E_beta + p3 A`` (I the integral of the input,
    E_beta its convolution with exp(-beta t), A the input; all sampled like the model),
    with p1 = (1 - Vb) K1 k3 / beta, p2 = (1 - Vb) K1 k2 / beta, p3 = Vb. The bounds of k2
    and k3 bound p1 / (p1 + p2) = k3 / beta, those of Vb bound p3. On a grid of beta
    values this bounded linear least-squares problem is solved for all curves with
    matrix products (on the faces of its bounds where the solution lies near the best
    beta; see :mod:`kinpet.fastfit.linear`). The best beta per curve (or, where the SSE
    over beta has local minima tied within the noise, the one nearest the paper's start,
    where curve_fit usually ends) is refined by a parabola through its neighbours, the
    linear problem solved again there (exactly, at the exact E) and mapped back to
    (K1, k2, k3, Vb) (only K1 may still need clipping). All curves are then polished
    together with projected Levenberg-Marquardt on the full Hessian of the exact model
    (float64); most have converged after the refinement and stop after one check. A
    grid search cannot fall into the local minima that a single start can: it sees them
    all and chooses. The code is the package :mod:`kinpet.fastfit`.

Weights (``weights=``): ``"none"`` (the paper), ``"duration"`` (frame duration) or
``"duration_decay"``: duration x exp(-lambda t_mid) with lambda = ln 2 / 109.771 min
(F-18) and t_mid the frame mid-time after injection. This is the inverse of the variance
of a decay-corrected frame value, Var ~ C / (duration x decay), with the decay factor
taken at the frame mid-time and the C factor left out (it would need the unknown true
curve). Weights are scaled to a mean of 1 over the frames, so ``sse`` keeps the unit of
the curves squared whatever the weighting. An array of per-frame weights works as well.

Curves that cannot be fitted (non-finite values, all zero, fewer than
``MIN_POSITIVE_FRAMES`` positive frames) come back with NaN parameters, ``ok`` False
and a ``status`` code saying why; the rest of the batch is fitted normally.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kinpet.constants import F18_HALF_LIFE_MIN as F18_HALF_LIFE_MIN
from kinpet.constants import F18_LAMBDA_PER_MIN as F18_LAMBDA_PER_MIN
from kinpet.curvefit import PAPER_P0, curve_fit_many
from kinpet.delayfit import DELAY_STEP_S, check_delay_bounds, delay_grid, fit_with_delay
from kinpet.fastfit import DEFAULT_BETA_GRID, fit_curves
from kinpet.fastfit import beta_values as beta_values  # kept importable from here
from kinpet.fastfit.delay import START_DELAY_STEP_S, fit_delayed_curves
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import PAPER_LOWER, PAPER_UPPER, PARAMETER_NAMES, KineticModel

METHODS = ("fast", "curve_fit", "curve_fit_paper")
WEIGHT_SCHEMES = ("none", "duration", "duration_decay")

# Four parameters need at least four informative frames.
MIN_POSITIVE_FRAMES = 4

# Status codes of FitResult.status.
STATUS_OK = 0
STATUS_NONFINITE = 1
STATUS_ALL_ZERO = 2
STATUS_TOO_FEW_POSITIVE = 3
STATUS_FAILED = 4
STATUS_NEGATIVE = 5
STATUS_NAMES = (
    "ok",
    "non-finite values",
    "all zero",
    "too few positive frames",
    "fit failed",
    "strongly negative values",
)

DEFAULT_CHUNK = 65536  # curves per chunk of the fast fitter (~0.1 GB of working memory)
_SCREEN_BLOCK = 65536
# At most 40 steps; curves stop as soon as they have converged. Most stop at the first
# check; the few still going after many steps have optima far along a flat valley or on
# a bound, and a lower cap leaves more of them short of curve_fit's SSE (docs/fitting.md).
LM_ITERATIONS = 40


@dataclass
class FitResult:
    """Fitted parameters of N curves.

    Attributes
    ----------
    params : numpy.ndarray, shape [N, 4]
        K1 (ml/cm^3/min), k2 (1/min), k3 (1/min), Vb (fraction); NaN where not fitted.
    ki : numpy.ndarray, shape [N]
        K1 k3 / (k2 + k3) in ml/cm^3/min.
    sse : numpy.ndarray, shape [N]
        Weighted sum of squared residuals, sum_f w_f (y_f - model_f)^2 (curve units squared).
    ok : numpy.ndarray of bool, shape [N]
        The curve was valid and the fit converged to finite values.
    status : numpy.ndarray of int8, shape [N]
        Why a curve is not ok: an index into :data:`STATUS_NAMES`.
    method, sampling, weights : str
        How the fit was made.
    delay_s : numpy.ndarray, shape [N], or None
        The fitted input delay (s) when one was fitted (``delay_bounds_s``).
    """

    params: np.ndarray
    ki: np.ndarray
    sse: np.ndarray
    ok: np.ndarray
    status: np.ndarray
    method: str
    sampling: str
    weights: str
    delay_s: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.sse.size)

    def reasons(self) -> list[str]:
        """The status of every curve in words."""
        return [STATUS_NAMES[s] for s in self.status]

    def as_dict(self) -> dict:
        """Columns K1, k2, k3, Vb, Ki, (delay_s when fitted,) SSE, ok, status."""
        out = {name: self.params[:, i] for i, name in enumerate(PARAMETER_NAMES)}
        out["Ki"] = self.ki
        if self.delay_s is not None:
            out["delay_s"] = self.delay_s
        out.update(SSE=self.sse, ok=self.ok, status=self.reasons())
        return out


# -- small helpers ----------------------------------------------------------------------------


def frame_weights(frames: FrameSchedule, weights="none") -> np.ndarray:
    """Per-frame weights, scaled to a mean of 1.

    Parameters
    ----------
    frames : FrameSchedule
    weights : {"none", "duration", "duration_decay"} or array_like, shape [n_frames]
        See the module docstring; an array must be finite, >= 0 and not all zero.

    Returns
    -------
    numpy.ndarray, shape [n_frames]
    """
    if isinstance(weights, str) or weights is None:
        scheme = "none" if weights is None else weights
        if scheme == "none":
            w = np.ones(len(frames))
        elif scheme == "duration":
            w = frames.durations_min.copy()
        elif scheme == "duration_decay":
            w = frames.durations_min * np.exp(-F18_LAMBDA_PER_MIN * frames.mids_min)
        else:
            raise ValueError(f"weights must be one of {WEIGHT_SCHEMES} or an array, not {scheme!r}")
    else:
        w = np.array(weights, dtype=np.float64)
        if w.shape != (len(frames),):
            raise ValueError(f"weights must have shape ({len(frames)},), got {w.shape}")
        if not np.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
            raise ValueError("weights must be finite, >= 0 and not all zero")
    return w / w.mean()


def default_tie_tolerance(w) -> float:
    """Relative SSE difference below which two minima count as tied: 1 / (n_frames - 4).

    With the noise variance estimated from the best fit as SSE / (n_frames - 4), two
    minima closer than this differ by less than one noise variance (delta chi-square < 1):
    the data cannot tell them apart. Only frames with a weight > 0 count.
    """
    dof = int(np.count_nonzero(np.asarray(w) > 0)) - 4
    return 1.0 / dof if dof > 0 else 0.0


def check_bounds(bounds=None) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of (K1, k2, k3, Vb); ``None`` gives the paper's.

    k2 + k3 must stay > 0, so the lower bounds of k2 and k3 may not both be 0; Vb must lie
    in [0, 1).
    """
    if bounds is None:
        bounds = (PAPER_LOWER, PAPER_UPPER)
    try:
        lo, hi = (np.array(b, dtype=np.float64) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError("bounds must be (lower, upper), each 4 numbers (K1, k2, k3, Vb)") from None
    if lo.shape != (4,) or hi.shape != (4,):
        raise ValueError("bounds must be (lower, upper), each 4 numbers (K1, k2, k3, Vb)")
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError("bounds must be finite")
    if (lo > hi).any() or (lo < 0).any():
        raise ValueError(f"bounds must satisfy 0 <= lower <= upper, got {lo} and {hi}")
    if lo[1] + lo[2] <= 0:
        raise ValueError("the lower bounds of k2 and k3 may not both be 0 (k2 + k3 > 0)")
    if hi[3] >= 1:
        # Vb = 1 leaves no tissue and makes K1 = (p1 + p2) / (1 - Vb) undefined.
        hi = hi.copy()
        hi[3] = min(hi[3], 1.0 - 1e-9)
    return lo, hi


def screen_curves(tacs: np.ndarray) -> np.ndarray:
    """Status codes of curves that cannot be fitted (0 for those that can)."""
    status = np.zeros(tacs.shape[0], dtype=np.int8)
    # In blocks: temporaries of a whole-body array would cost gigabytes.
    for start in range(0, tacs.shape[0], _SCREEN_BLOCK):
        block = tacs[start : start + _SCREEN_BLOCK]
        finite = np.isfinite(block).all(axis=1)
        positive = (block > 0).sum(axis=1)  # NaN > 0 is False
        part = status[start : start + _SCREEN_BLOCK]
        part[positive < MIN_POSITIVE_FRAMES] = STATUS_TOO_FEW_POSITIVE
        part[positive == 0] = STATUS_ALL_ZERO
        part[~finite] = STATUS_NONFINITE
    return status


def flag_negative(result, tacs, tolerance: float) -> np.ndarray:
    """Mark fitted curves whose minimum lies below ``-tolerance`` times their maximum as
    not ok (status "strongly negative values"); their values are kept to look at.

    The model cannot go below 0, so it fits such a curve as well as it can and reports
    numbers that look fine. For region means that is no noise but a wrong scale, an
    offset or a bad background subtraction. (Not applied to voxels, whose noise can be
    large against their own maximum.)

    Parameters
    ----------
    result : FitResult or kinpet.patlak.PatlakResult
        Its ``ok`` and ``status`` are changed in place.
    tacs : array_like [N, T]
    tolerance : float

    Returns
    -------
    numpy.ndarray of int
        Indices of the curves flagged.
    """
    y = np.atleast_2d(np.asarray(tacs, dtype=np.float64))
    with np.errstate(invalid="ignore"):
        low, high = np.nanmin(y, axis=1), np.nanmax(y, axis=1)
        bad = result.ok & (high > 0) & (low < -tolerance * high)
    result.ok[bad] = False
    result.status[bad] = STATUS_NEGATIVE
    return np.flatnonzero(bad)


def with_fixed(bounds, fixed) -> tuple[np.ndarray, np.ndarray]:
    """Bounds (:func:`check_bounds`) with the parameters named in ``fixed`` held at their
    value (lower = upper), e.g. ``{"Vb": 0.05}``."""
    lo, hi = check_bounds(bounds)
    if not fixed:
        return lo, hi
    unknown = sorted(set(fixed) - set(PARAMETER_NAMES))
    if unknown:
        raise ValueError(f"fixed: unknown parameter(s) {unknown}; known: {list(PARAMETER_NAMES)}")
    lo, hi = lo.copy(), hi.copy()
    for name, value in fixed.items():
        i = PARAMETER_NAMES.index(name)
        lo[i] = hi[i] = float(value)
    return check_bounds((lo, hi))


def _ki(params):
    return params[..., 0] * params[..., 2] / (params[..., 1] + params[..., 2])


def fit(
    tacs,
    input_function: InputFunction,
    frames: FrameSchedule,
    method: str = "fast",
    weights="none",
    bounds=None,
    sampling: str = "average",
    *,
    n_jobs: int = 1,
    device=None,
    chunk_size: int = DEFAULT_CHUNK,
    beta_grid=DEFAULT_BETA_GRID,
    lm_iterations: int = LM_ITERATIONS,
    workers: int | None = None,
    tie_tolerance: float | None = None,
    fixed=None,
    delay_bounds_s=None,
    delay_step_s: float | None = None,
    blood_function: InputFunction | None = None,
) -> FitResult:
    """Fit the irreversible two-tissue model to many curves.

    Parameters
    ----------
    tacs : array_like, shape [N, n_frames] (or [n_frames] for one curve)
        Decay-corrected frame values, in the same concentration unit as the input
        function. float32 is fine: chunks are converted to float64 one at a time.
    input_function : InputFunction
    frames : FrameSchedule
    method : {"fast", "curve_fit", "curve_fit_paper"}
        "curve_fit_paper": the published organ curve fit on the 0.1-min grid
        (:mod:`kinpet.paperfit`; ``sampling`` does not apply, ``weights`` must be "none").
    weights : {"none", "duration", "duration_decay"} or array_like [n_frames]
        See :func:`frame_weights`.
    bounds : (lower, upper), optional
        Bounds of (K1, k2, k3, Vb); default the paper's K1 [0.01, 2], k2 [0.01, 3],
        k3 [0.01, 1], Vb [0, 1].
    sampling : {"average", "mid", "paper"}
        The model's sampling mode (:mod:`kinpet.kinetics`); "paper" reproduces the paper.
    n_jobs : int
        ``curve_fit`` only: worker processes (1: in this process; -1: all cores).
    device : str or torch.device, optional
        ``fast`` only: where to compute; default CUDA when available, else CPU.
    chunk_size : int
        ``fast`` only: curves per chunk; memory grows with it (~2 kB per curve).
    beta_grid : (min, max, count) or array_like
        ``fast`` only: the beta = k2 + k3 values (1/min) of the grid step; a triple
        means ``count`` log-spaced values.
    lm_iterations : int
        ``fast`` only: at most this many Levenberg-Marquardt steps (curves stop earlier
        once converged).
    workers : int, optional
        ``fast`` on the CPU only: threads fitting parts of each chunk; default
        ``torch.get_num_threads()``. With more than one, torch's thread count is set to 1
        for the whole fit (and restored after it): each thread then runs one torch thread.
    tie_tolerance : float, optional
        ``fast`` only: local minima of the SSE over beta whose SSE lies within this
        fraction of the best count as tied, and the one nearest the paper's start is
        fitted (see :func:`kinpet.fastfit.grid.choose_minimum`); default
        :func:`default_tie_tolerance` (1/58 for 62 frames); 0 always takes the lowest SSE.

    fixed : mapping, optional
        Parameters held at a value and left out of the fit, e.g. ``{"Vb": 0.05}``; the
        same as lower = upper in ``bounds`` (which works too). Names: K1, k2, k3, Vb.
    delay_bounds_s : (lo, hi), optional
        Fit an input delay per curve within these bounds (s; positive: the tissue sees the
        input later). The result then has ``delay_s``. Default: no delay. ``fast`` with
        ``sampling="average"`` fits it as a fifth parameter of the batch
        (:mod:`kinpet.fastfit.delay`: a start on a grid of delays, then LM on all five);
        the other methods and samplings fit every curve on a grid of delays and refine
        each by a bounded scalar search (:mod:`kinpet.delayfit`).
    delay_step_s : float, optional
        Spacing of the grid of delays, s; default 2.5 for the batched fast fit
        (:data:`kinpet.fastfit.delay.START_DELAY_STEP_S`), else 1
        (:data:`kinpet.delayfit.DELAY_STEP_S`).
    blood_function : InputFunction, optional
        Whole blood for the Vb term, ``input_function`` being the plasma input of the
        tissue term (:func:`kinpet.kinetics.irreversible_2tc`); a fitted delay shifts
        both. Not for ``curve_fit_paper`` (the published fit has one input).

    Returns
    -------
    FitResult
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    batched_delay = delay_bounds_s is not None and method == "fast" and sampling == "average"
    if delay_bounds_s is not None and not batched_delay:
        step = DELAY_STEP_S if delay_step_s is None else delay_step_s
        options = dict(method=method, weights=weights, bounds=bounds, sampling=sampling)
        options.update(n_jobs=n_jobs, device=device, chunk_size=chunk_size, fixed=fixed)
        options.update(beta_grid=beta_grid, lm_iterations=lm_iterations, workers=workers)
        options.update(tie_tolerance=tie_tolerance, blood_function=blood_function)
        return fit_with_delay(tacs, input_function, frames, delay_bounds_s, step, **options)
    if method == "curve_fit_paper":  # the published organ fit: kinpet.paperfit
        from kinpet.paperfit import fit_curve_fit_paper

        if blood_function is not None:
            raise ValueError(
                "method='curve_fit_paper' takes one input function (the published organ "
                "fit); blood_function applies to 'fast' and 'curve_fit'"
            )

        return fit_curve_fit_paper(
            tacs, input_function, frames, weights, with_fixed(bounds, fixed), n_jobs=n_jobs
        )
    y = np.asarray(tacs)
    single = y.ndim == 1
    if single:
        y = y[None, :]
    if y.ndim != 2 or y.shape[1] != len(frames):
        raise ValueError(f"tacs must have shape [N, {len(frames)}], got {np.shape(tacs)}")
    if not np.issubdtype(y.dtype, np.floating):
        y = y.astype(np.float64)
    w = frame_weights(frames, weights)
    lo, hi = with_fixed(bounds, fixed)
    model = KineticModel(input_function, frames, sampling, blood_function)
    # A zero input makes every linear step singular: say so instead of a LinAlgError.
    input_function.check_not_zero()
    status = screen_curves(y)
    params = np.full((y.shape[0], 4), np.nan)
    sse = np.full(y.shape[0], np.nan)
    delay = np.full(y.shape[0], np.nan) if batched_delay else None
    if batched_delay:
        delays_s = check_delay_bounds(delay_bounds_s)
        step = START_DELAY_STEP_S if delay_step_s is None else delay_step_s
        delay_options = dict(delays_s=delay_grid(*delays_s, step), blood_function=blood_function)
    good = np.flatnonzero(status == STATUS_OK)
    if good.size:
        if tie_tolerance is None:
            tie_tolerance = default_tie_tolerance(w)
        fast = dict(start_beta=PAPER_P0[1] + PAPER_P0[2], tie_tolerance=tie_tolerance,
                    beta_grid=beta_grid, device=device, chunk_size=chunk_size,
                    lm_iterations=lm_iterations, workers=workers)  # fmt: skip
        if batched_delay:
            lo_d, hi_d = np.r_[lo, delays_s[0]], np.r_[hi, delays_s[1]]
            params[good], sse[good], delay[good] = fit_delayed_curves(
                y[good], input_function, frames, w, lo_d, hi_d, **fast, **delay_options
            )
        elif method == "fast":
            params[good], sse[good] = fit_curves(y[good], model, w, lo, hi, **fast)
        else:
            params[good], sse[good] = curve_fit_many(
                y[good], (input_function, blood_function), frames, sampling, w, lo, hi, n_jobs
            )
    failed = (status == STATUS_OK) & ~(np.isfinite(params).all(axis=1) & np.isfinite(sse))
    status[failed] = STATUS_FAILED
    params[status != STATUS_OK] = np.nan
    sse[status != STATUS_OK] = np.nan
    if delay is not None:
        delay[status != STATUS_OK] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        ki = _ki(params)
    scheme = weights if isinstance(weights, str) else ("none" if weights is None else "custom")
    ok = status == STATUS_OK
    return FitResult(params, ki, sse, ok, status, method, sampling, scheme, delay_s=delay)
