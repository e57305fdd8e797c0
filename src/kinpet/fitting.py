"""Fitting the irreversible two-tissue model to many time-activity curves at once.

One entry point, :func:`fit`, with two methods (docs/fitting.md):

``curve_fit``
    The paper's reference: :func:`scipy.optimize.curve_fit` one curve at a time, start
    p0 = (0.1, 0.1, 0.01, 0.01), the paper's bounds, ``diff_step=0.001``. Slow but
    faithful; ``n_jobs`` spreads curves over processes.
``fast``
    A global fitter for many curves. For a fixed beta = k2 + k3 the model is linear in
    three coefficients, ``y = p1 I + p2 E_beta + p3 A`` (I the integral of the input,
    E_beta its convolution with exp(-beta t), A the input; all sampled like the model),
    with p1 = (1 - Vb) K1 k3 / beta, p2 = (1 - Vb) K1 k2 / beta, p3 = Vb. The bounds of k2
    and k3 bound p1 / (p1 + p2) = k3 / beta, those of Vb bound p3. On a grid of beta
    values this bounded linear least-squares problem is solved exactly for all curves
    with matrix products. The best beta per curve (or, where the SSE over beta has local
    minima tied within the noise, the one nearest the paper's start, where curve_fit
    usually ends) is refined by a parabola through its neighbours, the linear problem
    solved again there (exactly, at the exact E) and mapped back to (K1, k2, k3, Vb)
    (only K1 may still need clipping). All curves are then polished together with
    projected Levenberg-Marquardt on the full Hessian of the exact model (float64); most
    have converged after the refinement and stop after one check. A grid search cannot
    fall into the local minima that a single start can: it sees them all and chooses.

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

import math
import os
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import PAPER_LOWER, PAPER_UPPER, PARAMETER_NAMES, KineticModel

METHODS = ("fast", "curve_fit", "curve_fit_paper")
WEIGHT_SCHEMES = ("none", "duration", "duration_decay")
F18_HALF_LIFE_MIN = 109.771
F18_LAMBDA_PER_MIN = math.log(2.0) / F18_HALF_LIFE_MIN
# The paper's curve_fit start (De Benetti et al. 2023; docs/fitting.md).
PAPER_P0 = (0.1, 0.1, 0.01, 0.01)
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

# (min, max, count), log-spaced, 1/min. 100 values (steps of 5.5 %) give, after the polish,
# the same SSE as 200 on benchmarks/fitting.py at half the grid's cost.
DEFAULT_BETA_GRID = (0.02, 4.0, 100)
DEFAULT_CHUNK = 65536  # curves per chunk of the fast fitter (~0.1 GB of working memory)
_SCREEN_BLOCK = 65536
_GRID_BLOCK = 512  # curves per block of the grid step: its [block, beta] arrays stay in cache
_LM_BLOCK = 4096  # curves per block of the Levenberg-Marquardt polish
# At most 40 steps; curves stop as soon as they have converged. On noisy benchmark curves
# ~70 % stop at the first check (no trial step), ~11 % are still going after two steps,
# ~0.4 % after eight and 0.05 % after 15: optima far along a flat valley or on a bound.
# A cap of 15 left 0.20 % of 5,000 curves > 0.1 % above curve_fit's SSE (40: 0.06 %).
_LM_ITERATIONS = 40
# Steps within each chunk; curves still going after them continue together, those of all
# chunks at once: each step costs ~1 ms of fixed overhead however few curves take it.
_LM_CHUNK_ITERATIONS = 15
# The first steps go block by block, the rest on the curves not yet converged, all together.
_LM_FIRST_STEPS = 2
# Converged when a step lowers (or would lower) the SSE by less than this, relatively. Far
# below the noise: a change of 1e-8 x SSE moves a parameter by ~1e-3 of its standard error.
_LM_RTOL = 1e-8
_FD_REL_STEP = 1e-4  # relative step of the central differences dE/dbeta, d2E/dbeta2
_TABLE_STEP = 0.01  # step in log beta of their table


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
    """

    params: np.ndarray
    ki: np.ndarray
    sse: np.ndarray
    ok: np.ndarray
    status: np.ndarray
    method: str
    sampling: str
    weights: str

    def __len__(self) -> int:
        return int(self.sse.size)

    def reasons(self) -> list[str]:
        """The status of every curve in words."""
        return [STATUS_NAMES[s] for s in self.status]

    def as_dict(self) -> dict:
        """Columns K1, k2, k3, Vb, Ki, SSE, ok, status (for a table)."""
        out = {name: self.params[:, i] for i, name in enumerate(PARAMETER_NAMES)}
        out.update(Ki=self.ki, SSE=self.sse, ok=self.ok, status=self.reasons())
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


def flag_negative(result: FitResult, tacs, tolerance: float) -> np.ndarray:
    """Mark fitted curves whose minimum lies below ``-tolerance`` times their maximum as
    not ok (status "strongly negative values"); their values are kept to look at.

    The model cannot go below 0, so it fits such a curve as well as it can and reports
    numbers that look fine. For region means that is no noise but a wrong scale, an
    offset or a bad background subtraction. (Not applied to voxels, whose noise can be
    large against their own maximum.)

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
    lm_iterations: int = _LM_ITERATIONS,
    workers: int | None = None,
    tie_tolerance: float | None = None,
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
        ``fast`` on the CPU only: threads fitting parts of each chunk, each with one torch
        thread; default ``torch.get_num_threads()``.
    tie_tolerance : float, optional
        ``fast`` only: local minima of the SSE over beta whose SSE lies within this
        fraction of the best count as tied, and the one nearest the paper's start is
        fitted (see :meth:`FastFitter._choose_minimum`); default
        :func:`default_tie_tolerance` (1/58 for 62 frames); 0 always takes the lowest SSE.

    Returns
    -------
    FitResult
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if method == "curve_fit_paper":  # the published organ fit: kinpet.paperfit
        from kinpet.paperfit import fit_curve_fit_paper

        return fit_curve_fit_paper(tacs, input_function, frames, weights, bounds, n_jobs=n_jobs)
    y = np.asarray(tacs)
    single = y.ndim == 1
    if single:
        y = y[None, :]
    if y.ndim != 2 or y.shape[1] != len(frames):
        raise ValueError(f"tacs must have shape [N, {len(frames)}], got {np.shape(tacs)}")
    if not np.issubdtype(y.dtype, np.floating):
        y = y.astype(np.float64)
    w = frame_weights(frames, weights)
    lo, hi = check_bounds(bounds)
    model = KineticModel(input_function, frames, sampling)
    # A zero input makes every linear step singular: say so instead of a LinAlgError.
    input_function.check_not_zero()
    status = screen_curves(y)
    params = np.full((y.shape[0], 4), np.nan)
    sse = np.full(y.shape[0], np.nan)
    good = np.flatnonzero(status == STATUS_OK)
    if good.size:
        if method == "fast":
            fitter = FastFitter(
                model, w, lo, hi, beta_grid=beta_grid, device=device, tie_tolerance=tie_tolerance
            )
            steps = min(lm_iterations, _LM_CHUNK_ITERATIONS)
            going = []
            for start in range(0, good.size, chunk_size):
                idx = good[start : start + chunk_size]
                params[idx], sse[idx], unconverged = fitter.fit(y[idx], steps, workers)
                going.append(idx[unconverged])
            going = np.concatenate(going)
            if lm_iterations > steps:
                for start in range(0, going.size, chunk_size):
                    idx = going[start : start + chunk_size]
                    params[idx], sse[idx] = fitter.resume(
                        y[idx], params[idx], lm_iterations - steps
                    )
        else:
            params[good], sse[good] = _curve_fit_many(
                y[good], input_function, frames, sampling, w, lo, hi, n_jobs
            )
    failed = (status == STATUS_OK) & ~(np.isfinite(params).all(axis=1) & np.isfinite(sse))
    status[failed] = STATUS_FAILED
    params[status != STATUS_OK] = np.nan
    sse[status != STATUS_OK] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        ki = _ki(params)
    scheme = weights if isinstance(weights, str) else ("none" if weights is None else "custom")
    result = FitResult(params, ki, sse, status == STATUS_OK, status, method, sampling, scheme)
    return result


# -- curve_fit: the paper's reference -----------------------------------------------------------

_WORKER = {}


def _curve_fit_init(input_function, frames, sampling, w, lo, hi):
    # One model per process; torch's own threads would only fight the process pool.
    torch.set_num_threads(1)
    _WORKER.update(
        model=KineticModel(input_function, frames, sampling),
        sigma=1.0 / np.sqrt(w) if not np.allclose(w, 1.0) else None,
        w=w,
        lo=lo,
        hi=hi,
    )


def _curve_fit_block(block: np.ndarray):
    from scipy.optimize import OptimizeWarning, curve_fit

    model, sigma, w, lo, hi = (_WORKER[k] for k in ("model", "sigma", "w", "lo", "hi"))
    x_dummy = np.arange(block.shape[1], dtype=np.float64)
    # Zero-weight frames cannot enter as sigma = inf; leave them out of the residuals.
    use = w > 0

    def f(_x, k1, k2, k3, vb):
        return model(np.array([k1, k2, k3, vb]))[use]

    p0 = np.clip(PAPER_P0, lo, hi)
    params = np.full((block.shape[0], 4), np.nan)
    sse = np.full(block.shape[0], np.nan)
    for i, y in enumerate(block):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                p, _ = curve_fit(
                    f,
                    x_dummy[use],
                    y[use],
                    p0=p0,
                    sigma=None if sigma is None else sigma[use],
                    bounds=(lo, hi),
                    diff_step=0.001,
                )
        except (RuntimeError, ValueError):
            continue
        params[i] = p
        sse[i] = float(np.sum(w * (y - model(p)) ** 2))
    return params, sse


def _curve_fit_many(y, input_function, frames, sampling, w, lo, hi, n_jobs):
    y = np.asarray(y, dtype=np.float64)
    setup = (input_function, frames, sampling, w, lo, hi)
    if n_jobs == -1:
        n_jobs = os.cpu_count() or 1
    if n_jobs <= 1 or y.shape[0] < 2:
        saved = torch.get_num_threads()
        try:
            _curve_fit_init(*setup)
            return _curve_fit_block(y)
        finally:
            torch.set_num_threads(saved)
            _WORKER.clear()
    blocks = np.array_split(y, min(y.shape[0], 4 * n_jobs))
    with ProcessPoolExecutor(n_jobs, initializer=_curve_fit_init, initargs=setup) as pool:
        parts = list(pool.map(_curve_fit_block, blocks))
    return np.concatenate([p for p, _ in parts]), np.concatenate([s for _, s in parts])


# -- fast: grid of beta with exact bounded linear least squares, then LM ------------------------


def _default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def beta_values(beta_grid=DEFAULT_BETA_GRID) -> np.ndarray:
    """The beta grid (1/min): a (min, max, count) triple is log-spaced."""
    if isinstance(beta_grid, tuple) and len(beta_grid) == 3:
        b_min, b_max, count = beta_grid
        return np.geomspace(b_min, b_max, int(count))
    betas = np.asarray(beta_grid, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0 or not (betas > 0).all():
        raise ValueError("beta_grid must be (min, max, count) or positive values")
    return betas


class FastFitter:
    """The fast global fitter for one model, weighting and bounds (see the module docstring).

    Parameters
    ----------
    model : KineticModel
    w : numpy.ndarray, shape [n_frames]
        Frame weights (:func:`frame_weights`).
    lo, hi : numpy.ndarray, shape [4]
        Bounds of (K1, k2, k3, Vb) (:func:`check_bounds`).
    beta_grid : see :func:`fit`
    device : str or torch.device, optional
    tie_tolerance : float, optional
        See :func:`fit`.
    """

    def __init__(
        self,
        model: KineticModel,
        w,
        lo,
        hi,
        beta_grid=DEFAULT_BETA_GRID,
        device=None,
        tie_tolerance=None,
    ):
        self.model = model
        if tie_tolerance is None:
            tie_tolerance = default_tie_tolerance(w)
        if not (math.isfinite(tie_tolerance) and tie_tolerance >= 0):
            raise ValueError(f"tie_tolerance must be a number >= 0, not {tie_tolerance!r}")
        self.tie_tolerance = float(tie_tolerance)
        self.device = torch.device(device) if device is not None else _default_device()
        dd = {"device": self.device, "dtype": torch.float64}
        self.sqrt_w = torch.as_tensor(np.sqrt(w), **dd)
        self.lo = torch.as_tensor(lo, **dd)
        self.hi = torch.as_tensor(hi, **dd)
        # Only the betas = k2 + k3 that the bounds allow: the grid is clipped to them.
        betas = np.unique(np.clip(beta_values(beta_grid), lo[1] + lo[2], hi[1] + hi[2]))
        self.betas = torch.as_tensor(betas, **dd)
        # The basis, exactly as the model samples it: I from (1, 0, 1, 0), A from (0, 1, 1, 1),
        # E_beta from (1, beta, 0, 0) (kinetics: C = (1-Vb) K1/beta (k3 I + k2 E) + Vb A).
        unit = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]], **dd)
        curves = self.model(unit)
        self.i_w = curves[0] * self.sqrt_w
        self.a_w = curves[1] * self.sqrt_w
        grid = torch.zeros(betas.size, 4, **dd)
        grid[:, 0], grid[:, 1] = 1.0, self.betas
        self.e_w = self.model(grid) * self.sqrt_w  # [B, F]
        # Gram entries: those of I and A are scalars, those with E_beta one per beta.
        self.ii = self.i_w @ self.i_w
        self.aa = self.a_w @ self.a_w
        self.ia = self.i_w @ self.a_w
        self.ee = (self.e_w * self.e_w).sum(1)
        self.ie = self.e_w @ self.i_w
        self.ea = self.e_w @ self.a_w
        self.vb_lo = float(lo[3])
        self._de_table = None
        self._lo, self._hi = [float(v) for v in lo], [float(v) for v in hi]
        self.vb_hi = float(hi[3])
        self.rho_lo, self.rho_hi = self._rho_bounds(self.betas)
        self._scan_coef = self._scan_coefficients()
        self._log_grid = torch.log(self.betas)
        self._start_distance = (self._log_grid - math.log(PAPER_P0[1] + PAPER_P0[2])).abs()
        self._ia_rows = torch.stack([self.i_w, self.a_w])  # [2, F]

    # -- public ---------------------------------------------------------------------------------
    def fit(self, tacs: np.ndarray, lm_iterations: int = _LM_CHUNK_ITERATIONS, workers=None):
        """Fit one chunk of valid curves.

        Returns params [n, 4], weighted SSE [n] and the indices of the curves not yet
        converged after ``lm_iterations`` steps (numpy; :meth:`resume` goes on with them).

        On the CPU the curves are split into ``workers`` parts (default: torch's thread
        count) fitted in as many threads, each with one torch thread. Most tensors here
        are too small for torch's own threads to pay (and on a busy machine their waiting
        for each other costs far more than they gain); torch releases the GIL inside each
        operation, so parts fitted in parallel keep the cores busy. A curve's result does
        not depend on the split beyond round-off.
        """
        y = torch.as_tensor(np.asarray(tacs), device=self.device).to(torch.float64)
        y_w = y * self.sqrt_w
        n = y_w.shape[0]
        if workers is None:
            workers = torch.get_num_threads() if self.device.type == "cpu" else 1
        workers = max(1, min(workers, n // _LM_BLOCK))
        if workers == 1:
            x, sse, going = self._fit_part(y_w, lm_iterations)
        else:
            saved = torch.get_num_threads()
            try:
                with ThreadPoolExecutor(workers) as pool:
                    parts = list(
                        pool.map(
                            lambda part: self._fit_part(part, lm_iterations, threads=1),
                            y_w.tensor_split(workers),
                        )
                    )
            finally:
                torch.set_num_threads(saved)
            x, sse = (torch.cat([part[k] for part in parts]) for k in (0, 1))
            offsets = np.cumsum([0] + [len(part[0]) for part in parts[:-1]])
            going = torch.cat([part[2] + int(o) for part, o in zip(parts, offsets, strict=True)])
        return x.cpu().numpy(), sse.cpu().numpy(), going.cpu().numpy()

    def resume(self, tacs: np.ndarray, params: np.ndarray, lm_iterations: int):
        """Go on polishing curves from ``params`` [n, 4]; returns params and SSE (numpy)."""
        y = torch.as_tensor(np.asarray(tacs), device=self.device).to(torch.float64)
        x = torch.as_tensor(np.asarray(params), device=self.device).to(torch.float64)
        x, sse, *_ = self.lm(x, y * self.sqrt_w, lm_iterations)
        return x.cpu().numpy(), sse.cpu().numpy()

    def _fit_part(self, y_w, lm_iterations, threads=None):
        """:meth:`fit` of weighted curves [n, F] in this thread.

        Returns params, SSE and the indices of the curves not converged (torch)."""
        if threads is not None:
            # Per thread where torch uses OpenMP; fit() restores its own count afterwards.
            torch.set_num_threads(threads)
        n = y_w.shape[0]
        x = torch.empty(n, 4, dtype=y_w.dtype, device=y_w.device)
        sse, lam = torch.empty_like(y_w[:, 0]), torch.empty_like(y_w[:, 0])
        e = torch.empty_like(y_w)
        first = min(lm_iterations, _LM_FIRST_STEPS)
        rest = []
        # Blocks small enough for the cache: the work is memory-bound, not arithmetic.
        for start in range(0, n, _LM_BLOCK):
            rows = slice(start, start + _LM_BLOCK)
            block = y_w[rows]
            x0, e0, beta0 = self.grid_start(block)
            x[rows], sse[rows], e[rows], lam[rows], active = self.lm(
                x0, block, first, e=e0, beta_e=beta0
            )
            rest.append(active + start)
        # The few curves not converged yet (mostly optima on a bound) go on together: per
        # block there would be too few of them to outweigh the cost of each tensor operation.
        rest = torch.cat(rest)
        if rest.numel() and lm_iterations > first:
            x[rest], sse[rest], *_, going = self.lm(
                x[rest], y_w[rest], lm_iterations - first, e=e[rest], lam=lam[rest]
            )
            rest = rest[going]
        return x, sse, rest

    def grid_start(self, y_w: torch.Tensor):
        """Start of the polish: the grid's best beta, refined, with its linear solution.

        The best beta of the grid is refined to the vertex of the parabola through its gain
        and its neighbours' (in log beta), and the linear problem is solved exactly at the
        refined beta, with the bounds of k2 and k3 (:meth:`_cone_lsq`); only K1 may need
        clipping after that.

        Returns
        -------
        params : torch.Tensor, shape [n, 4]
            (K1, k2, k3, Vb) inside the bounds.
        e : torch.Tensor, shape [n, F]
            Weighted E at ``beta``, exact.
        beta : torch.Tensor, shape [n]
            The refined beta (k2 + k3 of ``params`` up to round-off).
        """
        yy = (y_w * y_w).sum(1)
        blocks = zip(y_w.split(_GRID_BLOCK), yy.split(_GRID_BLOCK), strict=True)
        beta = torch.exp(torch.cat([self._grid_search(b, b_yy) for b, b_yy in blocks]))
        e = self._exact_e(beta)
        c1, c2, c3 = y_w @ self.i_w, (y_w * e).sum(1), y_w @ self.a_w
        ie, ee, ea = e @ self.i_w, (e * e).sum(1), e @ self.a_w
        _, p = self._cone_lsq(c1, c2, c3, yy, ie, ee, ea, beta)
        return self._to_params(p, beta), e, beta

    def _grid_search(self, y_w, yy):
        """The refined log beta [n] of the grid's chosen beta (:meth:`_choose_minimum`,
        :meth:`_refine`); ``yy`` [n] is sum(y_w^2) per curve."""
        c1 = (y_w @ self.i_w)[:, None]
        c2 = y_w @ self.e_w.T  # [n, B]
        # Projections on the cone's edges W and U (:meth:`_cone_lsq`), per beta.
        c_w = torch.addcmul(c2 * (1 - self.rho_hi), c1, self.rho_hi)
        c_u = torch.addcmul(c2 * (1 - self.rho_lo), c1, self.rho_lo)
        gain = self._scan(c_w, c_u, y_w @ self.a_w)
        return self._refine(gain, self._choose_minimum(gain, yy))

    def _choose_minimum(self, gain, yy):
        """Index of the beta to polish: among tied local minima, the one nearest the start.

        The SSE profile over beta can have two local minima, typically one with slow
        exchange and one with k2 near its upper bound, where fast exchange mimics blood
        volume. When their SSEs differ by less than ``tie_tolerance`` x SSE the data cannot
        tell them apart, and the one nearest (in log beta) to the paper's start
        k2 + k3 = 0.11 /min is taken: the minimum that the paper's curve_fit, started there,
        usually descends into (on benchmarks/fitting.py, 9 of the 9 such curves in 1,000).
        There, the median errors against the truth then match curve_fit's, where the
        lowest SSE alone exceeds them by up to 6 % (noise CV 10-20 %). Otherwise, and
        always where ``tie_tolerance`` is 0, the best beta of the grid is taken.
        """
        best = gain.argmax(1)
        if self.tie_tolerance <= 0 or gain.shape[1] < 3:
            return best
        top = gain.gather(1, best[:, None])
        rising = gain[:, 1:] > gain[:, :-1]
        # Interior minima only: the grid's ends lie on bounds of k2 and k3, where the
        # grid's scan (which leaves out some faces of the bounds) can show a minimum that
        # the full problem does not have.
        peak = torch.zeros_like(gain, dtype=torch.bool)
        peak[:, 1:-1] = rising[:, :-1] & ~rising[:, 1:]
        tied = peak & (gain >= top - self.tie_tolerance * (yy[:, None] - top))
        tied.scatter_(1, best[:, None], True)
        return torch.where(tied, self._start_distance, math.inf).argmin(1)

    def _refine(self, gain, best):
        """Vertex (log beta) of the parabola through the best gain and its two neighbours.

        Near its maximum the gain is smooth in log beta, so the vertex lands much closer to
        the optimum than the grid spacing; it is kept between the two neighbours. Where the
        three gains are not concave (or not finite) the grid's beta is returned.
        """
        lb = self._log_grid
        if lb.numel() < 3:
            return lb[best]
        mid = best.clamp(1, lb.numel() - 2)
        idx = torch.stack([mid - 1, mid, mid + 1], dim=1)
        g0, g1, g2 = gain.gather(1, idx).unbind(1)
        x0, x1, x2 = lb[idx].unbind(1)
        a = (x1 - x0) * (g1 - g2)
        b = (x2 - x1) * (g1 - g0)
        den = a + b  # > 0 exactly when the parabola is concave
        vertex = x1 - 0.5 * ((x1 - x0) * a - (x2 - x1) * b) / den
        ok = (den > 0) & torch.isfinite(vertex)
        vertex = torch.minimum(torch.maximum(vertex, x0), x2)
        return torch.where(ok, vertex, lb[best])

    def _scan(self, c_w, c_u, c3):
        """How much each beta lowers the SSE (higher is better), shape [n, B].

        The problem of :meth:`_cone_lsq` (in the weights of W and U, see there), but only on
        the faces with U's weight free and Vb at its lower bound or free, and written as
        the gain yy - SSE with coefficients precomputed per beta: this is the hot loop of
        the grid. ``c_w``, ``c_u`` [n, B] and ``c3`` [n] are the projections of y on W, U
        and A.
        """
        k = self._scan_coef
        v, lo3, hi3 = self.vb_lo, self.vb_lo, self.vb_hi
        neg_inf = torch.tensor(-math.inf, dtype=c_u.dtype, device=c_u.device)
        c3 = c3[:, None]
        # Faces with p3 = v: fit y - v A; the gain is counted against yy, so that
        # SSE = yy - gain on every face (the -2 v c3 + v^2 aa term is the same for all beta).
        c1v, c2v = (c_w - v * k["wa"], c_u - v * k["ua"]) if v else (c_w, c_u)
        offset = (2 * v * c3 - v * v * self.aa) if v else 0.0
        gain = torch.where(c2v >= 0, c2v * c2v * k["inv_uu"] + offset, neg_inf)  # U alone
        p1 = torch.addcmul(c1v * k["b_11"], c2v, k["b_12"])
        p2 = torch.addcmul(c2v * k["b_22"], c1v, k["b_12"])
        g = torch.addcmul(p1 * c1v, p2, c2v) + offset
        gain = torch.where((p1 >= 0) & (p2 >= 0) & (g > gain), g, gain)
        # W's weight 0: U and p3 free.
        p2 = torch.addcmul(c3 * k["c_23"], c_u, k["c_22"])
        p3 = torch.addcmul(c3 * k["c_33"], c_u, k["c_23"])
        g = torch.addcmul(p2 * c_u, p3, c3)
        gain = torch.where((p2 >= 0) & (p3 >= lo3) & (p3 <= hi3) & (g > gain), g, gain)
        # All three free.
        p1 = torch.addcmul(torch.addcmul(c3 * k["d_13"], c_w, k["d_11"]), c_u, k["d_12"])
        p2 = torch.addcmul(torch.addcmul(c3 * k["d_23"], c_w, k["d_12"]), c_u, k["d_22"])
        p3 = torch.addcmul(torch.addcmul(c3 * k["d_33"], c_w, k["d_13"]), c_u, k["d_23"])
        g = torch.addcmul(torch.addcmul(p1 * c_w, p2, c_u), p3, c3)
        ok = (p1 >= 0) & (p2 >= 0) & (p3 >= lo3) & (p3 <= hi3)
        return torch.where(ok & (g > gain), g, gain)

    def _scan_coefficients(self):
        """Per-beta coefficients of the face solutions used by :meth:`_scan`.

        A face whose Gram matrix is (nearly) singular, e.g. W = U where the bounds leave
        a single k3 for a beta, gets NaN coefficients: NaN compares false, so it is never
        feasible.
        """
        aa = self.aa
        ww, wu, uu, wa, ua = _cone_gram(
            self.ii, self.ie, self.ee, self.ia, self.ea, self.rho_lo, self.rho_hi
        )
        det2 = _regular(ww * uu - wu * wu, ww * uu)  # W, U free
        det_c = _regular(uu * aa - ua * ua, uu * aa)  # U, p3 free
        m11, m22, m33 = uu * aa - ua * ua, ww * aa - wa * wa, ww * uu - wu * wu
        m12, m13, m23 = wa * ua - wu * aa, wu * ua - wa * uu, wu * wa - ww * ua
        det3 = _regular(ww * m11 + wu * m12 + wa * m13, ww * uu * aa)
        return {
            "wa": wa,
            "ua": ua,
            "inv_uu": 1.0 / uu,
            "b_11": uu / det2,
            "b_12": -wu / det2,
            "b_22": ww / det2,
            "c_22": aa / det_c,
            "c_23": -ua / det_c,
            "c_33": uu / det_c,
            "d_11": m11 / det3,
            "d_12": m12 / det3,
            "d_13": m13 / det3,
            "d_22": m22 / det3,
            "d_23": m23 / det3,
            "d_33": m33 / det3,
        }

    # -- the bounded linear step -----------------------------------------------------------------
    def _rho_bounds(self, beta):
        """Bounds [rho_lo, rho_hi] of k3 / beta that those of k2 and k3 allow at beta."""
        (lo2, lo3), (hi2, hi3) = self._lo[1:3], self._hi[1:3]
        rho_hi = torch.minimum(hi3 / beta, 1 - lo2 / beta).clamp(max=1.0)
        rho_lo = torch.maximum(lo3 / beta, 1 - hi2 / beta).clamp(min=0.0)
        return torch.minimum(rho_lo, rho_hi), rho_hi

    def _cone_lsq(self, c1, c2, c3, yy, ie, ee, ea, beta):
        """The linear problem at beta [n] with every bound but K1's; returns (SSE, p).

        k3 / beta = p1 / (p1 + p2) must lie in [rho_lo, rho_hi] (:meth:`_rho_bounds`): the
        (p1, p2) allowed form the cone spanned by (rho_hi, 1 - rho_hi) and
        (rho_lo, 1 - rho_lo). With nonnegative weights on its two edges, i.e. on the
        curves W = rho_hi I + (1 - rho_hi) E and U = rho_lo I + (1 - rho_lo) E, it is the
        box problem of :meth:`_bounded_lsq`. So k2 and k3 need no clipping afterwards.
        """
        rho_lo, rho_hi = self._rho_bounds(beta)
        ww, wu, uu, wa, ua = _cone_gram(self.ii, ie, ee, self.ia, ea, rho_lo, rho_hi)
        c_w = rho_hi * c1 + (1 - rho_hi) * c2
        c_u = rho_lo * c1 + (1 - rho_lo) * c2
        sse, (b, a, p3) = self._bounded_lsq(c_w, c_u, c3, yy, wu, uu, ua, ii=ww, ia=wa)
        return sse, (rho_hi * b + rho_lo * a, (1 - rho_hi) * b + (1 - rho_lo) * a, p3)

    def _bounded_lsq(self, c1, c2, c3, yy, ie, ee, ea, ii=None, ia=None):
        """min ||y - p1 I - p2 E - p3 A||^2 with p1, p2 >= 0 and vb_lo <= p3 <= vb_hi.

        Exact by enumeration of active sets: the problem is convex, so its solution is the
        unconstrained minimum on one face of the box, and it is the feasible face minimum
        with the smallest SSE. Inputs are the projections c = X^T y (broadcastable shapes);
        SSE is written as yy - p . c, valid at each face's own minimum.
        Returns the SSE and the solution (p1, p2, p3). ``ii`` and ``ia`` (default: those
        of I) allow another first curve than I (:meth:`_cone_lsq`); faces whose Gram
        matrix is (nearly) singular are skipped.
        """
        aa = self.aa
        ii = self.ii if ii is None else ii
        ia = self.ia if ia is None else ia
        inf = torch.tensor(math.inf, dtype=c2.dtype, device=c2.device)
        best = torch.full(
            torch.broadcast_shapes(c1.shape, c2.shape), math.inf, dtype=c2.dtype, device=c2.device
        )
        best_p = [torch.zeros_like(best) for _ in range(3)]
        zero = torch.zeros_like(best)

        def keep(sse, feasible, p1, p2, p3):
            nonlocal best
            sse = torch.where(feasible, sse, inf)
            better = sse < best
            best = torch.where(better, sse, best)
            for k, v in enumerate((p1, p2, p3)):
                best_p[k] = torch.where(better, v, best_p[k])

        vb_values = [self.vb_lo] if self.vb_hi == self.vb_lo else [self.vb_lo, self.vb_hi]
        for v in vb_values:
            # p3 fixed at a bound: fit y - v A.
            c1v, c2v = c1 - v * ia, c2 - v * ea
            yyv = yy - 2 * v * c3 + v * v * aa
            p3 = zero + v
            # p2 alone (p1 = 0)
            p2 = c2v / ee
            keep(yyv - p2 * c2v, p2 >= 0, zero, p2, p3)
            # p1 and p2
            det = _regular(ii * ee - ie * ie, ii * ee)
            p1 = (ee * c1v - ie * c2v) / det
            p2 = (ii * c2v - ie * c1v) / det
            keep(yyv - p1 * c1v - p2 * c2v, (p1 >= 0) & (p2 >= 0), p1, p2, p3)
            # p2 = 0: nothing, or p1 alone
            keep(yyv + zero, torch.ones_like(best, dtype=torch.bool), zero, zero, p3)
            p1 = c1v / ii
            keep(yyv - p1 * c1v, p1 >= 0, p1, zero, p3)
        # p3 free, p1 = 0: p2 and p3
        det = _regular(ee * aa - ea * ea, ee * aa)
        p2 = (aa * c2 - ea * c3) / det
        p3 = (ee * c3 - ea * c2) / det
        keep(
            yy - p2 * c2 - p3 * c3,
            (p2 >= 0) & (p3 >= self.vb_lo) & (p3 <= self.vb_hi),
            zero,
            p2,
            p3,
        )
        # all three free: Cramer's rule on the 3x3 Gram matrix [[ii, ie, ia], [ie, ee, ea],
        # [ia, ea, aa]] (cofactors are per beta, cheap).
        m11, m22, m33 = ee * aa - ea * ea, ii * aa - ia * ia, ii * ee - ie * ie
        m12, m13, m23 = ia * ea - ie * aa, ie * ea - ia * ee, ie * ia - ii * ea
        det = _regular(ii * m11 + ie * m12 + ia * m13, ii * ee * aa)
        p1 = (m11 * c1 + m12 * c2 + m13 * c3) / det
        p2 = (m12 * c1 + m22 * c2 + m23 * c3) / det
        p3 = (m13 * c1 + m23 * c2 + m33 * c3) / det
        keep(
            yy - p1 * c1 - p2 * c2 - p3 * c3,
            (p1 >= 0) & (p2 >= 0) & (p3 >= self.vb_lo) & (p3 <= self.vb_hi),
            p1,
            p2,
            p3,
        )
        # p2 = 0, p3 free: p3 alone, and p1 with p3.
        p3 = c3 / aa
        keep(yy - p3 * c3, (p3 >= self.vb_lo) & (p3 <= self.vb_hi), zero, zero, p3)
        det = _regular(ii * aa - ia * ia, ii * aa)
        p1 = (aa * c1 - ia * c3) / det
        p3 = (ii * c3 - ia * c1) / det
        keep(
            yy - p1 * c1 - p3 * c3,
            (p1 >= 0) & (p3 >= self.vb_lo) & (p3 <= self.vb_hi),
            p1,
            zero,
            p3,
        )
        return best, best_p

    def _to_params(self, p, beta):
        """(p1, p2, p3) at beta -> (K1, k2, k3, Vb), clipped into the bounds."""
        p1, p2, p3 = p
        s = p1 + p2
        tissue = s > 0
        safe = torch.where(tissue, s, torch.ones_like(s))
        k1 = s / (1 - p3)
        # No tissue term: k2 and k3 are arbitrary; split beta evenly.
        k3 = torch.where(tissue, beta * p1 / safe, beta / 2)
        k2 = torch.where(tissue, beta * p2 / safe, beta / 2)
        return self._clip(torch.stack([k1, k2, k3, p3], dim=1))

    # -- Levenberg-Marquardt on the exact model -----------------------------------------------
    def _exact_e(self, beta):
        """Weighted E_beta [n, F] from the exact model at any beta [n]."""
        unit = torch.zeros(beta.shape[0], 4, dtype=beta.dtype, device=beta.device)
        unit[:, 0], unit[:, 1] = 1.0, beta
        return self.model(unit) * self.sqrt_w

    def _e_derivatives(self, beta, out):
        """dE/dbeta and d2E/dbeta2 (weighted) at beta [n], written to out [n, 2, F].

        Interpolated linearly in log beta from a table of central differences of the exact
        E, in steps of 1 % over the betas the bounds allow (interpolation error ~1e-5
        relative). They only steer the steps (gradient direction and curvature); the
        residuals, and so the solution, use the exact model.
        """
        if self._de_table is None:
            b_lo = min(self._lo[1] + self._lo[2], float(self.betas.min()))
            b_hi = max(self._hi[1] + self._hi[2], float(self.betas.max()))
            count = max(2, math.ceil(math.log(b_hi / b_lo) / _TABLE_STEP) + 1)
            nodes = torch.as_tensor(np.geomspace(b_lo, b_hi, count), device=self.device)
            h = nodes * _FD_REL_STEP
            e_m, e_0, e_p = (self._exact_e(nodes + k * h) for k in (-1, 0, 1))
            d1 = (e_p - e_m) / (2 * h[:, None])
            d2 = (e_p - 2 * e_0 + e_m) / (h * h)[:, None]
            self._de_table = torch.stack([d1, d2], dim=1)  # [nodes, 2, F]
            self._log_nodes = torch.log(nodes)
        log_nodes = self._log_nodes
        lb = torch.log(beta).clamp(float(log_nodes[0]), float(log_nodes[-1]))
        hi = torch.searchsorted(log_nodes, lb).clamp(1, log_nodes.numel() - 1)
        t = (lb - log_nodes[hi - 1]) / (log_nodes[hi] - log_nodes[hi - 1])
        torch.lerp(self._de_table[hi - 1], self._de_table[hi], t[:, None, None], out=out)

    def _model_from_e(self, x, e):
        """Weighted model [n, F] from x [n, 4] and its weighted E [n, F]."""
        k1, k2, k3, vb = x.unbind(1)
        scale = (1 - vb) * k1 / (k2 + k3)
        shared = torch.stack([scale * k3, vb], dim=1) @ self._ia_rows  # the I and A terms
        return torch.addcmul(shared, e, (scale * k2)[:, None])

    def _newton_system(self, x, e, r):
        """Hessian of SSE / 2 [n, 4, 4] and J^T r [n, 4] at x, from Gram matrices.

        The model is C = c_I I + c_A A + c_E E(beta) with c_I = u q, c_E = u (1 - q),
        c_A = Vb, where u = (1 - Vb) K1, q = k3 / beta and beta = k2 + k3. So every
        first and second derivative of C is a combination of five curves, I, A, E,
        D = dE/dbeta and D2 = d2E/dbeta2, with small per-curve coefficients:

            J = M V (V the [5, F] curves, M [n, 4, 5]),  J^T J = M (V V^T) M^T,
            J^T r = M (V r),  sum_f r_f Hess(C_f) = sum_b (V r)_b Hess(c_b).

        One batched product of the curves (and r) with themselves gives every inner
        product, instead of building a [n, 4, F] Jacobian. The full Hessian
        J^T J - sum r Hess(C) (not Gauss-Newton's J^T J) matters: with noisy curves the
        second term is large along the flat valleys of the SSE, and Gauss-Newton steps
        overshoot there and zig-zag for many iterations.
        """
        n, n_frames = e.shape
        k1, k2, k3, vb = x.unbind(1)
        beta = k2 + k3
        curves = torch.empty(n, 6, n_frames, dtype=x.dtype, device=x.device)
        curves[:, 0] = self.i_w
        curves[:, 1] = self.a_w
        curves[:, 2] = e
        self._e_derivatives(beta, out=curves[:, 3:5])
        curves[:, 5] = r
        gram = curves @ curves.transpose(1, 2)  # [n, 6, 6]; its last row holds V r
        q = k3 / beta
        u = (1 - vb) * k1
        zero, one = torch.zeros_like(k1), torch.ones_like(k1)
        grad_u = torch.stack([1 - vb, zero, zero, -k1], dim=1)
        grad_q = torch.stack([zero, -q / beta, (1 - q) / beta, zero], dim=1)
        grad_beta = torch.stack([zero, one, one, zero], dim=1)
        grad_ce = (1 - q)[:, None] * grad_u - u[:, None] * grad_q
        c_e = u * (1 - q)
        # M: row j holds dC/dx_j on the curves (I, A, E, D, D2).
        m = torch.stack(
            [
                q[:, None] * grad_u + u[:, None] * grad_q,  # on I
                torch.stack([zero, zero, zero, one], dim=1),  # on A
                grad_ce,  # on E
                c_e[:, None] * grad_beta,  # on D
                torch.zeros_like(grad_u),  # on D2
            ],
            dim=2,
        )
        jtj = m @ gram[:, :5, :5] @ m.transpose(1, 2)
        vr = gram[:, 5, :5]
        g = (m @ vr[:, :, None])[:, :, 0]
        # sum_b (V r)_b Hess(c_b), from Hess(u) (only d2u/dK1 dVb = -1), Hess(q) (on k2, k3)
        # and Hess(c_I) = q Hess(u) + u Hess(q) + sym(grad u, grad q), Hess(c_E) likewise.
        r_i, r_e, r_d, r_d2 = vr[:, 0], vr[:, 2], vr[:, 3], vr[:, 4]
        b3 = beta**3
        hess_q = torch.zeros(n, 4, 4, dtype=x.dtype, device=x.device)
        hess_q[:, 1, 1] = 2 * k3 / b3
        hess_q[:, 1, 2] = hess_q[:, 2, 1] = (k3 - k2) / b3
        hess_q[:, 2, 2] = -2 * k2 / b3
        sym_uq = _outer(grad_u, grad_q) + _outer(grad_q, grad_u)
        s = (r_i - r_e)[:, None, None] * (sym_uq + u[:, None, None] * hess_q)
        s += r_d[:, None, None] * (_outer(grad_ce, grad_beta) + _outer(grad_beta, grad_ce))
        s += (r_d2 * c_e)[:, None, None] * _outer(grad_beta, grad_beta)
        k_uu = -(r_i * q + r_e * (1 - q))  # coefficient of Hess(u): entries (K1, Vb)
        s[:, 0, 3] += k_uu
        s[:, 3, 0] += k_uu
        return jtj - s, g, jtj

    def polish(self, x, y_w, iterations=_LM_ITERATIONS, e=None, beta_e=None):
        """Projected Levenberg-Marquardt for all curves together; returns (params, SSE).

        See :meth:`lm`, which also returns the state to go on from.
        """
        x, sse, *_ = self.lm(x, y_w, iterations, e=e, beta_e=beta_e)
        return x, sse

    def lm(self, x, y_w, iterations, e=None, beta_e=None, lam=None):
        """Projected Levenberg-Marquardt for all curves together.

        Each step solves (H + lambda diag(H)) d = J^T r on the free parameters (a
        parameter at a bound whose gradient, or whose step, points outward is held), with
        H the full Hessian of SSE / 2 where it is positive definite (else Gauss-Newton's
        J^T J), projects x + d onto the bounds and keeps it only if it lowers the SSE.
        A curve stops when the step's predicted decrease of the SSE is below ``_LM_RTOL``
        of it (checked before the trial point is evaluated), or when a kept step lowered
        the SSE by less than that. One exact model evaluation per trial; the curves still
        active are gathered each step, so converged curves cost nothing further.

        ``e`` (weighted E at ``beta_e``, e.g. from :meth:`grid_start`; default k2 + k3 of
        ``x``) saves evaluating E at the start where ``beta_e`` equals k2 + k3 of ``x``;
        ``lam`` [n] continues with the damping of an earlier call.

        Returns
        -------
        x, sse, e, lam : torch.Tensor
            Parameters [n, 4], weighted SSE [n], weighted E [n, F] and damping [n].
        active : torch.Tensor
            Indices of the curves that had not converged when the iterations ran out.
        """
        x = x.clone()
        n = x.shape[0]
        beta = x[:, 1] + x[:, 2]
        if e is None:
            e = self._exact_e(beta)
        else:
            e = e.clone()
            beta_e = beta if beta_e is None else beta_e
            # k2 + k3 differs from the beta it was mapped from by round-off: no reason.
            stale = torch.nonzero((beta - beta_e).abs() > 1e-12 * beta_e)[:, 0]
            if stale.numel():
                e[stale] = self._exact_e(beta[stale])
        r = y_w - self._model_from_e(x, e)
        sse = (r * r).sum(1)
        if lam is None:
            lam = torch.full((n,), 1e-3, dtype=x.dtype, device=x.device)
        else:
            lam = lam.clone()
        active = torch.nonzero(sse > 0)[:, 0]
        for _ in range(iterations):
            if active.numel() == 0:
                break
            if active.numel() == n:  # every curve: no gathering needed
                xa, ea, ra, sse_a, lam_a = x, e, r, sse, lam
            else:
                xa, ea, ra, sse_a, lam_a = x[active], e[active], r[active], sse[active], lam[active]
            hess, g, jtj = self._newton_system(xa, ea, ra)
            at_lo, at_hi = xa <= self.lo, xa >= self.hi
            held = (at_lo & (g < 0)) | (at_hi & (g > 0))
            step, used = self._damped_step(hess, jtj, g, held, lam_a)
            # A parameter on a bound that the step would push outward is held as well
            # (once more): the projection would cut its move, which the others assume.
            out = held | (at_lo & (step < 0)) | (at_hi & (step > 0))
            if (out != held).any():
                step, used = self._damped_step(hess, jtj, g, out, lam_a)
            # Decrease of the SSE that the quadratic model predicts: 2 d.g - d.H.d.
            pred = (step * (2 * g - (used @ step[:, :, None])[:, :, 0])).sum(1)
            # A heavily damped step predicts little even far from the minimum: try it.
            go = torch.nonzero((pred > _LM_RTOL * sse_a) | (lam_a > 1.0))[:, 0]
            active = active[go]
            if go.numel() < xa.shape[0]:
                xa, ea, ra, step, g = xa[go], ea[go], ra[go], step[go], g[go]
                sse_a, lam_a = sse_a[go], lam_a[go]
            # Shortened to stop at the first bound it meets: that parameter lands on its
            # bound (and is held there next time if its gradient points out). Clipping each
            # parameter instead bends the step out of its direction, and such steps were
            # often rejected, so that curves with an optimum on a bound took many steps.
            step = step * self._step_to_bounds(xa, step)[:, None]
            trial, e_t, r_t, sse_t = self._trial(xa + step, y_w[active])
            accept = sse_t < sse_a
            small = (sse_a - sse_t) <= _LM_RTOL * sse_a
            # (Before the updates below: xa, sse_a, ... may be views of x, sse, ...)
            done = (accept & small) | (lam_a > 1e10) | (sse_t == 0)
            acc = accept[:, None]
            x[active] = torch.where(acc, trial, xa)
            e[active] = torch.where(acc, e_t, ea)
            r[active] = torch.where(acc, r_t, ra)
            sse[active] = torch.where(accept, sse_t, sse_a)
            lam[active] = torch.where(accept, lam_a / 10, lam_a * 10)
            active = active[~done]
        return x, sse, e, lam, active

    def _step_to_bounds(self, x, step):
        """The largest t <= 1 that keeps x + t step inside the bounds, per curve [n].

        Parameters already on the bound that the step points out of are left out (their
        move is clipped away instead): they would allow no step at all.
        """
        room = torch.where(step > 0, self.hi - x, self.lo - x)
        t = torch.where((step != 0) & (room != 0), room / step, torch.ones_like(step))
        return t.amin(1).clamp(0.0, 1.0)

    def _trial(self, x, y_w):
        """x clipped into the bounds, its exact weighted E, residuals and SSE."""
        x = self._clip(x)
        e = self._exact_e(x[:, 1] + x[:, 2])
        r = y_w - self._model_from_e(x, e)
        return x, e, r, (r * r).sum(1)

    @staticmethod
    def _damped_step(hess, jtj, g, held, lam):
        """The damped step [n, 4] on the parameters not held, and the matrix it used.

        The full Hessian where its damped free block is positive definite (Cholesky
        succeeds), else J^T J. Held parameters get a unit diagonal and so a zero step; a
        tiny floor keeps the matrix regular where a column of J vanishes.
        """
        free = (~held).to(g.dtype)
        rhs = (g * free)[:, :, None]

        def damped(a, free, lam):
            a = a * (free[:, :, None] * free[:, None, :])
            diag = torch.diagonal(a, dim1=1, dim2=2)
            damp = lam[:, None] * diag + (1 - free) + 1e-12 * diag.abs().amax(1, keepdim=True)
            return a, a + torch.diag_embed(damp)

        used, a = damped(hess, free, lam)
        chol, info = torch.linalg.cholesky_ex(a)
        step = torch.cholesky_solve(rhs, chol)[:, :, 0]
        bad = torch.nonzero(info != 0)[:, 0]
        if bad.numel():
            gn, a_gn = damped(jtj[bad], free[bad], lam[bad])
            used = used.index_copy(0, bad, gn)
            step = step.index_copy(0, bad, torch.linalg.solve(a_gn, rhs[bad])[:, :, 0])
        return step, used

    def _clip(self, x):
        """Clip [n, 4] parameters into the bounds, and onto a bound within round-off of it.

        A value a few ulps inside a bound (k3 = beta rho_lo from :meth:`_cone_lsq`) would
        not count as on the bound, so the LM step would not hold it there.
        """
        cols = []
        for c, lo, hi in zip(x.unbind(1), self._lo, self._hi, strict=True):
            tol = 1e-12 * max(hi - lo, 1e-12)
            c = c.clamp(lo, hi)
            cols.append(torch.where(c <= lo + tol, lo, torch.where(c >= hi - tol, hi, c)))
        return torch.stack(cols, dim=1)


def _outer(a, b):
    """Batched outer product of [n, k] and [n, k]: [n, k, k]."""
    return a[:, :, None] * b[:, None, :]


def _regular(det, scale):
    """``det`` where it is clearly nonzero against ``scale`` (a product of the Gram
    matrix's diagonal), else NaN: solutions of a (nearly) singular face come out NaN and
    so infeasible, instead of huge numbers that might pass the sign checks."""
    return torch.where(det > 1e-12 * scale, det, torch.full_like(det, math.nan))


def _cone_gram(ii, ie, ee, ia, ea, rho_lo, rho_hi):
    """Inner products of W = rho_hi I + (1 - rho_hi) E, U = rho_lo I + (1 - rho_lo) E and A.

    Returns (W.W, W.U, U.U, W.A, U.A) from those of I, E and A.
    """

    def dot(r, s):
        return r * s * ii + (r * (1 - s) + s * (1 - r)) * ie + (1 - r) * (1 - s) * ee

    return (
        dot(rho_hi, rho_hi),
        dot(rho_hi, rho_lo),
        dot(rho_lo, rho_lo),
        rho_hi * ia + (1 - rho_hi) * ea,
        rho_lo * ia + (1 - rho_lo) * ea,
    )
