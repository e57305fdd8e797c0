"""Variable projection: the kinetic parameters that enter linearly, solved per pixel.

For a given beta = k2 + k3 the model

    C = Vb A + a I + b E_beta,   a = (1 - Vb) K1 k3 / beta,   b = (1 - Vb) K1 k2 / beta

is linear in c = (Vb, a, b) (:meth:`kinpet.kinetics.KineticModel.basis`). A network then
needs to predict beta only; Vb, K1 and the split of beta into k2 and k3 are the weighted
least-squares solution of each pixel's curve (``training.projection``). The lower bounds
of Vb, k3 and k2 are linear in c,

    Vb >= Vb_lo,   (beta - k3_lo) a - k3_lo b >= 0,   (beta - k2_lo) b - k2_lo a >= 0,

(together they make a, b >= 0), so the constrained minimum lies on one face of this cone.
:func:`project` solves the equality-constrained problem on every face and keeps the
feasible solution of least cost: the exact constrained minimum, as the cost is convex. The
upper bounds (K1, k2, k3, Vb) are applied by clamping afterwards; FDG tissue rarely
reaches them (the spleen's k2, ~2.8 /min against 3, comes closest).

The solve runs in float64 (the Gram matrix of A, I and E spans many decades) and is
differentiable with respect to beta, so the loss trains the network through it.
"""

from __future__ import annotations

import torch

from kinpet.kinetics import PAPER_LOWER, PAPER_UPPER, KineticModel

# Faces of the cone: which lower bounds hold with equality (Vb, k3, k2). k3 and k2 both at
# their bounds means a = b = 0 (no tissue; beta is above the sum of the bounds).
_FACES = tuple(
    (vb, k3, k2)
    for vb in (False, True)
    for k3, k2 in ((False, False), (True, False), (False, True), (True, True))
)
_FEASIBILITY_TOLERANCE = 1e-9


def _face_map(beta, vb_fixed: bool, k3_fixed: bool, k2_fixed: bool, lo_k2, lo_k3):
    """c = P z + c0 on one face: P [N, 3, m], with m the face's free coordinates."""
    n = beta.shape[0]
    zero, one = torch.zeros_like(beta), torch.ones_like(beta)
    columns = [] if vb_fixed else [torch.stack([one, zero, zero], -1)]
    if k3_fixed and k2_fixed:
        pass  # a = b = 0
    elif k3_fixed:  # k3 / beta fixed: (a, b) = s (k3_lo, beta - k3_lo) / beta
        columns.append(torch.stack([zero, lo_k3 / beta, (beta - lo_k3) / beta], -1))
    elif k2_fixed:
        columns.append(torch.stack([zero, (beta - lo_k2) / beta, lo_k2 / beta], -1))
    else:
        columns += [torch.stack([zero, one, zero], -1), torch.stack([zero, zero, one], -1)]
    if not columns:
        return beta.new_zeros((n, 3, 0))
    return torch.stack(columns, -1)


def _feasible(c, beta, vb_lo, lo_k2, lo_k3):
    vb, a, b = c.unbind(-1)
    tol = _FEASIBILITY_TOLERANCE * (c.abs().sum(-1) + 1e-30)
    return (
        (vb - vb_lo >= -tol)
        & ((beta - lo_k3) * a - lo_k3 * b >= -tol * beta)
        & ((beta - lo_k2) * b - lo_k2 * a >= -tol * beta)
    )


def _matmul(a, b):
    """Batched product of small matrices [N, i, j] @ [N, j, k], as a broadcast sum
    (batched matmul of such sizes is many times slower on CPU)."""
    return (a[:, :, :, None] * b[:, None, :, :]).sum(2)


def _solve_small(m, r):
    """Solve many small symmetric positive-definite systems m [N, k, k] z = r [N, k], k <= 3,
    in closed form (batched LU is slow for such sizes), after scaling m to unit diagonal."""
    d = torch.diagonal(m, dim1=1, dim2=2).rsqrt()  # [N, k]
    a = m * d[:, :, None] * d[:, None, :]
    b = r * d
    k = m.shape[-1]
    if k == 1:
        return b / a[:, 0] * d
    if k == 2:
        det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] ** 2
        z0 = a[:, 1, 1] * b[:, 0] - a[:, 0, 1] * b[:, 1]
        z1 = a[:, 0, 0] * b[:, 1] - a[:, 0, 1] * b[:, 0]
        return torch.stack([z0, z1], -1) / det[:, None] * d
    # Symmetric 3 x 3: z = adj(a) b / det(a).
    a00, a01, a02 = a[:, 0, 0], a[:, 0, 1], a[:, 0, 2]
    a11, a12, a22 = a[:, 1, 1], a[:, 1, 2], a[:, 2, 2]
    c00, c01, c02 = a11 * a22 - a12 * a12, a02 * a12 - a01 * a22, a01 * a12 - a02 * a11
    c11, c12, c22 = a00 * a22 - a02 * a02, a01 * a02 - a00 * a12, a00 * a11 - a01 * a01
    det = a00 * c00 + a01 * c01 + a02 * c02
    b0, b1, b2 = b.unbind(-1)
    z = torch.stack(
        [
            c00 * b0 + c01 * b1 + c02 * b2,
            c01 * b0 + c11 * b1 + c12 * b2,
            c02 * b0 + c12 * b1 + c22 * b2,
        ],
        -1,
    )
    return z / det[:, None] * d


def solve_linear(beta, tacs, basis, weights=None, lower=PAPER_LOWER):
    """The bounded least-squares coefficients c = (Vb, a, b) of curves for given beta.

    Parameters
    ----------
    beta : torch.Tensor, shape [N]
        k2 + k3 (1/min), above the sum of the k2 and k3 lower bounds.
    tacs : torch.Tensor, shape [N, T]
        Measured curves.
    basis : torch.Tensor, shape [N, T, 3]
        A, I and E_beta of each curve (:meth:`KineticModel.basis`).
    weights : torch.Tensor, shape [T], optional
        Frame weights of the least-squares cost.
    lower : sequence of 4 floats
        Lower bounds of K1, k2, k3, Vb (K1's is not used here).

    Returns
    -------
    c : torch.Tensor, shape [N, 3]
        The minimiser of sum_t w_t (tacs - basis @ c)^2 under the cone's constraints.
    """
    _, lo_k2, lo_k3, vb_lo = (float(v) for v in lower)
    w = torch.ones(tacs.shape[-1], dtype=tacs.dtype, device=tacs.device)
    if weights is not None:
        w = weights.to(tacs)
    # Everything below works on the Gram terms only, so no face touches the frames again;
    # in float64 the cost's cancellation (sum w y^2 against the fit) stays ~1e-13.
    curves = basis.transpose(1, 2).contiguous()  # [N, 3, T]
    weighted = curves * w
    gram = (weighted[:, :, None, :] * curves[:, None, :, :]).sum(-1)  # X'WX, [N, 3, 3]
    moments = (weighted * tacs[:, None, :]).sum(-1)  # X'Wy, [N, 3]
    best_cost, best = None, None
    for vb_fixed, k3_fixed, k2_fixed in _FACES:
        p = _face_map(beta, vb_fixed, k3_fixed, k2_fixed, lo_k2, lo_k3)
        c = torch.zeros_like(moments)  # c = offset + p z
        if vb_fixed:
            c[:, 0] = vb_lo
        if p.shape[-1]:
            rhs = moments - (gram * c[:, None, :]).sum(-1)
            pt = p.transpose(1, 2)
            z = _solve_small(_matmul(pt, _matmul(gram, p)), (pt * rhs[:, None, :]).sum(-1))
            c = c + (p * z[:, None, :]).sum(-1)
        # The cost up to the constant sum w y^2.
        cost = ((gram * c[:, None, :]).sum(-1) * c).sum(-1) - 2 * (c * moments).sum(-1)
        cost = torch.where(_feasible(c, beta, vb_lo, lo_k2, lo_k3), cost, torch.inf)
        if best is None:
            best_cost, best = cost, c
        else:
            better = cost < best_cost
            best_cost = torch.where(better, cost, best_cost)
            best = torch.where(better[:, None], c, best)
    return best


def coefficients_to_parameters(c, beta, lower=PAPER_LOWER, upper=PAPER_UPPER):
    """K1, k2, k3, Vb [N, 4] of coefficients c = (Vb, a, b) [N, 3] and beta [N], clamped
    to the bounds."""
    lo = torch.tensor(lower, dtype=c.dtype, device=c.device)
    hi = torch.tensor(upper, dtype=c.dtype, device=c.device)
    vb, a, b = c.unbind(-1)
    vb = torch.minimum(torch.maximum(vb, lo[3]), hi[3])
    s = a + b  # (1 - Vb) K1
    has_tissue = s > 0
    safe_s = torch.where(has_tissue, s, torch.ones_like(s))
    # Without tissue the split is undefined: k3 at its floor (K1 is at its floor too).
    k3 = torch.where(has_tissue, beta * a / safe_s, torch.full_like(s, float(lower[2])))
    k1 = s / torch.clamp(1 - vb, min=1e-6)
    params = torch.stack([k1, beta - k3, k3, vb], -1)
    return torch.minimum(torch.maximum(params, lo), hi)


def beta_range(lower=PAPER_LOWER, upper=PAPER_UPPER) -> tuple[float, float]:
    """The range (1/min) of beta = k2 + k3 that :func:`project` solves in: just above the
    sum of the k2 and k3 lower bounds (where the tissue's split is still defined), up to the
    sum of their upper bounds."""
    return (lower[1] + lower[2]) * (1 + 1e-6), upper[1] + upper[2]


def project(beta, tacs, model: KineticModel, weights=None, lower=PAPER_LOWER, upper=PAPER_UPPER):
    """Parameters K1, k2, k3, Vb [N, 4] that best fit curves ``tacs`` [N, T] at ``beta`` [N].

    ``model`` gives the basis (its input function in the units of ``tacs``); ``weights``
    ([T]) are the frame weights of the fit. beta is first clipped into
    (k2_lo + k3_lo, k2_hi + k3_hi). Returns float64.
    """
    floor, ceiling = beta_range(lower, upper)
    beta = torch.clamp(beta.double(), min=floor, max=ceiling)
    tacs = tacs.double()
    basis = model.basis(beta)
    c = solve_linear(beta, tacs, basis, None if weights is None else weights.double(), lower)
    return coefficients_to_parameters(c, beta, lower, upper)


def project_maps(params, tacs, model: KineticModel, weights=None):
    """Replace the network's parameter maps [B, 4, H, W] by their projection: beta = k2 + k3
    of ``params`` is kept and the rest solved per pixel on ``tacs`` [B, T, H, W]."""
    b, _, h, w = params.shape
    beta = (params[:, 1] + params[:, 2]).reshape(-1)
    curves = tacs.permute(0, 2, 3, 1).reshape(-1, tacs.shape[1])
    out = project(beta, curves, model, weights)
    return out.to(params.dtype).reshape(b, h, w, 4).permute(0, 3, 1, 2)


def projected_cost(beta, tacs, model: KineticModel, weights=None):
    """The frame-weighted squared error [N] of each curve ``tacs`` [N, T] against its
    projection (:func:`project`) at ``beta`` [N]: the cost that is left for beta alone."""
    params = project(beta, tacs, model, weights)
    w = 1.0 if weights is None else weights.to(params)
    return ((model(params) - tacs.to(params)) ** 2 * w).sum(-1)


def newton_log_beta(beta, tacs, model: KineticModel, weights=None, h=0.05, max_step=0.5):
    """One damped Newton step of each curve's projected cost in log beta.

    The step is taken from central differences of :func:`projected_cost` at
    log beta -/+ ``h``: -g / H where the curvature H is positive, else ``max_step`` down
    the slope, and clipped to +/- ``max_step``. Used as a regression target (no labels:
    only the curves), it makes every pixel pull its beta toward its own least-squares
    optimum at the same rate, however flat its cost is there: a curve with fast exchange
    (the spleen's), whose cost changes little with beta, then counts as much as one with
    a sharp minimum.

    Parameters
    ----------
    beta : torch.Tensor, shape [N]
        Current k2 + k3 (1/min).
    tacs : torch.Tensor, shape [N, T]
        Measured curves (the units of ``model``'s input function).
    model : KineticModel
    weights : torch.Tensor, shape [T], optional
        Frame weights of the cost.
    h : float
        Difference step in log beta.
    max_step : float
        Largest step in log beta.

    Returns
    -------
    torch.Tensor, shape [N], float64
        The log beta after the step, within the bounds of beta (:func:`project`).
    """
    floor, ceiling = beta_range()
    u = torch.log(beta.double().clamp(min=floor, max=ceiling))
    lo = torch.log(torch.tensor(floor * (1 + 1e-6), dtype=u.dtype, device=u.device))
    hi = torch.log(torch.tensor(ceiling, dtype=u.dtype, device=u.device))
    # Differences stay inside the bounds, so that no side is clipped flat.
    centre = u.clamp(min=lo + h, max=hi - h)
    costs = [projected_cost(torch.exp(centre + d), tacs, model, weights) for d in (-h, 0.0, h)]
    slope = (costs[2] - costs[0]) / (2 * h)
    curvature = (costs[2] - 2 * costs[1] + costs[0]) / h**2
    newton = -slope / curvature.clamp(min=1e-300)
    step = torch.where(curvature > 0, newton, -torch.sign(slope) * max_step)
    return (centre + step.clamp(min=-max_step, max=max_step)).clamp(min=lo, max=hi)
