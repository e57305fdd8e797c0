"""The fast fitter of :func:`kinpet.fitting.fit` (``method="fast"``), as plain functions.

``basis``
    Bounds, the weighted basis curves I, A, E_beta and their Gram terms, the beta grid
    and the table of dE/dbeta: everything precomputed once per fit (:func:`make_basis`).
``linear``
    The one bounded linear least-squares solver (:func:`bounded_lsq`), exact by
    enumeration of the faces of its box.
``grid``
    The gain of every grid beta, the choice among its minima, the parabolic refinement,
    and the linear solution mapped to (K1, k2, k3, Vb) (:func:`grid_start`).
``lm``
    Projected Levenberg-Marquardt on the exact model (:func:`polish`).
``driver``
    Chunks, worker threads and the pool of curves not yet converged (:func:`fit_curves`).
``shifted``
    The exact frame-averaged model with an input delay of its own per curve, and its
    derivatives in the delay.
``delay``
    The fit with a delay per curve as a fifth parameter: a start on a grid of delays and
    LM on all five (:func:`kinpet.fastfit.delay.fit_delayed_curves`).
"""

from kinpet.fastfit.basis import DEFAULT_BETA_GRID, Basis, Bounds, beta_values, make_basis
from kinpet.fastfit.driver import fit_curves
from kinpet.fastfit.grid import choose_minimum, grid_beta, grid_gain, grid_start, linear_fit
from kinpet.fastfit.linear import ALL_FACES, GRID_FACES, bounded_lsq, face_coefficients
from kinpet.fastfit.lm import newton_system, polish, start

__all__ = [
    "ALL_FACES",
    "DEFAULT_BETA_GRID",
    "GRID_FACES",
    "Basis",
    "Bounds",
    "beta_values",
    "bounded_lsq",
    "choose_minimum",
    "face_coefficients",
    "fit_curves",
    "grid_beta",
    "grid_gain",
    "grid_start",
    "linear_fit",
    "make_basis",
    "newton_system",
    "polish",
    "start",
]
