"""Everything the fast fitter precomputes once per fit: bounds, the weighted basis curves
and their Gram terms, the beta grid, and the table of dE/dbeta.

For a fixed beta = k2 + k3 (1/min) the model is linear in three coefficients,
``C = p1 I + p2 E_beta + p3 A`` (kinetics: C = (1 - Vb) K1 / beta (k3 I + k2 E) + Vb A).
All curves here are weighted: multiplied by sqrt(w) per frame, so that plain inner
products are the weighted ones of the SSE.

A :class:`Basis` is built in full before any fitting starts (and before any worker thread
exists); nothing in it is filled in lazily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kinpet.fastfit.linear import cone_gram, face_coefficients
from kinpet.kinetics import KineticModel

# (min, max, count), log-spaced, 1/min: steps of 5.5 %, fine enough that the polish ends
# where a grid twice as fine would let it end (docs/fitting.md).
DEFAULT_BETA_GRID = (0.02, 4.0, 100)
FD_REL_STEP = 1e-4  # relative step of the central differences dE/dbeta, d2E/dbeta2
TABLE_STEP = 0.01  # step in log beta of their table


@dataclass(frozen=True)
class Bounds:
    """Bounds of (K1, k2, k3, Vb) (ml/cm^3/min, 1/min, 1/min, 1): one object for all uses.

    Attributes
    ----------
    lo, hi : tuple of float
        As numbers: the linear solver branches on them, and ``number / tensor`` rounds
        differently from a tensor division.
    lo_t, hi_t : torch.Tensor, shape [4]
        The same as float64 tensors on the fitter's device, for comparisons with [n, 4]
        parameters.
    """

    lo: tuple
    hi: tuple
    lo_t: torch.Tensor
    hi_t: torch.Tensor

    @classmethod
    def make(cls, lo, hi, device) -> Bounds:
        """From (lower, upper) arrays as :func:`kinpet.fitting.check_bounds` returns them."""
        lo, hi = tuple(float(v) for v in lo), tuple(float(v) for v in hi)
        dd = {"device": device, "dtype": torch.float64}
        return cls(lo, hi, torch.tensor(lo, **dd), torch.tensor(hi, **dd))

    @property
    def vb(self) -> tuple[float, float]:
        """Lower and upper bound of Vb."""
        return self.lo[3], self.hi[3]

    @property
    def beta(self) -> tuple[float, float]:
        """The range of beta = k2 + k3 (1/min) the bounds allow."""
        return self.lo[1] + self.lo[2], self.hi[1] + self.hi[2]


def rho_bounds(bounds: Bounds, beta):
    """Bounds [rho_lo, rho_hi] of k3 / beta that those of k2 and k3 allow at beta [...]."""
    (lo2, lo3), (hi2, hi3) = bounds.lo[1:3], bounds.hi[1:3]
    rho_hi = torch.minimum(hi3 / beta, 1 - lo2 / beta).clamp(max=1.0)
    rho_lo = torch.maximum(lo3 / beta, 1 - hi2 / beta).clamp(min=0.0)
    return torch.minimum(rho_lo, rho_hi), rho_hi


def clip(bounds: Bounds, x):
    """Clip [n, 4] parameters into the bounds, and onto a bound within round-off of it.

    A value a few ulps inside a bound (k3 = beta rho_lo from the linear solution) would
    not count as on the bound, so the LM step would not hold it there.
    """
    lo, hi = bounds.lo_t, bounds.hi_t
    tol = 1e-12 * (hi - lo).clamp(min=1e-12)
    x = torch.minimum(torch.maximum(x, lo), hi)
    return torch.where(x <= lo + tol, lo, torch.where(x >= hi - tol, hi, x))


def beta_values(beta_grid=DEFAULT_BETA_GRID) -> np.ndarray:
    """The beta grid (1/min): a (min, max, count) triple is log-spaced."""
    if isinstance(beta_grid, tuple) and len(beta_grid) == 3:
        b_min, b_max, count = beta_grid
        return np.geomspace(b_min, b_max, int(count))
    betas = np.asarray(beta_grid, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0 or not (betas > 0).all():
        raise ValueError("beta_grid must be (min, max, count) or positive values")
    return betas


@dataclass(frozen=True)
class Basis:
    """The weighted basis of one model, weighting and bounds (see :func:`make_basis`).

    Attributes
    ----------
    model : KineticModel
    bounds : Bounds
    tie_tolerance : float
        See :func:`kinpet.fastfit.grid.choose_minimum`.
    sqrt_w : torch.Tensor, shape [F]
        Square roots of the frame weights.
    i_w, a_w : torch.Tensor, shape [F]
        Weighted I (integral of the input) and A (the input).
    ia_rows : torch.Tensor, shape [2, F]
        I and A stacked, for the model's shared terms.
    ii, aa, ia : torch.Tensor, 0-d
        Their inner products.
    betas, log_betas : torch.Tensor, shape [B]
        The grid (1/min) and its logarithm.
    start_distance : torch.Tensor, shape [B]
        |log beta - log beta_start| of each grid beta.
    e_w : torch.Tensor, shape [B, F]
        Weighted E_beta on the grid, with ``ie``, ``ee``, ``ea`` [B] its inner products.
    rho_lo, rho_hi : torch.Tensor, shape [B]
        :func:`rho_bounds` on the grid.
    grid_coefficients : dict of torch.Tensor [B]
        :func:`kinpet.fastfit.linear.face_coefficients` of the cone (W, U, A) per beta.
    de_table : torch.Tensor, shape [nodes, 2, F]
        Weighted dE/dbeta and d2E/dbeta2 at log-spaced nodes ``log_nodes`` [nodes].
    """

    model: KineticModel
    bounds: Bounds
    tie_tolerance: float
    sqrt_w: torch.Tensor
    i_w: torch.Tensor
    a_w: torch.Tensor
    ia_rows: torch.Tensor
    ii: torch.Tensor
    aa: torch.Tensor
    ia: torch.Tensor
    betas: torch.Tensor
    log_betas: torch.Tensor
    start_distance: torch.Tensor
    e_w: torch.Tensor
    ie: torch.Tensor
    ee: torch.Tensor
    ea: torch.Tensor
    rho_lo: torch.Tensor
    rho_hi: torch.Tensor
    grid_coefficients: dict
    de_table: torch.Tensor
    log_nodes: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.sqrt_w.device


def make_basis(
    model: KineticModel,
    w,
    lo,
    hi,
    *,
    start_beta: float,
    tie_tolerance: float,
    beta_grid=DEFAULT_BETA_GRID,
    device=None,
) -> Basis:
    """Build the basis for fitting curves of ``model`` with frame weights ``w``.

    Parameters
    ----------
    model : KineticModel
    w : numpy.ndarray, shape [F]
        Frame weights (:func:`kinpet.fitting.frame_weights`).
    lo, hi : array_like, shape [4]
        Bounds of (K1, k2, k3, Vb) (:func:`kinpet.fitting.check_bounds`).
    start_beta : float
        k2 + k3 (1/min) of the start that tied minima are resolved towards.
    tie_tolerance : float
        Relative SSE within which local minima count as tied (>= 0).
    beta_grid : (min, max, count) or array_like
        See :func:`beta_values`; clipped to the betas the bounds allow.
    device : str or torch.device, optional
        Default CUDA when available, else the CPU.
    """
    if not (math.isfinite(tie_tolerance) and tie_tolerance >= 0):
        raise ValueError(f"tie_tolerance must be a number >= 0, not {tie_tolerance!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    dd = {"device": device, "dtype": torch.float64}
    bounds = Bounds.make(lo, hi, device)
    sqrt_w = torch.as_tensor(np.sqrt(w), **dd)
    betas_np = np.unique(np.clip(beta_values(beta_grid), *bounds.beta))
    betas = torch.as_tensor(betas_np, **dd)
    # Exactly as the model samples them: I from (1, 0, 1, 0), A from (0, 1, 1, 1), E_beta
    # from (1, beta, 0, 0). This first call also fills the model's cache of constants for
    # this device, here rather than inside a worker thread.
    curves = model(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]], **dd))
    i_w, a_w = curves[0] * sqrt_w, curves[1] * sqrt_w
    e_w = _weighted_e(model, sqrt_w, betas)
    ii, aa, ia = i_w @ i_w, a_w @ a_w, i_w @ a_w
    ie, ee, ea = e_w @ i_w, (e_w * e_w).sum(1), e_w @ a_w
    rho_lo, rho_hi = rho_bounds(bounds, betas)
    log_betas = torch.log(betas)
    de_table, log_nodes = _derivative_table(model, sqrt_w, bounds, betas_np)
    return Basis(
        model=model,
        bounds=bounds,
        tie_tolerance=float(tie_tolerance),
        sqrt_w=sqrt_w,
        i_w=i_w,
        a_w=a_w,
        ia_rows=torch.stack([i_w, a_w]),
        ii=ii,
        aa=aa,
        ia=ia,
        betas=betas,
        log_betas=log_betas,
        start_distance=(log_betas - math.log(start_beta)).abs(),
        e_w=e_w,
        ie=ie,
        ee=ee,
        ea=ea,
        rho_lo=rho_lo,
        rho_hi=rho_hi,
        grid_coefficients=face_coefficients(*cone_gram(ii, ie, ee, ia, ea, rho_lo, rho_hi), aa),
        de_table=de_table,
        log_nodes=log_nodes,
    )


def _weighted_e(model, sqrt_w, beta):
    unit = torch.zeros(beta.shape[0], 4, dtype=beta.dtype, device=beta.device)
    unit[:, 0], unit[:, 1] = 1.0, beta
    return model(unit) * sqrt_w


def exact_e(basis: Basis, beta):
    """Weighted E_beta [n, F] from the exact model at any beta [n] (1/min)."""
    return _weighted_e(basis.model, basis.sqrt_w, beta)


def _derivative_table(model, sqrt_w, bounds, betas):
    """Central differences of the exact weighted E, in steps of 1 % of beta over the betas
    the bounds and the grid span: [nodes, 2, F] and the nodes' log beta [nodes]."""
    b_lo = min(bounds.beta[0], float(betas.min()))
    b_hi = max(bounds.beta[1], float(betas.max()))
    count = max(2, math.ceil(math.log(b_hi / b_lo) / TABLE_STEP) + 1)
    nodes = torch.as_tensor(np.geomspace(b_lo, b_hi, count), device=sqrt_w.device)
    h = nodes * FD_REL_STEP
    e_m, e_0, e_p = (_weighted_e(model, sqrt_w, nodes + k * h) for k in (-1, 0, 1))
    d1 = (e_p - e_m) / (2 * h[:, None])
    d2 = (e_p - 2 * e_0 + e_m) / (h * h)[:, None]
    return torch.stack([d1, d2], dim=1), torch.log(nodes)


def e_derivatives(basis: Basis, beta, out):
    """dE/dbeta and d2E/dbeta2 (weighted) at beta [n], written to ``out`` [n, 2, F].

    Interpolated linearly in log beta from the basis's table (interpolation error ~1e-5
    relative). They only steer the LM steps (gradient direction and curvature); the
    residuals, and so the solution, use the exact model.
    """
    log_nodes = basis.log_nodes
    lb = torch.log(beta).clamp(float(log_nodes[0]), float(log_nodes[-1]))
    hi = torch.searchsorted(log_nodes, lb).clamp(1, log_nodes.numel() - 1)
    t = (lb - log_nodes[hi - 1]) / (log_nodes[hi] - log_nodes[hi - 1])
    # index_select: the same rows as indexing, several times faster.
    below, above = basis.de_table.index_select(0, hi - 1), basis.de_table.index_select(0, hi)
    torch.lerp(below, above, t[:, None, None], out=out)


def model_from_e(basis: Basis, x, e):
    """Weighted model [n, F] from parameters x [n, 4] and their weighted E [n, F]."""
    k1, k2, k3, vb = x.unbind(1)
    scale = (1 - vb) * k1 / (k2 + k3)
    shared = torch.stack([scale * k3, vb], dim=1) @ basis.ia_rows  # the I and A terms
    return torch.addcmul(shared, e, (scale * k2)[:, None])
