"""Fitting the irreversible two-tissue model to many time-activity curves at once.

One entry point, :func:`fit`, with two methods (DESIGN.md section 4):

``curve_fit``
    The paper's reference: :func:`scipy.optimize.curve_fit` one curve at a time, start
    p0 = (0.1, 0.1, 0.01, 0.01), the paper's bounds, ``diff_step=0.001``. Slow but
    faithful; ``n_jobs`` spreads curves over processes.
``fast``
    A global fitter for many curves. For a fixed beta = k2 + k3 the model is linear in
    three coefficients, ``y = p1 I + p2 E_beta + p3 A`` (I the integral of the input,
    E_beta its convolution with exp(-beta t), A the input; all sampled like the model),
    with p1 = (1 - Vb) K1 k3 / beta, p2 = (1 - Vb) K1 k2 / beta, p3 = Vb. On a grid of
    beta values the bounded linear least-squares problem (p1, p2 >= 0, Vb bounds on p3)
    is solved exactly for all curves with matrix products, the best beta per curve is
    kept and mapped back to (K1, k2, k3, Vb) inside the bounds, and all curves are then
    polished together with projected Levenberg-Marquardt on the exact model (float64).
    A grid search cannot fall into the local minima that a single start can.

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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import PAPER_LOWER, PAPER_UPPER, PARAMETER_NAMES, KineticModel

METHODS = ("fast", "curve_fit")
WEIGHT_SCHEMES = ("none", "duration", "duration_decay")
F18_HALF_LIFE_MIN = 109.771
F18_LAMBDA_PER_MIN = math.log(2.0) / F18_HALF_LIFE_MIN
# The paper's curve_fit start (reference/fdg_values.md).
PAPER_P0 = (0.1, 0.1, 0.01, 0.01)
# Four parameters need at least four informative frames.
MIN_POSITIVE_FRAMES = 4

# Status codes of FitResult.status.
STATUS_OK = 0
STATUS_NONFINITE = 1
STATUS_ALL_ZERO = 2
STATUS_TOO_FEW_POSITIVE = 3
STATUS_FAILED = 4
STATUS_NAMES = ("ok", "non-finite values", "all zero", "too few positive frames", "fit failed")

# (min, max, count), log-spaced, 1/min. 100 values (steps of 5.5 %) give, after the polish,
# the same SSE as 200 on benchmarks/fitting.py at half the grid's cost.
DEFAULT_BETA_GRID = (0.02, 4.0, 100)
DEFAULT_CHUNK = 65536  # curves per chunk of the fast fitter (~0.1 GB of working memory)
_SCREEN_BLOCK = 65536
_GRID_BLOCK = 512  # curves per block of the grid step: its [block, beta] arrays stay in cache
_LM_BLOCK = 4096  # curves per block of the Levenberg-Marquardt polish
# Up to 8 steps (converged curves drop out earlier): on 1000 noisy benchmark curves 99.8 %
# end within 0.1 % of curve_fit's SSE (99.2 % after 4 steps); the rest are optima on a
# bound of K1, reached only after the grid's start was clipped, which take more steps.
_LM_ITERATIONS = 8
_LM_RTOL = 1e-9  # converged when an accepted step lowers the SSE by less than this, relatively
_FD_REL_STEP = 1e-6  # relative step of the forward difference dE/dbeta (float64)


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
) -> FitResult:
    """Fit the irreversible two-tissue model to many curves.

    Parameters
    ----------
    tacs : array_like, shape [N, n_frames] (or [n_frames] for one curve)
        Decay-corrected frame values, in the same concentration unit as the input
        function. float32 is fine: chunks are converted to float64 one at a time.
    input_function : InputFunction
    frames : FrameSchedule
    method : {"fast", "curve_fit"}
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
        ``fast`` only: at most this many Levenberg-Marquardt steps.

    Returns
    -------
    FitResult
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
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
    status = screen_curves(y)
    params = np.full((y.shape[0], 4), np.nan)
    sse = np.full(y.shape[0], np.nan)
    good = np.flatnonzero(status == STATUS_OK)
    if good.size:
        if method == "fast":
            fitter = FastFitter(model, w, lo, hi, beta_grid=beta_grid, device=device)
            for start in range(0, good.size, chunk_size):
                idx = good[start : start + chunk_size]
                params[idx], sse[idx] = fitter.fit(y[idx], lm_iterations=lm_iterations)
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
    """

    def __init__(self, model: KineticModel, w, lo, hi, beta_grid=DEFAULT_BETA_GRID, device=None):
        self.model = model
        self.device = torch.device(device) if device is not None else _default_device()
        dd = {"device": self.device, "dtype": torch.float64}
        self.sqrt_w = torch.as_tensor(np.sqrt(w), **dd)
        self.lo = torch.as_tensor(lo, **dd)
        self.hi = torch.as_tensor(hi, **dd)
        betas = beta_values(beta_grid)
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
        self._de_grid = None
        self._lo, self._hi = [float(v) for v in lo], [float(v) for v in hi]
        self._scan_coef = self._scan_coefficients()
        self.vb_hi = float(hi[3])

    # -- public ---------------------------------------------------------------------------------
    def fit(self, tacs: np.ndarray, lm_iterations: int = _LM_ITERATIONS):
        """Fit one chunk of valid curves; returns params [n, 4] and weighted SSE [n] (numpy)."""
        y = torch.as_tensor(np.asarray(tacs), device=self.device).to(torch.float64)
        y_w = y * self.sqrt_w
        # Blocks small enough for the cache: the work is memory-bound, not arithmetic.
        params, sse = [], []
        for block in y_w.split(_LM_BLOCK):
            start = torch.cat([self.grid_start(b) for b in block.split(_GRID_BLOCK)])
            x, s = self.polish(start, block, lm_iterations)
            params.append(x)
            sse.append(s)
        return torch.cat(params).cpu().numpy(), torch.cat(sse).cpu().numpy()

    def grid_start(self, y_w: torch.Tensor) -> torch.Tensor:
        """Best (K1, k2, k3, Vb) on the beta grid, mapped into the bounds; shape [n, 4]."""
        c1 = y_w @ self.i_w
        c3 = y_w @ self.a_w
        yy = (y_w * y_w).sum(1)
        c2 = y_w @ self.e_w.T  # [n, B]
        best = self._scan(c1, c2, c3).argmax(1)
        # Then, at the chosen beta only, every combination (p2 = 0 as well) with its solution.
        _, p = self._bounded_lsq(
            c1,
            c2.gather(1, best[:, None])[:, 0],
            c3,
            yy,
            self.ie[best],
            self.ee[best],
            self.ea[best],
        )
        return self._to_params(p, self.betas[best])

    def _scan(self, c1, c2, c3):
        """How much each beta lowers the SSE (higher is better), shape [n, B].

        The same bounded problem as :meth:`_bounded_lsq`, but only on the faces with p2 free
        and Vb at its lower bound or free (those depend on beta), and written as the gain
        yy - SSE with coefficients precomputed per beta: this is the hot loop of the grid.
        """
        k = self._scan_coef
        v, lo3, hi3 = self.vb_lo, self.vb_lo, self.vb_hi
        neg_inf = torch.tensor(-math.inf, dtype=c2.dtype, device=c2.device)
        c1, c3 = c1[:, None], c3[:, None]
        # Faces with p3 = v: fit y - v A; the gain is counted against yy, so that
        # SSE = yy - gain on every face (the -2 v c3 + v^2 aa term is the same for all beta).
        c1v, c2v = (c1 - v * self.ia, c2 - v * self.ea) if v else (c1, c2)
        offset = (2 * v * c3 - v * v * self.aa) if v else 0.0
        gain = torch.where(c2v >= 0, c2v * c2v * k["inv_ee"] + offset, neg_inf)  # p2 alone
        p1 = torch.addcmul(c1v * k["b_11"], c2v, k["b_12"])
        p2 = torch.addcmul(c2v * k["b_22"], c1v, k["b_12"])
        g = torch.addcmul(p1 * c1v, p2, c2v) + offset
        gain = torch.where((p1 >= 0) & (p2 >= 0) & (g > gain), g, gain)
        # p1 = 0, p2 and p3 free.
        p2 = torch.addcmul(c3 * k["c_23"], c2, k["c_22"])
        p3 = torch.addcmul(c3 * k["c_33"], c2, k["c_23"])
        g = torch.addcmul(p2 * c2, p3, c3)
        gain = torch.where((p2 >= 0) & (p3 >= lo3) & (p3 <= hi3) & (g > gain), g, gain)
        # All three free.
        n13 = torch.cat([c1, c3], dim=1)
        p1 = torch.addcmul(n13 @ k["d_1"], c2, k["d_12"])
        p2 = torch.addcmul(n13 @ k["d_2"], c2, k["d_22"])
        p3 = torch.addcmul(n13 @ k["d_3"], c2, k["d_23"])
        g = torch.addcmul(torch.addcmul(p1 * c1, p2, c2), p3, c3)
        ok = (p1 >= 0) & (p2 >= 0) & (p3 >= lo3) & (p3 <= hi3)
        return torch.where(ok & (g > gain), g, gain)

    def _scan_coefficients(self):
        """Per-beta coefficients of the face solutions used by :meth:`_scan`."""
        ii, aa, ia, ie, ee, ea = self.ii, self.aa, self.ia, self.ie, self.ee, self.ea
        det2 = ii * ee - ie * ie  # p1, p2 free
        det_c = ee * aa - ea * ea  # p2, p3 free
        m11, m22, m33 = ee * aa - ea * ea, ii * aa - ia * ia, ii * ee - ie * ie
        m12, m13, m23 = ia * ea - ie * aa, ie * ea - ia * ee, ie * ia - ii * ea
        det3 = ii * m11 + ie * m12 + ia * m13
        return {
            "inv_ee": 1.0 / ee,
            "b_11": ee / det2,
            "b_12": -ie / det2,
            "b_22": ii / det2,
            "c_22": aa / det_c,
            "c_23": -ea / det_c,
            "c_33": ee / det_c,
            "d_1": torch.stack([m11, m13]) / det3,  # [2, B]: weights of (c1, c3)
            "d_2": torch.stack([m12, m23]) / det3,
            "d_3": torch.stack([m13, m33]) / det3,
            "d_12": m12 / det3,
            "d_22": m22 / det3,
            "d_23": m23 / det3,
        }

    # -- the bounded linear step -----------------------------------------------------------------
    def _bounded_lsq(self, c1, c2, c3, yy, ie, ee, ea):
        """min ||y - p1 I - p2 E - p3 A||^2 with p1, p2 >= 0 and vb_lo <= p3 <= vb_hi.

        Exact by enumeration of active sets: the problem is convex, so its solution is the
        unconstrained minimum on one face of the box, and it is the feasible face minimum
        with the smallest SSE. Inputs are the projections c = X^T y (broadcastable shapes);
        SSE is written as yy - p . c, valid at each face's own minimum.
        Returns the SSE and the solution (p1, p2, p3).
        """
        ii, aa, ia = self.ii, self.aa, self.ia
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
            det = ii * ee - ie * ie
            p1 = (ee * c1v - ie * c2v) / det
            p2 = (ii * c2v - ie * c1v) / det
            keep(yyv - p1 * c1v - p2 * c2v, (p1 >= 0) & (p2 >= 0), p1, p2, p3)
            # p2 = 0: nothing, or p1 alone
            keep(yyv + zero, torch.ones_like(best, dtype=torch.bool), zero, zero, p3)
            p1 = c1v / ii
            keep(yyv - p1 * c1v, p1 >= 0, p1, zero, p3)
        # p3 free, p1 = 0: p2 and p3
        det = ee * aa - ea * ea
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
        det = ii * m11 + ie * m12 + ia * m13
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
        det = ii * aa - ia * ia
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

    def _de_dbeta(self, beta):
        """dE/dbeta [n, F], interpolated (linearly in log beta) from exact grid values.

        It only enters the Jacobian, which steers the steps; the residuals, and so the
        solution, use the exact model.
        """
        if self._de_grid is None:
            db = self.betas * _FD_REL_STEP
            self._de_grid = (self._exact_e(self.betas + db) - self.e_w) / db[:, None]
            self._log_betas = torch.log(self.betas)
            self._log_range = (float(self._log_betas[0]), float(self._log_betas[-1]))
        lb = torch.log(beta).clamp(self._log_range[0], self._log_range[1])
        hi = torch.searchsorted(self._log_betas, lb).clamp(1, self.betas.numel() - 1)
        t = (lb - self._log_betas[hi - 1]) / (self._log_betas[hi] - self._log_betas[hi - 1])
        lo_rows, hi_rows = self._de_grid[hi - 1], self._de_grid[hi]
        return torch.lerp(lo_rows, hi_rows, t[:, None])

    def _model_from_e(self, x, e):
        """Weighted model [n, F] and tissue curve per unit K1 (C_T / K1) from x and E."""
        k1, k2, k3, vb = x.unbind(1)
        beta = k2 + k3
        tissue = (k3[:, None] * self.i_w + k2[:, None] * e) / beta[:, None]
        f = ((1 - vb) * k1)[:, None] * tissue + vb[:, None] * self.a_w
        return f, tissue

    def _jacobian(self, x, e, tissue):
        """d model / d (K1, k2, k3, Vb), shape [n, 4, F] (weighted)."""
        k1, k2, k3, vb = x.unbind(1)
        inv_beta = (1.0 / (k2 + k3))[:, None]
        scale = ((1 - vb) * k1)[:, None]
        de = self._de_dbeta(k2 + k3).mul_(k2[:, None]).sub_(tissue)  # k2 dE/dbeta - C_T/K1
        jac = torch.empty(x.shape[0], 4, e.shape[1], dtype=x.dtype, device=x.device)
        torch.mul(tissue, (1 - vb)[:, None], out=jac[:, 0])
        torch.mul(e + de, scale * inv_beta, out=jac[:, 1])
        torch.mul(de.add_(self.i_w), scale * inv_beta, out=jac[:, 2])
        torch.sub(self.a_w, tissue * k1[:, None], out=jac[:, 3])
        return jac

    def polish(self, x, y_w, iterations=_LM_ITERATIONS):
        """Projected Levenberg-Marquardt for all curves together; returns (params, SSE).

        Each step solves (J^T J + lambda diag(J^T J)) d = J^T r on the free parameters
        (a parameter at a bound whose gradient points outward is held), projects x + d
        onto the bounds and is kept only if it lowers the SSE. One exact model evaluation
        per step: E at the trial point, which is reused when the step is kept. Curves that
        have converged drop out of the later iterations.
        """
        x = x.clone()
        n = x.shape[0]
        e = self._exact_e(x[:, 1] + x[:, 2])
        f, tissue = self._model_from_e(x, e)
        r = y_w - f
        sse = (r * r).sum(1)
        lam = torch.full((n,), 1e-3, dtype=x.dtype, device=x.device)
        active = None  # None: every curve (no gathering needed)
        for _ in range(iterations):
            if active is None:
                xa, ea, ra, ta, ya, sse_a, lam_a = x, e, r, tissue, y_w, sse, lam
            else:
                if active.numel() == 0:
                    break
                xa, ea, ra, ta = x[active], e[active], r[active], tissue[active]
                ya, sse_a, lam_a = y_w[active], sse[active], lam[active]
            jac = self._jacobian(xa, ea, ta)
            jtj = jac @ jac.transpose(1, 2)
            g = (jac @ ra[:, :, None])[:, :, 0]  # -1/2 gradient of the SSE
            held = ((xa <= self.lo) & (g < 0)) | ((xa >= self.hi) & (g > 0))
            free = (~held).to(x.dtype)
            diag = torch.diagonal(jtj, dim1=1, dim2=2)
            damp = lam_a[:, None] * diag * free + (1 - free) + 1e-12 * diag.amax(1, keepdim=True)
            a = jtj * (free[:, :, None] * free[:, None, :]) + torch.diag_embed(damp)
            step = torch.linalg.solve(a, (g * free)[:, :, None])[:, :, 0]
            trial = self._clip(xa + step)
            e_t = self._exact_e(trial[:, 1] + trial[:, 2])
            f_t, t_t = self._model_from_e(trial, e_t)
            r_t = ya - f_t
            sse_t = (r_t * r_t).sum(1)
            accept = sse_t < sse_a
            acc = accept[:, None]
            new = (
                torch.where(acc, trial, xa),
                torch.where(acc, e_t, ea),
                torch.where(acc, r_t, ra),
                torch.where(acc, t_t, ta),
                torch.where(accept, sse_t, sse_a),
                torch.where(accept, lam_a / 10, lam_a * 10),
            )
            if active is None:
                x, e, r, tissue, sse, lam = new
                active = torch.arange(n, device=x.device)
            else:
                for full, part in zip((x, e, r, tissue, sse, lam), new, strict=True):
                    full[active] = part
            small = (sse_a - sse_t) <= _LM_RTOL * sse_a
            done = (accept & small) | (lam_a > 1e10) | (sse_a == 0)
            active = active[~done]
        return x, sse

    def _clip(self, x):
        """Clip [n, 4] parameters into the bounds (column by column: scalar bounds are fast)."""
        cols = [c.clamp(lo, hi) for c, lo, hi in zip(x.unbind(1), self._lo, self._hi, strict=True)]
        return torch.stack(cols, dim=1)
