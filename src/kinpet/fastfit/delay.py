"""The fast fitter with an input delay fitted per curve, as a fifth parameter of the batch.

1. The start: on a grid of delays (each its own :class:`kinpet.fastfit.basis.Basis`, the
   input delayed by that much), the gain of every grid beta (:func:`kinpet.fastfit.grid.
   grid_gain`); each curve takes the delay whose best beta lowers its SSE most, refined by
   a parabola through its neighbours, and the beta refined at that grid delay; the linear
   parameters are then solved exactly at the curve's own delay. Where a second local
   minimum over the grid of delays is nearly as low (:func:`runner_up`), the curve is
   polished from there too, and the lower SSE kept.
2. The polish: projected Levenberg-Marquardt on (K1, k2, k3, Vb, delay) together, on the
   exact model with each curve's own delay (:mod:`kinpet.fastfit.shifted`), with the full
   Hessian as in the no-delay polish (:mod:`kinpet.fastfit.lm`). It is exact in K1, Vb and
   the delay; dE/dbeta and d2E/dbeta2 come from central differences of the exact E
   (relative step :data:`BETA_STEP`).

Only the frame-averaged model (``sampling="average"``) has this form; the other samplings
and the reversible model fit the delay on its profile (:mod:`kinpet.delayfit`).
"""

from __future__ import annotations

import numpy as np
import torch

from kinpet.fastfit.basis import Basis, make_basis
from kinpet.fastfit.driver import executor, torch_threads
from kinpet.fastfit.grid import GRID_BLOCK, choose_minimum, grid_gain, linear_fit, refine, to_params
from kinpet.fastfit.lm import projected_step, step_to_bounds
from kinpet.fastfit.shifted import ShiftedModel, shifted_curves
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import KineticModel

BLOCK = 4096  # curves started and polished together
# The start's grid of delays, s apart. The polish moves the delay continuously, so the
# grid only has to land each curve in the basin of its best delay; a finer one costs a
# basis and a grid search more per point.
START_DELAY_STEP_S = 2.5
BETA_STEP = 1e-4  # relative step of the central differences dE/dbeta
RTOL = 1e-8  # converged when a step lowers the SSE by less than this, relatively
START_DAMPING = 1e-3
# A second local minimum over the delay grid whose grid SSE is within this fraction of the
# best grid SSE is polished too (:func:`runner_up`).
SECOND_START_TOLERANCE = 0.1


def delay_grid(bases: list[Basis], y_w):
    """Gains over the start's grid of delays for weighted curves y_w [n, F].

    ``bases`` [G] hold the model with the input delayed by each grid delay. Returns the
    best gain over beta at each grid delay [n, G], the refined log beta there [n, G]
    (:func:`kinpet.fastfit.grid.refine`, the tie rule included) and ||y_w||^2 [n].
    """
    yy = (y_w * y_w).sum(1)
    top, log_beta = [], []
    for b in bases:
        t, lb = [], []
        for part, part_yy in zip(y_w.split(GRID_BLOCK), yy.split(GRID_BLOCK), strict=True):
            gain = grid_gain(b, part)
            t.append(gain.amax(1))
            best = choose_minimum(gain, part_yy, b.start_distance, b.tie_tolerance)
            lb.append(refine(gain, best, b.log_betas))
        top.append(torch.cat(t))
        log_beta.append(torch.cat(lb))
    return torch.stack(top, dim=1), torch.stack(log_beta, dim=1), yy


def runner_up(top, best, yy, tolerance: float):
    """The second start over the delay grid: per curve, the grid delay [n] of the best
    local minimum of the SSE (maximum of ``top`` [n, G]) that is neither ``best`` nor its
    neighbour, and whether to polish there [n]: where its grid SSE is within
    ``tolerance`` x the best grid SSE (``yy`` [n]: ||y_w||^2, so that SSE = yy - gain).

    The SSE over the delay can have two minima (the peak of the input matched against
    either of two rises of the curve); the best grid point does not always lie in the
    basin of the better one once polished.
    """
    g = top.shape[1]
    none = torch.full_like(top[:, :1], -torch.inf)
    left = torch.cat([none, top[:, :-1]], dim=1)
    right = torch.cat([top[:, 1:], none], dim=1)
    peak = (top >= left) & (top > right)
    far = (torch.arange(g, device=top.device)[None, :] - best[:, None]).abs() > 1
    candidate = torch.where(peak & far, top, -torch.inf)
    second = candidate.argmax(1)
    sse_best = yy - top.gather(1, best[:, None])[:, 0]
    sse_second = yy - candidate.gather(1, second[:, None])[:, 0]
    return second, torch.isfinite(sse_second) & (sse_second <= (1 + tolerance) * sse_best)


def delay_start(bases: list[Basis], delays_min, model: ShiftedModel, y_w, top, log_beta, best):
    """Start (K1, k2, k3, Vb, delay) [n, 5] for weighted curves y_w [n, F] at grid delay
    ``best`` [n] (index into ``delays_min`` [G], min) of :func:`delay_grid`'s ``top`` and
    ``log_beta`` [n, G].

    The delay is the vertex of the parabola through the best gains at ``best`` and its
    neighbours, the beta the refined grid beta at ``best``; the linear parameters are then
    solved exactly at the curve's own delay.
    """
    delays = torch.as_tensor(delays_min, dtype=y_w.dtype, device=y_w.device)
    delay = refine(top, best, delays)
    beta = torch.exp(log_beta.gather(1, best[:, None])[:, 0])
    c = shifted_curves(model, beta, delay)
    _, p = linear_fit(bases[0], y_w, c.e, beta, (c.i, c.a))
    return torch.cat([to_params(bases[0], p, beta), delay[:, None]], dim=1)


def fit_block(bases, delays_min, model, y_w, lo, hi, steps: int):
    """(K1, k2, k3, Vb, delay) [n, 5] and weighted SSE [n] of weighted curves y_w [n, F]:
    polished from the best grid delay and, where :func:`runner_up` finds a second start
    nearly as good, from there too; the lower SSE is kept."""
    top, log_beta, yy = delay_grid(bases, y_w)
    best = top.argmax(1)
    x = delay_start(bases, delays_min, model, y_w, top, log_beta, best)
    sse = polish_delayed(model, y_w, x, lo, hi, steps)
    second, again = runner_up(top, best, yy, SECOND_START_TOLERANCE)
    idx = torch.nonzero(again)[:, 0]
    if idx.numel():
        y2 = y_w[idx]
        x2 = delay_start(bases, delays_min, model, y2, top[idx], log_beta[idx], second[idx])
        sse2 = polish_delayed(model, y2, x2, lo, hi, steps)
        better = sse2 < sse[idx]
        x[idx[better]] = x2[better]
        sse[idx[better]] = sse2[better]
    return x, sse


def model_curves(model: ShiftedModel, x):
    """Weighted model [n, F] at x [n, 5] and the shifted curves it was made of."""
    k1, k2, k3, vb, d = x.unbind(1)
    beta = k2 + k3
    c = shifted_curves(model, beta, d)
    u = (1 - vb) * k1 / beta
    return u[:, None] * (k3[:, None] * c.i + k2[:, None] * c.e) + vb[:, None] * c.a, c


def newton_system(model: ShiftedModel, x, r):
    """Hessian of SSE / 2 [n, 5, 5], J^T r [n, 5] and J^T J [n, 5, 5] at x [n, 5], with
    ``r`` [n, F] the weighted residuals there.

    As :func:`kinpet.fastfit.lm.newton_system`, with C = c_I I + c_E E + Vb A
    (c_I = u q, c_E = u (1 - q), u = (1 - Vb) K1, q = k3 / beta) and I, A, E functions of
    the delay too: dC/dd = c_I I_d + c_E E_d + Vb A_d. The full Hessian
    J^T J - sum r Hess(C) needs r against every second derivative of the curves; dE/dbeta
    and d2E/dbeta2 (and d2E/dbeta dd) come from central differences of the exact E.
    """
    n = x.shape[0]
    k1, k2, k3, vb, d = x.unbind(1)
    beta = k2 + k3
    hb = BETA_STEP * beta
    c3 = shifted_curves(model, torch.cat([beta, beta + hb, beta - hb]), torch.cat([d, d, d]))

    def split(v):
        return v[:n], v[n : 2 * n], v[2 * n :]

    e, e_p, e_m = split(c3.e)
    _, de_p, de_m = split(c3.de)
    h = hb[:, None]
    e_b = (e_p - e_m) / (2 * h)
    e_bb = (e_p - 2 * e + e_m) / (h * h)
    e_bd = (de_p - de_m) / (2 * h)
    i, a, di, da, de = (v[:n] for v in (c3.i, c3.a, c3.di, c3.da, c3.de))
    d2i, d2a, d2e = (v[:n] for v in (c3.d2i, c3.d2a, c3.d2e))

    q = k3 / beta
    u = (1 - vb) * k1
    zero, one = torch.zeros_like(k1), torch.ones_like(k1)
    grad_u = torch.stack([1 - vb, zero, zero, -k1, zero], dim=1)
    grad_q = torch.stack([zero, -q / beta, (1 - q) / beta, zero, zero], dim=1)
    grad_beta = torch.stack([zero, one, one, zero, zero], dim=1)
    unit_vb = torch.stack([zero, zero, zero, one, zero], dim=1)
    unit_d = torch.stack([zero, zero, zero, zero, one], dim=1)
    c_i, c_e = u * q, u * (1 - q)
    grad_ci = q[:, None] * grad_u + u[:, None] * grad_q
    grad_ce = (1 - q)[:, None] * grad_u - u[:, None] * grad_q

    def col(v):
        return v[:, :, None]

    def row(v):
        return v[:, None, :]

    # J [n, 5, F]: the rate parameters through the coefficients, the delay through the curves.
    jac = (
        col(grad_ci) * row(i)
        + col(grad_ce) * row(e)
        + col(unit_vb) * row(a)
        + col(c_e[:, None] * grad_beta) * row(e_b)
        + col(unit_d) * row(c_i[:, None] * di + c_e[:, None] * de + vb[:, None] * da)
    )
    jtj = jac @ jac.transpose(1, 2)
    g = (jac @ r[:, :, None])[:, :, 0]
    curves = torch.stack([i, e, e_b, e_bb, di, da, de, e_bd, d2i, d2a, d2e], dim=1)
    r_i, r_e, r_b, r_bb, r_di, r_da, r_de, r_bd, r_d2i, r_d2a, r_d2e = (curves @ r[:, :, None])[
        :, :, 0
    ].unbind(1)

    def outer(p, s):
        return p[:, :, None] * s[:, None, :]

    def sym(p, s):
        return outer(p, s) + outer(s, p)

    def times(v, m):
        return v[:, None, None] * m

    b3 = beta**3
    hess_q = torch.zeros(n, 5, 5, dtype=x.dtype, device=x.device)
    hess_q[:, 1, 1] = 2 * k3 / b3
    hess_q[:, 1, 2] = hess_q[:, 2, 1] = (k3 - k2) / b3
    hess_q[:, 2, 2] = -2 * k2 / b3
    s = times(r_i - r_e, sym(grad_u, grad_q) + times(u, hess_q))
    s += times(r_b, sym(grad_ce, grad_beta)) + times(r_bb * c_e, outer(grad_beta, grad_beta))
    k_uu = -(r_i * q + r_e * (1 - q))  # Hess(u): only d2u / dK1 dVb = -1
    s[:, 0, 3] += k_uu
    s[:, 3, 0] += k_uu
    # Mixed in the delay: d/dx_j of dC/dd, and d2C/dd2.
    mixed = (
        r_di[:, None] * grad_ci
        + r_de[:, None] * grad_ce
        + r_da[:, None] * unit_vb
        + (r_bd * c_e)[:, None] * grad_beta
    )
    s += sym(mixed, unit_d)
    s[:, 4, 4] += c_i * r_d2i + c_e * r_d2e + vb * r_d2a
    return jtj - s, g, jtj


def polish_delayed(model: ShiftedModel, y_w, x, lo, hi, steps: int):
    """Projected LM on x [n, 5] (updated in place) for weighted curves y_w [n, F].

    ``lo``, ``hi`` [5]: bounds (the delay in min). Each step as
    :func:`kinpet.fastfit.lm.polish`: the full Hessian where its damped free block is
    positive definite (else J^T J), parameters on a bound that the gradient or the step
    points out of held, the step shortened to stop at the first bound it meets, kept only
    if it lowers the SSE. Returns the weighted SSE [n].
    """
    x.copy_(torch.minimum(torch.maximum(x, lo), hi))
    fitted, _ = model_curves(model, x)
    r = y_w - fitted
    sse = (r * r).sum(1)
    lam = torch.full_like(sse, START_DAMPING)
    fixed = lo == hi
    active = torch.nonzero(sse > 0)[:, 0]
    for _ in range(steps):
        if not active.numel():
            break
        xa, ra, sse_a, lam_a = x[active], r[active], sse[active], lam[active]
        hess, g, jtj = newton_system(model, xa, ra)
        step, pred = projected_step(hess, jtj, g, xa, lo, hi, lam_a, fixed)
        step = step * step_to_bounds(xa, step, lo, hi)[:, None]
        trial_x = torch.minimum(torch.maximum(xa + step, lo), hi)
        fitted_t, _ = model_curves(model, trial_x)
        r_t = y_w[active] - fitted_t
        sse_t = (r_t * r_t).sum(1)
        accept = sse_t < sse_a
        done = (accept & ((sse_a - sse_t) <= RTOL * sse_a)) | (lam_a > 1e10) | (sse_t == 0)
        done |= (pred <= RTOL * sse_a) & (lam_a <= 1.0)
        acc = accept[:, None]
        x[active] = torch.where(acc, trial_x, xa)
        r[active] = torch.where(acc, r_t, ra)
        sse[active] = torch.where(accept, sse_t, sse_a)
        lam[active] = torch.where(accept, lam_a / 10, lam_a * 10)
        active = active[~done]
    return sse


def fit_delayed_curves(
    tacs,
    input_function: InputFunction,
    frames: FrameSchedule,
    w,
    lo,
    hi,
    delays_s,
    *,
    blood_function: InputFunction | None = None,
    start_beta: float,
    tie_tolerance: float,
    beta_grid,
    device=None,
    chunk_size: int,
    lm_iterations: int,
    workers: int | None = None,
):
    """Fit curves with a delay each; params [N, 4], weighted SSE [N] and delay [N] (s).

    Parameters
    ----------
    tacs : array_like, shape [N, F]
        Curves that passed :func:`kinpet.fitting.screen_curves`.
    input_function, frames, w, blood_function
        The model's inputs as measured (delay 0), its frames and frame weights.
    lo, hi : array_like, shape [5]
        Bounds of (K1, k2, k3, Vb) and of the delay (s).
    delays_s : array_like, shape [G]
        The grid of delays of the start, s, from lo[4] to hi[4].
    start_beta, tie_tolerance, beta_grid, device, chunk_size, lm_iterations, workers
        As for :func:`kinpet.fastfit.driver.fit_curves`.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = 1 if device.type != "cpu" else (workers or torch.get_num_threads())
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    delays_min = np.asarray(delays_s, dtype=np.float64) / 60.0
    n = len(tacs)
    params, sse, delay = np.empty((n, 4)), np.empty(n), np.empty(n)
    threads = 1 if workers > 1 else None
    workers = max(1, min(workers, min(chunk_size, n) // BLOCK))
    with torch_threads(threads), executor(workers) as run:
        bases = [
            make_basis(
                KineticModel(
                    input_function.delayed(d * 60.0),
                    frames,
                    "average",
                    None if blood_function is None else blood_function.delayed(d * 60.0),
                ),
                w,
                lo[:4],
                hi[:4],
                start_beta=start_beta,
                tie_tolerance=tie_tolerance,
                beta_grid=beta_grid,
                device=device,
            )  # fmt: skip
            for d in delays_min
        ]
        model = ShiftedModel.make(input_function, frames, w, blood_function, device)
        dd = {"device": device, "dtype": torch.float64}
        lo_t = torch.as_tensor(np.r_[lo[:4], lo[4] / 60.0], **dd)
        hi_t = torch.as_tensor(np.r_[hi[:4], hi[4] / 60.0], **dd)

        def part(y):
            out = []
            for block in y.split(BLOCK):
                y_w = block * model.sqrt_w
                out.append(fit_block(bases, delays_min, model, y_w, lo_t, hi_t, lm_iterations))
            return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

        for begin in range(0, n, chunk_size):
            y = torch.as_tensor(np.asarray(tacs[begin : begin + chunk_size]), device=device)
            parts = y.to(torch.float64).tensor_split(max(1, min(workers, len(y) // BLOCK)))
            x, s = (torch.cat(v).cpu().numpy() for v in zip(*run(part, parts), strict=True))
            params[begin : begin + len(x)] = x[:, :4]
            sse[begin : begin + len(x)] = s
            delay[begin : begin + len(x)] = x[:, 4] * 60.0
    return params, sse, delay
