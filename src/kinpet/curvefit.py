"""scipy's curve_fit, curve by curve: the paper's reference fitter (docs/fitting.md), run in a
pool of processes for many curves (:func:`kinpet.fitting.fit` with ``method="curve_fit"``)."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from kinpet.kinetics import KineticModel

# The paper's curve_fit start (De Benetti et al. 2023; docs/fitting.md).
PAPER_P0 = (0.1, 0.1, 0.01, 0.01)


def bounded_curve_fit(model_of, x, y, p0, lo, hi, **options) -> np.ndarray:
    """:func:`scipy.optimize.curve_fit` of ``model_of(x, params[4])`` within bounds, with
    the parameters whose lower bound equals the upper held there and left out of the
    problem (scipy needs lower < upper). Raises what curve_fit raises."""
    from scipy.optimize import curve_fit

    free = lo < hi
    full = np.array(lo, dtype=np.float64)
    if not free.any():
        return full

    def model(x, *q):
        p = full.copy()
        p[free] = q
        return model_of(x, p)

    q, _ = curve_fit(model, x, y, p0=p0[free], bounds=(lo[free], hi[free]), **options)
    full[free] = q
    return full


_WORKER = {}


def _init_worker(inputs, frames, sampling, w, lo, hi):
    # One model per process; torch's own threads would only fight the process pool.
    torch.set_num_threads(1)
    input_function, blood_function = inputs
    _WORKER.update(
        model=KineticModel(input_function, frames, sampling, blood_function),
        sigma=1.0 / np.sqrt(w) if not np.allclose(w, 1.0) else None,
        w=w,
        lo=lo,
        hi=hi,
    )


def _fit_block(block: np.ndarray):
    from scipy.optimize import OptimizeWarning

    model, sigma, w, lo, hi = (_WORKER[k] for k in ("model", "sigma", "w", "lo", "hi"))
    x_dummy = np.arange(block.shape[1], dtype=np.float64)
    # Zero-weight frames cannot enter as sigma = inf; leave them out of the residuals.
    use = w > 0

    def f(_x, p):
        return model(p)[use]

    p0 = np.clip(PAPER_P0, lo, hi)
    params = np.full((block.shape[0], 4), np.nan)
    sse = np.full(block.shape[0], np.nan)
    for i, y in enumerate(block):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                p = bounded_curve_fit(
                    f,
                    x_dummy[use],
                    y[use],
                    p0,
                    lo,
                    hi,
                    sigma=None if sigma is None else sigma[use],
                    diff_step=0.001,
                )
        except (RuntimeError, ValueError):
            continue
        params[i] = p
        sse[i] = float(np.sum(w * (y - model(p)) ** 2))
    return params, sse


def curve_fit_many(y, inputs, frames, sampling, w, lo, hi, n_jobs):
    """curve_fit of every curve; ``inputs`` is (input_function, blood_function or None)."""
    y = np.asarray(y, dtype=np.float64)
    setup = (inputs, frames, sampling, w, lo, hi)
    if n_jobs == -1:
        n_jobs = os.cpu_count() or 1
    if n_jobs <= 1 or y.shape[0] < 2:
        saved = torch.get_num_threads()
        try:
            _init_worker(*setup)
            return _fit_block(y)
        finally:
            torch.set_num_threads(saved)
            _WORKER.clear()
    blocks = np.array_split(y, min(y.shape[0], 4 * n_jobs))
    with ProcessPoolExecutor(n_jobs, initializer=_init_worker, initargs=setup) as pool:
        parts = list(pool.map(_fit_block, blocks))
    return np.concatenate([p for p, _ in parts]), np.concatenate([s for _, s in parts])
