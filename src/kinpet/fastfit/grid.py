"""The start of the polish: the gain of every grid beta, the choice among its minima, the
parabolic refinement, and the exact linear solution at the refined beta.

A grid search cannot fall into the local minima that a single start can: it sees them
all and chooses (:func:`choose_minimum`).
"""

from __future__ import annotations

import math

import torch

from kinpet.fastfit.basis import Basis, clip, exact_e, rho_bounds
from kinpet.fastfit.linear import (
    GRID_FACES,
    bounded_lsq,
    cone_gram,
    cone_to_p,
    face_coefficients,
)

# Curves per block of the grid step: its [block, beta] arrays stay in cache, and each
# operation on them is long enough that its Python overhead (which holds the GIL) is small.
# The grid's results do not depend on it (every curve is solved on its own).
GRID_BLOCK = 1024


def grid_gain(basis: Basis, y_w, faces=GRID_FACES):
    """How much each grid beta lowers the SSE below yy = ||y_w||^2, shape [n, B].

    ``y_w`` [n, F] are weighted curves. The bounded linear problem on the cone (W, U, A)
    of every beta (:mod:`kinpet.fastfit.linear`), with the coefficients of the basis, on
    ``faces`` (default the grid's, :data:`kinpet.fastfit.linear.GRID_FACES`).
    """
    c1 = (y_w @ basis.i_w)[:, None]
    c2 = y_w @ basis.e_w.T  # [n, B]
    # Projections on the cone's edges W and U, per beta.
    c_w = torch.addcmul(c2 * (1 - basis.rho_hi), c1, basis.rho_hi)
    c_u = torch.addcmul(c2 * (1 - basis.rho_lo), c1, basis.rho_lo)
    c3 = (y_w @ basis.a_w)[:, None]
    return bounded_lsq(basis.grid_coefficients, c_w, c_u, c3, *basis.bounds.vb, faces)


def choose_minimum(gain, yy, start_distance, tie_tolerance: float):
    """Index of the grid beta to polish: among tied local minima, the one nearest the start.

    The SSE profile over beta can have two local minima, typically one with slow
    exchange and one with k2 near its upper bound, where fast exchange mimics blood
    volume. When their SSEs differ by less than ``tie_tolerance`` x SSE the data cannot
    tell them apart, and the one nearest (in log beta, ``start_distance`` [B]) to the
    paper's start k2 + k3 = 0.11 /min is taken: the minimum that the paper's curve_fit,
    started there, usually descends into, so that the median errors against the truth
    match curve_fit's (README, "Conventional fitting"). Otherwise, and always where
    ``tie_tolerance`` is 0, the best beta of the grid is taken.

    Parameters
    ----------
    gain : torch.Tensor, shape [n, B]
        :func:`grid_gain`.
    yy : torch.Tensor, shape [n]
        ||y_w||^2 per curve, so that SSE = yy - gain.
    start_distance : torch.Tensor, shape [B]
    tie_tolerance : float
    """
    best = gain.argmax(1)
    if tie_tolerance <= 0 or gain.shape[1] < 3:
        return best
    top = gain.gather(1, best[:, None])
    rising = gain[:, 1:] > gain[:, :-1]
    # Interior minima only: the grid's ends lie on bounds of k2 and k3, where the grid's
    # faces (GRID_FACES) can show a minimum that the full problem does not have.
    peak = torch.zeros_like(gain, dtype=torch.bool)
    peak[:, 1:-1] = rising[:, :-1] & ~rising[:, 1:]
    tied = peak & (gain >= top - tie_tolerance * (yy[:, None] - top))
    tied.scatter_(1, best[:, None], True)
    return torch.where(tied, start_distance, math.inf).argmin(1)


def refine(gain, best, log_betas):
    """Vertex (log beta) of the parabola through the gain at ``best`` and its neighbours.

    Near its maximum the gain is smooth in log beta, so the vertex lands much closer to
    the optimum than the grid spacing; it is kept between the two neighbours. Where the
    three gains are not concave (or not finite) the grid's log beta is returned.

    Parameters
    ----------
    gain : torch.Tensor, shape [n, B]
    best : torch.Tensor of int, shape [n]
        Grid index per curve (:func:`choose_minimum`).
    log_betas : torch.Tensor, shape [B]
        log of the grid betas (beta in 1/min).

    Returns
    -------
    torch.Tensor, shape [n]
        log beta.
    """
    lb = log_betas
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


def grid_beta(basis: Basis, y_w, yy):
    """The refined beta (1/min) [n] of weighted curves y_w [n, F], in blocks of the grid.

    ``yy`` [n] is ||y_w||^2 per curve.
    """
    parts = []
    for block, block_yy in zip(y_w.split(GRID_BLOCK), yy.split(GRID_BLOCK), strict=True):
        gain = grid_gain(basis, block)
        best = choose_minimum(gain, block_yy, basis.start_distance, basis.tie_tolerance)
        parts.append(refine(gain, best, basis.log_betas))
    return torch.exp(torch.cat(parts))


def linear_fit(basis: Basis, y_w, e, beta, i_a=None):
    """The exact bounded linear solution at beta [n] (1/min), with every bound but K1's.

    ``e`` [n, F] is the weighted E at ``beta``; ``i_a``, optionally, weighted I and A
    [n, F] of each curve's own (delayed) input instead of the basis's. Returns the gain
    yy - SSE [n] and (p1, p2, p3) (:mod:`kinpet.fastfit.linear`), all [n].
    """
    rho_lo, rho_hi = rho_bounds(basis.bounds, beta)
    if i_a is None:
        c1, c3 = y_w @ basis.i_w, y_w @ basis.a_w
        ie, ea = e @ basis.i_w, e @ basis.a_w
        ii, ia, aa = basis.ii, basis.ia, basis.aa
    else:
        i, a = i_a
        c1, c3 = (y_w * i).sum(1), (y_w * a).sum(1)
        ie, ea = (e * i).sum(1), (e * a).sum(1)
        ii, ia, aa = (i * i).sum(1), (i * a).sum(1), (a * a).sum(1)
    c2, ee = (y_w * e).sum(1), (e * e).sum(1)
    gram = cone_gram(ii, ie, ee, ia, ea, rho_lo, rho_hi)
    c_w = rho_hi * c1 + (1 - rho_hi) * c2
    c_u = rho_lo * c1 + (1 - rho_lo) * c2
    k = face_coefficients(*gram, aa)
    gain, (w, u, p3) = bounded_lsq(k, c_w, c_u, c3, *basis.bounds.vb, solution=True)
    return gain, (*cone_to_p(w, u, rho_lo, rho_hi), p3)


def to_params(basis: Basis, p, beta):
    """(p1, p2, p3) at beta [n] -> (K1, k2, k3, Vb) [n, 4], clipped into the bounds.

    Only K1 = (p1 + p2) / (1 - Vb) can leave its bounds: the others are bounded in the
    linear problem.
    """
    p1, p2, p3 = p
    s = p1 + p2
    tissue = s > 0
    safe = torch.where(tissue, s, torch.ones_like(s))
    k1 = s / (1 - p3)
    # No tissue term: k2 and k3 are arbitrary; split beta evenly.
    k3 = torch.where(tissue, beta * p1 / safe, beta / 2)
    k2 = torch.where(tissue, beta * p2 / safe, beta / 2)
    return clip(basis.bounds, torch.stack([k1, k2, k3, p3], dim=1))


def grid_start(basis: Basis, y_w):
    """Start of the polish for weighted curves y_w [n, F].

    Returns
    -------
    params : torch.Tensor, shape [n, 4]
        (K1, k2, k3, Vb) inside the bounds.
    e : torch.Tensor, shape [n, F]
        Weighted E at ``beta``, exact.
    beta : torch.Tensor, shape [n]
        The refined beta (k2 + k3 of ``params`` up to round-off), 1/min.
    """
    yy = (y_w * y_w).sum(1)
    beta = grid_beta(basis, y_w, yy)
    e = exact_e(basis, beta)
    _, p = linear_fit(basis, y_w, e, beta)
    return to_params(basis, p, beta), e, beta
