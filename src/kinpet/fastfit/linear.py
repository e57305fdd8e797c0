"""The bounded linear least-squares problem of the fast fitter, solved exactly.

    min ||y - b X1 - a X2 - p3 A||^2   with b, a >= 0 and vb_lo <= p3 <= vb_hi

for many curves at once (and, on the grid, for many betas at once). The problem is
convex, so its solution is the unconstrained minimum on one face of the box (some
variables held at a bound, the rest free), namely the feasible face minimum with the
lowest SSE; every face has a closed form from the 3 x 3 Gram matrix of (X1, X2, A).

With X1 = I and X2 = E_beta this is the box problem in (p1, p2, p3). With the bounds of
k2 and k3 as well, k3 / beta = p1 / (p1 + p2) must lie in [rho_lo, rho_hi]: the allowed
(p1, p2) form a cone spanned by (rho_hi, 1 - rho_hi) and (rho_lo, 1 - rho_lo), and with
nonnegative weights b, a on its edges, the curves W = rho_hi I + (1 - rho_hi) E and
U = rho_lo I + (1 - rho_lo) E, it is the same box problem (:func:`cone_gram`,
:func:`cone_to_p`).

Everything is written as the gain ``yy - SSE`` (yy = ||y||^2), with the face solutions as
per-face coefficients times the projections c = (X1.y, X2.y, A.y): on the grid the
coefficients depend on beta only, so they are computed once per fit
(:func:`face_coefficients`) and the per-curve work is a few multiply-adds per face.
"""

from __future__ import annotations

import math

import torch

# Faces of the box, by the state of (b, a, p3): "0" held at 0, "f" free, "lo"/"hi" p3 at
# its bound. A face that leaves b free with a = 0 and p3 at a bound is "b_lo", and so on.
ALL_FACES = (
    "a_lo", "ba_lo", "a_f", "ba_f",  # the grid's faces
    "0_lo", "b_lo", "a_hi", "ba_hi", "0_hi", "b_hi", "0_f", "b_f",
)  # fmt: skip
# The grid evaluates only the faces with a free (U's weight) and p3 at its lower bound or
# free, a third of the work: near the best beta the solution nearly always lies on one of
# them. Where it lies elsewhere the grid reports a lower gain than the exact one, which
# moves the chosen beta of a few curves in a thousand (docs/fitting.md; tests/
# test_fitting.py checks the bound and the choice against all faces). The refined beta is
# solved exactly, on all faces.
GRID_FACES = ALL_FACES[:4]


def _regular(det, scale):
    """``det`` where it is clearly nonzero against ``scale`` (a product of the Gram
    matrix's diagonal), else NaN: solutions of a (nearly) singular face come out NaN and
    so infeasible, instead of huge numbers that might pass the sign checks."""
    return torch.where(det > 1e-12 * scale, det, torch.full_like(det, math.nan))


def cone_gram(ii, ie, ee, ia, ea, rho_lo, rho_hi):
    """Inner products of W = rho_hi I + (1 - rho_hi) E, U = rho_lo I + (1 - rho_lo) E and A.

    Returns (W.W, W.U, U.U, W.A, U.A) from those of I, E and A (any broadcastable shapes).
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


def cone_to_p(b, a, rho_lo, rho_hi):
    """(p1, p2) from the weights b of W and a of U."""
    return rho_hi * b + rho_lo * a, (1 - rho_hi) * b + (1 - rho_lo) * a


def face_coefficients(x11, x12, x22, x1a, x2a, aa) -> dict:
    """Per-face solution coefficients from the Gram matrix of (X1, X2, A).

    Each argument is one entry (broadcastable shapes; per beta on the grid, per curve at
    a refined beta). A face whose Gram matrix is (nearly) singular, e.g. W = U where the
    bounds leave a single k3 for a beta, gets NaN coefficients: NaN compares false, so it
    is never feasible.
    """
    det_ba = _regular(x11 * x22 - x12 * x12, x11 * x22)  # b, a free
    det_ap = _regular(x22 * aa - x2a * x2a, x22 * aa)  # a, p3 free
    det_bp = _regular(x11 * aa - x1a * x1a, x11 * aa)  # b, p3 free
    m11, m22, m33 = x22 * aa - x2a * x2a, x11 * aa - x1a * x1a, x11 * x22 - x12 * x12
    m12, m13, m23 = x1a * x2a - x12 * aa, x12 * x2a - x1a * x22, x12 * x1a - x11 * x2a
    det3 = _regular(x11 * m11 + x12 * m12 + x1a * m13, x11 * x22 * aa)
    return {
        "x1a": x1a,
        "x2a": x2a,
        "aa": aa,
        "inv_11": 1.0 / x11,
        "inv_22": 1.0 / x22,
        "inv_aa": 1.0 / aa,
        "b_11": x22 / det_ba,
        "b_12": -x12 / det_ba,
        "b_22": x11 / det_ba,
        "c_22": aa / det_ap,
        "c_23": -x2a / det_ap,
        "c_33": x22 / det_ap,
        "f_11": aa / det_bp,
        "f_13": -x1a / det_bp,
        "f_33": x11 / det_bp,
        "d_11": m11 / det3,
        "d_12": m12 / det3,
        "d_13": m13 / det3,
        "d_22": m22 / det3,
        "d_23": m23 / det3,
        "d_33": m33 / det3,
    }


def bounded_lsq(k, c1, c2, c3, vb_lo, vb_hi, faces=ALL_FACES, solution=False):
    """The bounded problem of the module docstring, on the faces ``faces``.

    Parameters
    ----------
    k : dict
        :func:`face_coefficients` (shapes broadcastable with ``c1``).
    c1, c2 : torch.Tensor
        Projections X1.y and X2.y (e.g. [n, B] on the grid, [n] at one beta per curve).
    c3 : torch.Tensor
        A.y, broadcastable against them ([n, 1] on the grid).
    vb_lo, vb_hi : float
        Bounds of p3 (Vb).
    faces : sequence of str
        Which faces of :data:`ALL_FACES` to try; all of them give the exact solution.
    solution : bool
        Also return the solution (b, a, p3).

    Returns
    -------
    gain : torch.Tensor
        yy - SSE of the best feasible face (-inf where none of ``faces`` is feasible;
        ``faces`` must not be empty).
    (b, a, p3) : tuple of torch.Tensor
        Only with ``solution``: the weights of X1, X2 and A.
    """
    best = None
    sol = [0.0, 0.0, 0.0]
    zero = 0.0

    def keep(gain, feasible, b, a, p3):
        nonlocal best
        if best is None and feasible is True:  # the first face: nothing to beat yet
            best = gain
            sol[:] = (b, a, p3)
            return
        if best is None:
            better = feasible
            best = torch.where(better, gain, -math.inf)
        else:
            better = gain > best
            better &= feasible
            # In place: the [n, B] arrays of the grid stay fewer and in cache.
            best = (
                torch.where(better, gain, best, out=best)
                if best.shape == better.shape
                else torch.where(better, gain, best)
            )
        for i, v in enumerate((b, a, p3) if solution else ()):
            sol[i] = torch.where(better, v, sol[i])

    held = {"lo": vb_lo, "hi": vb_hi}
    if vb_hi == vb_lo:
        faces = [f for f in faces if not f.endswith("_hi")]
    fixed = {}  # per bound of p3: the problem in (b, a) of y - v A
    for face in faces:
        kind, _, p3_state = face.partition("_")
        if p3_state != "f":
            v = held[p3_state]
            if p3_state not in fixed:
                # The gain is counted against yy, so that SSE = yy - gain on every face (the
                # -2 v c3 + v^2 aa term of fitting y - v A is the same for all of them).
                if v:
                    fixed[p3_state] = (c1 - v * k["x1a"], c2 - v * k["x2a"],
                                       2 * v * c3 - v * v * k["aa"])  # fmt: skip
                else:
                    fixed[p3_state] = (c1, c2, 0.0)
            c1v, c2v, offset = fixed[p3_state]
            p3 = v
            if kind == "0":
                keep(offset + torch.zeros_like(c2v), True, zero, zero, p3)
            elif kind == "a":
                keep(_plus(c2v * c2v * k["inv_22"], offset), c2v >= 0, zero, c2v * k["inv_22"], p3)
            elif kind == "b":
                keep(_plus(c1v * c1v * k["inv_11"], offset), c1v >= 0, c1v * k["inv_11"], zero, p3)
            else:
                b = (c1v * k["b_11"]).addcmul_(c2v, k["b_12"])
                a = (c2v * k["b_22"]).addcmul_(c1v, k["b_12"])
                gain = _plus((b * c1v).addcmul_(a, c2v), offset)
                feasible = b >= 0
                feasible &= a >= 0
                keep(gain, feasible, b, a, p3)
            continue
        if kind == "0":
            p3 = c3 * k["inv_aa"]
            keep(c3 * c3 * k["inv_aa"], (p3 >= vb_lo) & (p3 <= vb_hi), zero, zero, p3)
        elif kind == "a":
            a = (c3 * k["c_23"]).addcmul_(c2, k["c_22"])
            p3 = (c3 * k["c_33"]).addcmul_(c2, k["c_23"])
            gain = (a * c2).addcmul_(p3, c3)
            keep(gain, _all(a >= 0, p3 >= vb_lo, p3 <= vb_hi), zero, a, p3)
        elif kind == "b":
            b = (c3 * k["f_13"]).addcmul_(c1, k["f_11"])
            p3 = (c3 * k["f_33"]).addcmul_(c1, k["f_13"])
            gain = (b * c1).addcmul_(p3, c3)
            keep(gain, _all(b >= 0, p3 >= vb_lo, p3 <= vb_hi), b, zero, p3)
        else:
            b = (c3 * k["d_13"]).addcmul_(c1, k["d_11"]).addcmul_(c2, k["d_12"])
            a = (c3 * k["d_23"]).addcmul_(c1, k["d_12"]).addcmul_(c2, k["d_22"])
            p3 = (c3 * k["d_33"]).addcmul_(c1, k["d_13"]).addcmul_(c2, k["d_23"])
            gain = (b * c1).addcmul_(a, c2).addcmul_(p3, c3)
            keep(gain, _all(b >= 0, a >= 0, p3 >= vb_lo, p3 <= vb_hi), b, a, p3)
    if solution:
        return best, tuple(torch.zeros_like(best) + v for v in sol)
    return best


def _all(first, *rest):
    """The elementwise AND of boolean tensors, in place in the first."""
    for mask in rest:
        first &= mask
    return first


def _plus(gain, offset):
    """gain + offset, skipping the pass over ``gain`` where the offset is the number 0."""
    return gain if isinstance(offset, float) and offset == 0.0 else gain + offset
