"""Fitting the reversible two-tissue model (K1, k2, k3, k4, Vb) to many curves.

Its impulse response has two rates, a1 <= a2 (:func:`kinpet.kinetics.reversible_rates`),

    C = Vb A + d1 E_a1 + d2 E_a2,   d1, d2 >= 0,

linear in (Vb, d1, d2) for given rates. Both methods start from a grid: every pair of
rates of :data:`RATE_GRID` (a1 = 0, the irreversible case, included), the bounded linear
least-squares problem solved for all curves at once on each pair (on every face of the
constraints Vb, d1, d2 >= 0, keeping the feasible minimum), the best pair mapped back to
(K1, k2, k3, k4, Vb) inside the bounds. ``fast`` then polishes all curves together with
projected Levenberg-Marquardt steps (forward-difference Jacobian, float64, per-curve
damping); ``curve_fit`` runs :func:`scipy.optimize.curve_fit` from that start, one curve
at a time (the reference).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from kinpet.curvefit import bounded_curve_fit
from kinpet.delayfit import DELAY_STEP_S, fit_with_delay
from kinpet.fitting import (
    STATUS_FAILED,
    STATUS_OK,
    FitResult,
    frame_weights,
    screen_curves,
)
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import KineticModel, _reversible_curves
from kinpet.models import check_fixed, get_model

# Rates of the grid start (1/min): 0 (irreversible), then log-spaced.
RATE_GRID = np.concatenate([[0.0], np.geomspace(1e-3, 5.0, 30)])
LM_ITERATIONS = 60
_CHUNK = 2048
_FACES = tuple(f for f in itertools.product((True, False), repeat=3) if any(f))


@dataclass
class ModelFitResult(FitResult):
    """A :class:`kinpet.fitting.FitResult` of another model: ``params`` [N, n] in the
    model's parameter order, ``ki`` NaN (not defined for the reversible model)."""

    model: str = "reversible_2tc"

    def as_dict(self) -> dict:
        """Columns of the model's parameters, (delay_s when fitted,) SSE, ok and status."""
        names = get_model(self.model).parameters
        out = {name: self.params[:, i] for i, name in enumerate(names)}
        if self.delay_s is not None:
            out["delay_s"] = self.delay_s
        out.update(SSE=self.sse, ok=self.ok, status=self.reasons())
        return out


def model_bounds(model, bounds=None, fixed=None) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of ``model``'s parameters, ``fixed`` ones at lower = upper."""
    lo, hi = (np.array(b, dtype=np.float64) for b in (bounds or (model.lower, model.upper)))
    n = len(model.parameters)
    if lo.shape != (n,) or hi.shape != (n,):
        raise ValueError(f"bounds of {model.name} must be (lower, upper), each {n} numbers")
    if (lo > hi).any() or (lo < 0).any():
        raise ValueError(f"bounds must satisfy 0 <= lower <= upper, got {lo} and {hi}")
    check_fixed(model, fixed)
    for name, value in (fixed or {}).items():
        lo[model.parameters.index(name)] = hi[model.parameters.index(name)] = float(value)
    hi[-1] = min(hi[-1], 1.0 - 1e-9)  # Vb < 1
    return lo, hi


def rates_to_parameters(a1, a2, vb, d1, d2):
    """(K1, k2, k3, k4, Vb) [N, 5] of the rates and linear coefficients of the curve."""
    k1 = (d1 + d2) / (1 - vb)
    with np.errstate(invalid="ignore", divide="ignore"):
        k34 = a1 + d1 * (a2 - a1) / (d1 + d2)
        k2 = a1 + a2 - k34
        k4 = a1 * a2 / k2
    return np.stack([k1, k2, k34 - k4, k4, vb], axis=-1)


def grid_start(y, model: KineticModel, w, lo, hi) -> np.ndarray:
    """Start parameters [N, 5]: the best pair of grid rates per curve (module docstring)."""
    dd = {"dtype": torch.float64}
    rates = torch.as_tensor(RATE_GRID, **dd)
    basis = model.basis(rates)  # [R, T, 3]: A, I, E
    blood, conv = basis[0, :, 0], basis[:, :, 2]
    pairs = [(i, j) for i in range(len(RATE_GRID)) for j in range(i + 1, len(RATE_GRID))]
    first, second = (torch.tensor(v) for v in zip(*pairs, strict=True))
    sw = torch.as_tensor(np.sqrt(w), **dd)
    columns = (
        torch.stack([blood.expand(len(pairs), -1), conv[first], conv[second]], dim=-1)
        * sw[None, :, None]
    )  # [P, T, 3]
    gram = columns.transpose(1, 2) @ columns  # [P, 3, 3]
    # Each face's solve as a matrix [P, 3, 3] on the right-hand side (zero rows and
    # columns for the coefficients held at 0).
    solvers = []
    for face in _FACES:
        keep = torch.tensor(face)
        inverse = torch.zeros_like(gram)
        sub = gram[:, keep][:, :, keep]
        scale = torch.diagonal(sub, dim1=1, dim2=2).clamp(min=1e-300).rsqrt()
        unit = sub * scale[:, :, None] * scale[:, None, :]
        part = torch.linalg.pinv(unit) * scale[:, :, None] * scale[:, None, :]
        rows = keep.nonzero()[:, 0]
        inverse[:, rows[:, None], rows[None, :]] = part
        solvers.append(inverse)
    best = np.zeros((len(y), 5))
    for start in range(0, len(y), _CHUNK):
        yc = torch.as_tensor(y[start : start + _CHUNK], **dd) * sw
        rhs = torch.einsum("nt,ptk->npk", yc, columns)  # [N, P, 3]
        yy = (yc * yc).sum(-1)[:, None]
        chunk_sse = torch.full(rhs.shape[:2], np.inf, **dd)
        chunk_c = torch.zeros(rhs.shape, **dd)
        for inverse in solvers:
            c = torch.einsum("pij,npj->npi", inverse, rhs)
            sse = yy - 2 * (c * rhs).sum(-1) + torch.einsum("npi,pij,npj->np", c, gram, c)
            ok = (c >= 0).all(-1) & (c[..., 0] <= hi[-1])
            better = ok & (sse < chunk_sse)
            chunk_sse = torch.where(better, sse, chunk_sse)
            chunk_c = torch.where(better[..., None], c, chunk_c)
        k = chunk_sse.argmin(1)
        rows = torch.arange(len(k))
        c = chunk_c[rows, k].numpy()
        a1, a2 = RATE_GRID[first[k].numpy()], RATE_GRID[second[k].numpy()]
        best[start : start + len(k)] = rates_to_parameters(a1, a2, c[:, 0], c[:, 1], c[:, 2])
    # A curve of blood only (d1 = d2 = 0) has no rates: start its tissue at the defaults.
    default = (lo + hi) / 2
    bad = ~np.isfinite(best).all(1)
    best[bad] = default
    return np.clip(best, lo, hi)


def lm_polish(y, model: KineticModel, w, lo, hi, start, iterations=LM_ITERATIONS):
    """Projected Levenberg-Marquardt of all curves together; (params [N, 5], sse [N])."""
    dd = {"dtype": torch.float64}
    yt = torch.as_tensor(y, **dd)
    sw = torch.as_tensor(np.sqrt(w), **dd)
    lo_t, hi_t = torch.as_tensor(lo, **dd), torch.as_tensor(hi, **dd)
    free = (hi_t > lo_t).to(torch.float64)
    p = torch.as_tensor(start, **dd).clone()

    def residual(q, rows=slice(None)):
        return (_reversible_curves(q, model) - yt[rows]) * sw

    r = residual(p)
    sse = (r * r).sum(-1)
    damping = torch.full_like(sse, 1e-3)
    active = torch.ones_like(sse, dtype=torch.bool)
    eye = torch.eye(5, **dd)
    for _ in range(iterations):
        if not active.any():
            break
        idx = active.nonzero()[:, 0]
        q, rq = p[idx], r[idx]
        step = 1e-6 * q.abs().clamp(min=1e-3)
        # Step inward at an upper bound, so that the difference stays inside.
        step = torch.where(q + step > hi_t, -step, step)
        jac = (
            torch.stack(
                [
                    (residual(q + step[:, i : i + 1] * eye[i], idx) - rq) / step[:, i : i + 1]
                    for i in range(5)
                ],
                dim=-1,
            )
            * free
        )  # [n, T, 5]
        jtr = (jac.transpose(1, 2) @ rq[..., None])[..., 0]
        # Parameters on a bound that the gradient pushes beyond it stay there this step
        # (an active set): clipping their step instead would stall the others.
        pinned = ((q <= lo_t) & (jtr > 0)) | ((q >= hi_t) & (jtr < 0))
        moving = free * (~pinned).to(free.dtype)  # [n, 5]
        jac = jac * moving[:, None, :]
        jtr = jtr * moving
        jtj = jac.transpose(1, 2) @ jac
        diag = torch.diagonal(jtj, dim1=1, dim2=2).clamp(min=1e-12)
        system = (
            jtj + damping[idx, None, None] * torch.diag_embed(diag) + torch.diag_embed(1 - moving)
        )
        delta = -torch.linalg.solve(system, jtr[..., None])[..., 0] * moving
        trial = torch.maximum(torch.minimum(q + delta, hi_t), lo_t)
        rt = residual(trial, idx)
        sse_t = (rt * rt).sum(-1)
        better = sse_t < sse[idx]
        gain = (sse[idx] - sse_t) / sse[idx].clamp(min=1e-300)
        p[idx[better]], r[idx[better]], sse[idx[better]] = trial[better], rt[better], sse_t[better]
        damping[idx] = torch.where(better, damping[idx] / 3, damping[idx] * 8)
        done = (better & (gain < 1e-10)) | (damping[idx] > 1e8)
        active[idx[done]] = False
    return p.numpy(), sse.numpy()


def _curve_fit_polish(y, model: KineticModel, w, lo, hi, start):
    from scipy.optimize import OptimizeWarning

    use = w > 0
    sigma = None if np.allclose(w, 1.0) else 1.0 / np.sqrt(w[use])
    x = np.arange(y.shape[1], dtype=np.float64)[use]
    params = np.full_like(start, np.nan)
    sse = np.full(len(y), np.nan)
    for i, curve in enumerate(y):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                p = bounded_curve_fit(
                    lambda _x, q: _reversible_curves(q, model)[use],
                    x,
                    curve[use],
                    start[i],
                    lo,
                    hi,
                    sigma=sigma,
                    diff_step=1e-4,
                )
        except (RuntimeError, ValueError):
            continue
        params[i] = p
        sse[i] = float(np.sum(w * (curve - _reversible_curves(p, model)) ** 2))
    return params, sse


def fit_reversible(
    tacs,
    input_function: InputFunction,
    frames: FrameSchedule,
    method: str = "fast",
    weights="none",
    bounds=None,
    sampling: str = "average",
    *,
    fixed=None,
    blood_function: InputFunction | None = None,
    lm_iterations: int = LM_ITERATIONS,
    start=None,
) -> ModelFitResult:
    """Fit the reversible two-tissue model to curves ``tacs`` [N, T] (or [T]).

    Parameters
    ----------
    tacs, input_function, frames, weights, sampling, blood_function
        As for :func:`kinpet.fitting.fit`.
    method : {"fast", "curve_fit"}
        See the module docstring.
    bounds : (lower, upper), optional
        Of (K1, k2, k3, k4, Vb); default :data:`kinpet.models.MODELS` ``reversible_2tc``'s.
    fixed : mapping, optional
        Parameters held at a value, e.g. ``{"Vb": 0.05}``.
    lm_iterations : int
        ``fast`` only: at most this many Levenberg-Marquardt steps.
    start : array [N, 5], optional
        Where the polish starts, e.g. a fit of the same curves under a nearby input
        delay (:func:`kinpet.delayfit.fit_with_delay`); default the grid of rates.

    Returns
    -------
    ModelFitResult
    """
    if method not in ("fast", "curve_fit"):
        raise ValueError(f"reversible_2tc: method must be 'fast' or 'curve_fit', not {method!r}")
    spec = get_model("reversible_2tc")
    lo, hi = model_bounds(spec, bounds, fixed)
    y = np.atleast_2d(np.asarray(tacs, dtype=np.float64))
    if y.shape[1] != len(frames):
        raise ValueError(f"tacs must have shape [N, {len(frames)}], got {np.shape(tacs)}")
    w = frame_weights(frames, weights)
    model = KineticModel(input_function, frames, sampling, blood_function)
    input_function.check_not_zero()
    status = screen_curves(y)
    params = np.full((len(y), 5), np.nan)
    sse = np.full(len(y), np.nan)
    good = np.flatnonzero(status == STATUS_OK)
    if good.size:
        if start is None:
            begin = grid_start(y[good], model, w, lo, hi)
        else:
            begin = np.clip(np.atleast_2d(np.asarray(start, dtype=np.float64))[good], lo, hi)
        if method == "fast":
            params[good], sse[good] = lm_polish(y[good], model, w, lo, hi, begin, lm_iterations)
        else:
            params[good], sse[good] = _curve_fit_polish(y[good], model, w, lo, hi, begin)
    failed = (status == STATUS_OK) & ~(np.isfinite(params).all(1) & np.isfinite(sse))
    status[failed] = STATUS_FAILED
    params[status != STATUS_OK], sse[status != STATUS_OK] = np.nan, np.nan
    scheme = weights if isinstance(weights, str) else "custom"
    ki = np.full(len(y), np.nan)
    return ModelFitResult(params, ki, sse, status == STATUS_OK, status, method, sampling, scheme)


def fit_model(
    tacs,
    model: str,
    input_function: InputFunction,
    frames: FrameSchedule,
    method: str = "fast",
    *,
    fixed=None,
    delay_bounds_s=None,
    blood_function: InputFunction | None = None,
    **options,
) -> FitResult:
    """Fit any model of :data:`kinpet.models.MODELS` to curves: one entry point.

    The irreversible two-tissue model and the one-tissue model go to
    :func:`kinpet.fitting.fit` (the latter with k3 held at 0), the reversible model to
    :func:`fit_reversible`. Read the parameters with :func:`kinpet.models.result_columns`.

    Parameters
    ----------
    tacs, input_function, frames, method, blood_function
        As for :func:`kinpet.fitting.fit`.
    model : str
        The model's name.
    fixed : mapping, optional
        Parameters of the model held at a value; names are checked against the model's.
    delay_bounds_s : (lo, hi), optional
        Fit an input delay per curve (:func:`kinpet.delayfit.fit_with_delay`: a grid of
        delays, then a bounded scalar search per curve).
    **options
        Passed on (weights, sampling, bounds, n_jobs, ...).
    """
    from kinpet.fitting import fit

    spec = get_model(model)
    fixed = dict(fixed or {})
    check_fixed(spec, fixed)
    if spec.irreversible_form:
        held = {**fixed, **spec.held}
        options.update(delay_bounds_s=delay_bounds_s, blood_function=blood_function)
        return fit(tacs, input_function, frames, method=method, fixed=held, **options)
    if method == "curve_fit_paper":
        raise ValueError(
            f"model {spec.name}: method 'curve_fit_paper' is not available for it "
            "(methods: fast, curve_fit)"
        )
    options.pop("n_jobs", None)  # curve_fit of this model runs in this process
    if delay_bounds_s is not None:
        step = options.pop("delay_step_s", DELAY_STEP_S)
        return fit_with_delay(tacs, input_function, frames, delay_bounds_s, step,
                              fitter=fit_reversible, warm_start=True, method=method, fixed=fixed,
                              blood_function=blood_function, **options)  # fmt: skip
    return fit_reversible(tacs, input_function, frames, method, fixed=fixed,
                          blood_function=blood_function, **options)  # fmt: skip
