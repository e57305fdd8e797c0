"""Fitting an input delay: the input shifted by d seconds, d chosen per curve.

Real tissue sees the arterial input later than the vessel where it is measured (about 5 s
in grey matter and 17 s in the liver on uEXPLORER data, as KMAP finds). For every delay the
best kinetic parameters are a plain fit with the delayed input
(:meth:`kinpet.inputfunction.InputFunction.delayed`, exact for the piecewise-linear
input), so the delay is found on that profile: every curve is fitted at each delay of a
grid over the bounds, and each curve's best grid delay is then refined by a bounded scalar
search (Brent) between its neighbours on the grid.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction

DELAY_STEP_S = 1.0
DELAY_TOLERANCE_S = 1e-3


def check_delay_bounds(delay_bounds_s) -> tuple[float, float]:
    """(lo, hi) in seconds, finite and lo <= hi."""
    try:
        lo, hi = (float(b) for b in delay_bounds_s)
    except (TypeError, ValueError):
        raise ValueError(f"delay bounds must be (lo, hi) in s, not {delay_bounds_s!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise ValueError(f"delay bounds must be finite with lo <= hi, got ({lo}, {hi}) s")
    return lo, hi


def delay_grid(lo_s: float, hi_s: float, step_s: float = DELAY_STEP_S) -> np.ndarray:
    """Delays from ``lo_s`` to ``hi_s`` (both included), at most ``step_s`` apart."""
    if step_s <= 0:
        raise ValueError(f"the delay step must be > 0 s, not {step_s}")
    count = max(1, int(np.ceil((hi_s - lo_s) / step_s - 1e-9))) + 1
    return np.linspace(lo_s, hi_s, count) if hi_s > lo_s else np.array([lo_s])


def fit_with_delay(
    tacs: np.ndarray,
    input_function: InputFunction,
    frames: FrameSchedule,
    delay_bounds_s,
    delay_step_s: float = DELAY_STEP_S,
    fitter=None,
    warm_start: bool = False,
    **options,
):
    """:func:`kinpet.fitting.fit` (or ``fitter``) with an input delay fitted per curve.

    Parameters
    ----------
    tacs : array [N, T]
    input_function, frames
        As for :func:`kinpet.fitting.fit`; the input as measured (delay 0).
    delay_bounds_s : (lo, hi)
        Range of the delay, s; positive: the tissue sees the input later.
    delay_step_s : float
        Spacing of the grid of delays that starts the search, s.
    fitter : callable, optional
        ``fitter(tacs, input_function, frames, blood_function=..., **options)`` -> a
        result like :func:`kinpet.fitting.fit`'s; default that function (the irreversible
        form). :func:`kinpet.modelfit.fit_reversible` for the reversible model.
    warm_start : bool
        The fitter takes ``start`` (parameters [1, n]): the search between grid delays then
        polishes from the best grid fit instead of running the fitter's own start again.
    **options
        Passed to the fitter (method, weights, bounds, sampling, fixed, ...).

    Returns
    -------
    FitResult
        With ``delay_s`` [N] (NaN where the curve was not fitted).
    """
    from scipy.optimize import minimize_scalar

    if fitter is None:
        from kinpet.fitting import fit as fitter

    lo, hi = check_delay_bounds(delay_bounds_s)
    blood = options.pop("blood_function", None)

    def fit_delayed(curves, d, **extra):
        whole_blood = None if blood is None else blood.delayed(d)
        delayed = input_function.delayed(d)
        return fitter(curves, delayed, frames, blood_function=whole_blood, **options, **extra)

    y = np.atleast_2d(np.asarray(tacs, dtype=np.float64))
    grid = delay_grid(lo, hi, delay_step_s)
    on_grid = [fit_delayed(y, d) for d in grid]
    sse = np.stack([np.where(r.ok, r.sse, np.inf) for r in on_grid])  # [G, N]
    best = np.argmin(sse, axis=0)
    result = on_grid[0]  # its arrays are refilled curve by curve below
    params, out_sse = result.params.copy(), result.sse.copy()
    delay = np.full(len(y), np.nan)
    for i in np.flatnonzero(np.isfinite(sse.min(axis=0))):
        k = best[i]
        found = {"delay": grid[k], "sse": sse[k, i], "params": on_grid[k].params[i]}

        # A fitter that takes a start polishes from the grid's fit at this delay's
        # neighbour instead of searching its own grid again: the profile is smooth in d.
        warm = {"start": on_grid[k].params[i : i + 1]} if warm_start else {}

        def profile(d, i=i, found=found, warm=warm):
            r = fit_delayed(y[i], d, **warm)
            value = float(r.sse[0]) if r.ok[0] else np.inf
            if value < found["sse"]:
                found.update(delay=d, sse=value, params=r.params[0])
            return value

        a, b = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
        if b > a:
            minimize_scalar(
                profile, bounds=(a, b), method="bounded", options={"xatol": DELAY_TOLERANCE_S}
            )
        params[i], out_sse[i], delay[i] = found["params"], found["sse"], found["delay"]
    ok = np.isfinite(delay)
    status = result.status.copy()
    status[ok] = 0  # fitted at some delay: ok (a curve the grid cannot fit keeps its reason)
    params[~ok], out_sse[~ok] = np.nan, np.nan
    ki_s = np.full(len(y), np.nan)  # defined for the irreversible form (K1, k2, k3, Vb) only
    if params.shape[1] == 4:
        from kinpet.kinetics import ki

        with np.errstate(invalid="ignore", divide="ignore"):
            ki_s = ki(params)
    return dataclasses.replace(
        result, params=params, ki=ki_s, sse=out_sse, ok=ok, status=status, delay_s=delay
    )
