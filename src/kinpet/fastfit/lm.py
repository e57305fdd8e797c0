"""The polish: projected Levenberg-Marquardt on the exact model, for many curves at once.

Each step solves (H + lambda diag(H)) d = J^T r on the free parameters (a parameter at a
bound whose gradient, or whose step, points outward is held), with H the full Hessian of
SSE / 2 where it is positive definite (else Gauss-Newton's J^T J), shortens d to stop at
the first bound it meets, and keeps x + d only if it lowers the SSE. A curve stops when
the step's predicted decrease of the SSE is below :data:`LM_RTOL` of it (checked before
the trial point is evaluated), when a kept step lowered the SSE by less than that, or when
its budget of steps is spent. One exact model evaluation per trial; the curves still
active are gathered each step, so converged curves cost nothing further.

A curve still going after :data:`LM_RESTART` steps starts again from the initial damping:
by then its damping has often grown so large that its steps crawl (docs/fitting.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kinpet.fastfit.basis import Basis, clip, e_derivatives, exact_e, model_from_e

# Converged when a step lowers (or would lower) the SSE by less than this, relatively. Far
# below the noise: a change of 1e-8 x SSE moves a parameter by ~1e-3 of its standard error.
LM_RTOL = 1e-8
LM_START_DAMPING = 1e-3
LM_RESTART = 15


@dataclass
class Polish:
    """Curves being polished, with all the state a step needs (torch tensors).

    Attributes
    ----------
    y_w : [n, F]
        Weighted curves.
    x : [n, 4]
        Parameters (K1, k2, k3, Vb).
    e : [n, F]
        Weighted E at k2 + k3 of ``x``.
    r : [n, F]
        Weighted residuals at ``x``.
    sse : [n]
        Weighted SSE at ``x``.
    lam : [n]
        Damping.
    taken : [n] int
        Steps each curve has taken.
    """

    y_w: torch.Tensor
    x: torch.Tensor
    e: torch.Tensor
    r: torch.Tensor
    sse: torch.Tensor
    lam: torch.Tensor
    taken: torch.Tensor

    def take(self, idx) -> Polish:
        """The curves ``idx`` (a copy)."""
        return Polish(*(v.index_select(0, idx) for v in self._fields()))

    @staticmethod
    def cat(parts) -> Polish:
        """The curves of several states, one after the other."""
        return Polish(*(torch.cat(f) for f in zip(*(p._fields() for p in parts), strict=True)))

    def _fields(self):
        return (self.y_w, self.x, self.e, self.r, self.sse, self.lam, self.taken)

    def __len__(self) -> int:
        return self.x.shape[0]


def start(basis: Basis, y_w, x, e, beta_e) -> Polish:
    """The state at parameters x [n, 4] (taken over, not copied) with weighted E ``e``
    [n, F] at ``beta_e`` [n].

    ``beta_e`` is where ``e`` was evaluated (:func:`kinpet.fastfit.grid.grid_start`);
    where it differs from k2 + k3 of ``x`` by more than round-off, E is evaluated again
    (in place: ``e`` becomes part of the state).
    """
    beta = x[:, 1] + x[:, 2]
    # k2 + k3 differs from the beta it was mapped from by round-off: no reason.
    stale = torch.nonzero((beta - beta_e).abs() > 1e-12 * beta_e)[:, 0]
    if stale.numel():
        e[stale] = exact_e(basis, beta[stale])
    r = y_w - model_from_e(basis, x, e)
    n = x.shape[0]
    lam = torch.full((n,), LM_START_DAMPING, dtype=x.dtype, device=x.device)
    taken = torch.zeros(n, dtype=torch.int64, device=x.device)
    return Polish(y_w, x, e, r, (r * r).sum(1), lam, taken)


def polish(basis: Basis, s: Polish, steps: int, stop_below: int = 0):
    """LM steps on the curves of ``s`` (updated in place) until every one has stopped or
    taken ``steps`` steps in all.

    With ``stop_below`` > 0 it returns as soon as fewer curves than that are still going:
    a step costs a fixed overhead however few curves take it, so the caller lets them
    wait for more.

    Returns
    -------
    torch.Tensor
        Indices (into ``s``, ascending) of the curves that have not converged: those
        still going at ``stop_below`` and those that have taken ``steps``.
    """
    x, e, r, sse, lam, taken = s.x, s.e, s.r, s.sse, s.lam, s.taken
    n = x.shape[0]
    active = torch.nonzero((sse > 0) & (taken < steps))[:, 0]
    spent = [active[:0]]
    lo, hi = basis.bounds.lo_t, basis.bounds.hi_t
    while active.numel() and active.numel() >= stop_below:
        if active.numel() == n:  # every curve: no gathering needed
            xa, ea, ra, sse_a, lam_a = x, e, r, sse, lam
        else:
            xa, ea, ra, sse_a, lam_a = (v.index_select(0, active) for v in (x, e, r, sse, lam))
        hess, g, jtj = newton_system(basis, xa, ea, ra)
        step, pred = projected_step(hess, jtj, g, xa, lo, hi, lam_a)
        # A heavily damped step predicts little even far from the minimum: try it.
        go = torch.nonzero((pred > LM_RTOL * sse_a) | (lam_a > 1.0))[:, 0]
        active = active[go]
        if go.numel() < xa.shape[0]:
            xa, ea, ra, step, g, sse_a, lam_a = (
                v.index_select(0, go) for v in (xa, ea, ra, step, g, sse_a, lam_a)
            )
        # Shortened to stop at the first bound it meets: that parameter lands on its
        # bound (and is held there next time if its gradient points out). Clipping each
        # parameter instead bends the step out of its direction, and such steps were
        # often rejected, so that curves with an optimum on a bound took many steps.
        step = step * step_to_bounds(xa, step, lo, hi)[:, None]
        trial_x, e_t, r_t, sse_t = trial(basis, xa + step, s.y_w.index_select(0, active))
        accept = sse_t < sse_a
        small = (sse_a - sse_t) <= LM_RTOL * sse_a
        # (Before the updates below: xa, sse_a, ... may be views of x, sse, ...)
        done = (accept & small) | (lam_a > 1e10) | (sse_t == 0)
        acc = accept[:, None]
        x.index_copy_(0, active, torch.where(acc, trial_x, xa))
        e.index_copy_(0, active, torch.where(acc, e_t, ea))
        r.index_copy_(0, active, torch.where(acc, r_t, ra))
        sse.index_copy_(0, active, torch.where(accept, sse_t, sse_a))
        lam.index_copy_(0, active, torch.where(accept, lam_a / 10, lam_a * 10))
        taken_a = taken.index_select(0, active) + 1
        taken.index_copy_(0, active, taken_a)
        if steps > LM_RESTART:
            restart = active[~done & (taken_a == LM_RESTART)]
            lam[restart] = LM_START_DAMPING
        more = taken_a < steps
        spent.append(active[~done & ~more])
        active = active[~done & more]
    return torch.cat([*spent, active]).sort().values


def newton_system(basis: Basis, x, e, r):
    """Hessian of SSE / 2 [n, 4, 4], J^T r [n, 4] and J^T J [n, 4, 4] at x [n, 4].

    ``e`` [n, F] is the weighted E at k2 + k3 of x, ``r`` [n, F] the weighted residuals.
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
    curves[:, 0] = basis.i_w
    curves[:, 1] = basis.a_w
    curves[:, 2] = e
    e_derivatives(basis, beta, out=curves[:, 3:5])
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


def damped_step(hess, jtj, g, held, lam):
    """The damped step [n, 4] on the parameters not ``held`` [n, 4], and the matrix it used.

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


def projected_step(hess, jtj, g, x, lo, hi, lam, fixed=None):
    """The damped step [n, k] at x [n, k] within bounds ``lo``, ``hi`` [k], and the
    decrease of the SSE that its quadratic model predicts, 2 d.g - d.H.d [n].

    Parameters on a bound that the gradient points out of are held (and those ``fixed``
    [k], bool). A parameter on a bound that the step would then push outward is held as
    well, once more: the projection would cut its move, which the others assume.
    """
    at_lo, at_hi = x <= lo, x >= hi
    held = (at_lo & (g < 0)) | (at_hi & (g > 0))
    if fixed is not None:
        held = held | fixed
    step, used = damped_step(hess, jtj, g, held, lam)
    out = held | (at_lo & (step < 0)) | (at_hi & (step > 0))
    again = torch.nonzero((out != held).any(1))[:, 0]
    if again.numel():
        step_o, used_o = damped_step(hess[again], jtj[again], g[again], out[again], lam[again])
        step, used = step.index_copy(0, again, step_o), used.index_copy(0, again, used_o)
    return step, (step * (2 * g - (used @ step[:, :, None])[:, :, 0])).sum(1)


def step_to_bounds(x, step, lo, hi):
    """The largest t <= 1 that keeps x + t step inside [lo, hi], per curve [n].

    Parameters already on the bound that the step points out of are left out (their
    move is clipped away instead): they would allow no step at all.
    """
    room = torch.where(step > 0, hi - x, lo - x)
    t = torch.where((step != 0) & (room != 0), room / step, torch.ones_like(step))
    return t.amin(1).clamp(0.0, 1.0)


def trial(basis: Basis, x, y_w):
    """x [n, 4] clipped into the bounds, its exact weighted E, residuals and SSE."""
    x = clip(basis.bounds, x)
    e = exact_e(basis, x[:, 1] + x[:, 2])
    r = y_w - model_from_e(basis, x, e)
    return x, e, r, (r * r).sum(1)


def _outer(a, b):
    """Batched outer product of [n, k] and [n, k]: [n, k, k]."""
    return a[:, :, None] * b[:, None, :]
