"""The exact model with an input delay of its own for every curve: the undelayed response
read at shifted times.

A tissue that sees the input d later responds as it would to the undelayed input, d
later: with the input A(s - d), I_d(t) = P(t - d) and E_d(t) = G(t - d), where

    P(u) = int_0^u A,   G(u) = int_0^u A(s) exp(-beta (u - s)) ds,

both 0 for u <= 0. A frame's average is then a difference of the integrals
Q(u) = int_0^u P and H(u) = int_0^u G at its start and end moved by -d, per curve, with no
new knots. A negative d means the tissue saw the input |d| earlier than the scan's clock;
as in :meth:`kinpet.inputfunction.InputFunction.delayed`, what it saw before t = 0 is
dropped, which subtracts P(|d|) from I_d and exp(-beta t) G(|d|) from E_d.

Because A is piecewise linear, A, P and Q are polynomials between its knots, and G and H
follow from their values at the knots by the same closed forms as
:mod:`kinpet.kinetics` (the phi functions). Everything is exact and in float64; the
derivatives in d are exact too (dQ(t - d)/dd = -P(t - d), dH/dd = -G).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import phi_functions


@dataclass(frozen=True)
class Knots:
    """A piecewise-linear input at its knots (minutes), with what does not depend on beta.

    Attributes
    ----------
    t : torch.Tensor, shape [K + 1]
        Knot times, min; t[0] = 0. After the last knot the input is held.
    a, slope : torch.Tensor, shape [K + 1]
        The input at the knots and its slope after each (0 after the last knot).
    p, q : torch.Tensor, shape [K + 1]
        P = int A and Q = int P at the knots.
    h : torch.Tensor, shape [K]
        Lengths of the segments between knots, min.
    """

    t: torch.Tensor
    a: torch.Tensor
    slope: torch.Tensor
    p: torch.Tensor
    q: torch.Tensor
    h: torch.Tensor

    @classmethod
    def make(cls, input_function: InputFunction, device) -> Knots:
        t = input_function.knots_s / 60.0
        a = input_function.knot_values.astype(np.float64)
        if t[0] > 0:  # knots start at 0 by construction; kept general
            t, a = np.concatenate([[0.0], t]), np.concatenate([[0.0], a])
        h = np.diff(t)
        slope = np.concatenate([np.diff(a) / h, [0.0]])
        p = np.concatenate([[0.0], np.cumsum(h * (a[:-1] + a[1:]) / 2)])
        q = np.concatenate([[0.0], np.cumsum(h * p[:-1] + h**2 * (2 * a[:-1] + a[1:]) / 6)])
        dd = {"device": device, "dtype": torch.float64}
        return cls(*(torch.as_tensor(v, **dd) for v in (t, a, slope, p, q, h)))


def knot_convolutions(knots: Knots, beta):
    """G and H = int G at the knots for beta [n] (1/min): two tensors [n, K + 1].

    Over a segment of length h from knot k, with x = beta h and the input rising by da:
    G_{k+1} = e^-x G_k + a_k h phi1 + da h phi2, and the integral of G over it is
    G_k h phi1 + a_k h^2 phi2 + da h^2 phi3 (as :mod:`kinpet.kinetics`).
    """
    h = knots.h
    x = beta[:, None] * h
    phi1, phi2, phi3 = phi_functions(x)
    da = knots.a[1:] - knots.a[:-1]
    a0 = knots.a[:-1]
    source = h * (a0 * phi1 + da * phi2)  # [n, K]
    decay = torch.exp(-x)
    g = [torch.zeros_like(beta)]
    for s, dec in zip(source.unbind(1), decay.unbind(1), strict=True):
        g.append(torch.addcmul(s, dec, g[-1]))
    g = torch.stack(g, dim=1)
    step_h = g[:, :-1] * (h * phi1) + h * h * (a0 * phi2 + da * phi3)
    return g, torch.cat([torch.zeros_like(beta)[:, None], step_h.cumsum(1)], dim=1)


@dataclass(frozen=True)
class Reading:
    """Values at points u >= 0 (min), each [n, M]: the input A, its slope, P, Q, and (with
    beta) G and H."""

    a: torch.Tensor
    slope: torch.Tensor
    p: torch.Tensor
    q: torch.Tensor
    g: torch.Tensor | None = None
    h: torch.Tensor | None = None


def read(knots: Knots, u, beta=None, conv=None) -> Reading:
    """A, its slope, P, Q (and G, H when ``beta`` [n] and ``conv`` =
    :func:`knot_convolutions` are given) at points u [n, M] >= 0, min."""
    seg = (torch.searchsorted(knots.t, u.contiguous(), right=True) - 1).clamp(0, len(knots.t) - 1)
    h = u - knots.t[seg]
    a0, m, p0 = knots.a[seg], knots.slope[seg], knots.p[seg]
    a = a0 + m * h
    p = p0 + h * (a0 + m * h / 2)
    q = knots.q[seg] + h * (p0 + h * (a0 / 2 + m * h / 6))
    if beta is None:
        return Reading(a, m, p, q)
    g_k, h_k = (c.gather(1, seg) for c in conv)
    x = beta[:, None] * h
    phi1, phi2, phi3 = phi_functions(x)
    g = torch.exp(-x) * g_k + h * (a0 * phi1 + m * h * phi2)
    hh = h_k + h * (g_k * phi1 + h * (a0 * phi2 + m * h * phi3))
    return Reading(a, m, p, q, g, hh)


@dataclass(frozen=True)
class ShiftedModel:
    """The model for one input (and whole blood for the Vb term), one frame schedule and
    frame weights, with a delay per curve (:func:`shifted_curves`).

    Frame starts and ends are read once each where frames touch: ``times`` [M] holds the
    distinct ones (min), ``start_index`` and ``end_index`` [F] point into it.
    """

    knots: Knots
    blood: Knots | None
    times: torch.Tensor
    start_index: torch.Tensor
    end_index: torch.Tensor
    starts: torch.Tensor
    durations: torch.Tensor
    sqrt_w: torch.Tensor

    @classmethod
    def make(
        cls,
        input_function: InputFunction,
        frames: FrameSchedule,
        w,
        blood_function: InputFunction | None = None,
        device=None,
    ) -> ShiftedModel:
        """``w`` [F]: frame weights (the curves come out multiplied by sqrt(w))."""
        device = torch.device(device or "cpu")
        dd = {"device": device, "dtype": torch.float64}
        blood = None if blood_function is None else Knots.make(blood_function, device)
        times = np.unique(np.concatenate([frames.starts_min, frames.ends_min]))
        index = {"device": device, "dtype": torch.int64}
        return cls(
            knots=Knots.make(input_function, device),
            blood=blood,
            times=torch.as_tensor(times, **dd),
            start_index=torch.as_tensor(np.searchsorted(times, frames.starts_min), **index),
            end_index=torch.as_tensor(np.searchsorted(times, frames.ends_min), **index),
            starts=torch.as_tensor(frames.starts_min, **dd),
            durations=torch.as_tensor(frames.durations_min, **dd),
            sqrt_w=torch.as_tensor(np.sqrt(np.asarray(w, dtype=np.float64)), **dd),
        )


@dataclass(frozen=True)
class Curves:
    """Weighted frame averages [n, F] of I, A (whole blood) and E at each curve's delay,
    and their first (``di``, ...) and second (``d2i``, ...) derivatives in the delay
    (per minute and per minute squared)."""

    i: torch.Tensor
    a: torch.Tensor
    e: torch.Tensor
    di: torch.Tensor
    da: torch.Tensor
    de: torch.Tensor
    d2i: torch.Tensor
    d2a: torch.Tensor
    d2e: torch.Tensor


def shifted_curves(model: ShiftedModel, beta, delay_min) -> Curves:
    """I, A and E_beta averaged over each frame with the input delayed by ``delay_min`` [n]
    (min; positive: later), at beta [n] (1/min), weighted, with their d-derivatives.

    With u = t - d, a frame's average of I is (Q(u_end) - Q(u_start)) / duration, of A
    (P(u_end) - P(u_start)) / duration, of E (H(u_end) - H(u_start)) / duration, less
    the part seen before t = 0 when d < 0 (module docstring). In d they differentiate
    to the values one order down, with the sign of -d.
    """
    d = delay_min[:, None]
    shifted = model.times - d  # [n, M]
    inside = (shifted > 0).to(beta.dtype)
    early = (-delay_min).clamp(min=0.0)[:, None]  # |d| for d < 0, else 0
    m = shifted.shape[1]
    conv = knot_convolutions(model.knots, beta)
    at = read(model.knots, torch.cat([shifted.clamp(min=0.0), early], dim=1), beta, conv)
    b = beta[:, None]
    before = (delay_min < 0).to(beta.dtype)[:, None]
    a_0, m_0, p_0, g_0 = (v[:, m:] for v in (at.a, at.slope, at.p, at.g))
    g_rate = at.a - b * at.g  # dG/du
    # The frame average of exp(-beta t), for what the tissue saw before t = 0.
    decay_avg = torch.exp(-b * model.starts) * phi_functions(b * model.durations)[0]

    def average(v):
        """Frame averages of the derivative of v [n, M] (its values at the times)."""
        v = v[:, :m]
        return (v[:, model.end_index] - v[:, model.start_index]) / model.durations

    def inside_average(v):
        return average(v[:, :m] * inside)

    i = average(at.q) - p_0
    e = average(at.h) - g_0 * decay_avg
    di = -inside_average(at.p) + before * a_0
    de = -inside_average(at.g) + before * (a_0 - b * g_0) * decay_avg
    d2i = inside_average(at.a) - before * m_0
    d2e = inside_average(g_rate) - before * (m_0 - b * (a_0 - b * g_0)) * decay_avg
    blood = at if model.blood is None else read(model.blood, shifted.clamp(min=0.0))
    a = average(blood.p)
    da = -inside_average(blood.a)
    d2a = inside_average(blood.slope)
    w = model.sqrt_w
    return Curves(*(v * w for v in (i, a, e, di, da, de, d2i, d2a, d2e)))
