"""The batched fast fit of an input delay (kinpet.fastfit.shifted, kinpet.fastfit.delay),
against independent references: the model with the input delayed
(InputFunction.delayed, then irreversible_2tc, itself checked against an ODE solver in
test_kinetics), finite differences of the exact curves and of the SSE, and the
per-curve profile search of kinpet.delayfit."""

import numpy as np
import pytest
import torch

from kinpet.delayfit import fit_with_delay
from kinpet.fastfit.delay import model_curves, newton_system, runner_up
from kinpet.fastfit.shifted import ShiftedModel, shifted_curves
from kinpet.fitting import STATUS_NONFINITE, fit, frame_weights
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import irreversible_2tc

FRAMES = FrameSchedule.paper()
PLASMA = InputFunction.feng(peak_kbq_per_ml=250.0, delay_s=5.0, end_s=FRAMES.end_s)
WHOLE_BLOOD = InputFunction.feng(peak_kbq_per_ml=180.0, delay_s=9.0, end_s=FRAMES.end_s)
PARAMS = np.array([[0.8, 0.9, 0.05, 0.05], [0.3, 0.4, 0.1, 0.2], [1.1, 2.5, 0.02, 0.3]])
DELAYS_S = (-10.0, -3.3, 0.0, 4.6, 17.25, 30.0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def at_delays(params, delays_s):
    """x [n, 5] for every pair of parameters and delays (the delay in min)."""
    rows = [np.r_[p, d / 60.0] for d in delays_s for p in params]
    return torch.as_tensor(np.array(rows))


def reference(params, delays_s, blood):
    return np.concatenate(
        [
            irreversible_2tc(params, PLASMA.delayed(d), FRAMES,
                             blood_function=None if blood is None else blood.delayed(d))
            for d in delays_s
        ]
    )  # fmt: skip


@pytest.mark.parametrize("blood", [None, WHOLE_BLOOD], ids=["one input", "whole blood"])
def test_shifted_model_is_the_model_with_the_input_delayed(blood):
    """Delays of both signs (a negative one drops what the tissue saw before t = 0),
    weighted by sqrt(w): within 1e-9 of the curve's maximum."""
    w = frame_weights(FRAMES, "duration_decay")
    model = ShiftedModel.make(PLASMA, FRAMES, w, blood)
    fitted, _ = model_curves(model, at_delays(PARAMS, DELAYS_S))
    got = fitted.numpy() / np.sqrt(w)
    ref = reference(PARAMS, DELAYS_S, blood)
    rel = np.abs(got - ref) / np.abs(ref).max(axis=1, keepdims=True)
    assert rel.max() < 1e-9


def test_delay_derivatives_match_finite_differences():
    """First and second derivatives in the delay against central differences of the
    exact curves: the first with a step of 1e-5 min (truncation ~h^2, round-off ~1e-16/h),
    the second of 1e-4 min (round-off ~1e-16/h^2), each relative to the curve's maximum.
    The delays put no frame boundary within a step of an input knot, where the slope of
    the input jumps."""
    model = ShiftedModel.make(PLASMA, FRAMES, np.ones(len(FRAMES)), WHOLE_BLOOD)
    beta = torch.tensor([0.3, 1.0, 2.9], dtype=torch.float64).repeat(3)
    d = torch.tensor([-7.1, 6.3, 21.7], dtype=torch.float64).repeat_interleave(3) / 60.0
    c = shifted_curves(model, beta, d)
    for name in ("i", "a", "e"):
        value = getattr(c, name)
        scale = value.abs().amax(1, keepdim=True)
        for order, h, tolerance in ((1, 1e-5, 1e-7), (2, 1e-4, 1e-5)):
            plus, minus = (getattr(shifted_curves(model, beta, d + s), name) for s in (h, -h))
            if order == 1:
                exact, fd = getattr(c, "d" + name), (plus - minus) / (2 * h)
            else:
                exact, fd = getattr(c, "d2" + name), (plus - 2 * value + minus) / h**2
            assert ((exact - fd).abs() / scale).max() < tolerance, (name, order)


def test_newton_system_is_the_derivative_of_the_sse():
    """J^T r is minus the gradient of SSE / 2 and the Hessian its Jacobian, against
    central differences in all five parameters (relative steps 1e-5 and 1e-4)."""
    model = ShiftedModel.make(PLASMA, FRAMES, frame_weights(FRAMES, "duration"), WHOLE_BLOOD)
    truth = at_delays(PARAMS, (8.3,))
    rng = np.random.default_rng(5)
    y, _ = model_curves(model, truth)
    y = y + torch.as_tensor(rng.normal(0, 2.0, y.shape))
    x = truth * torch.tensor([1.1, 0.9, 1.2, 0.8, 1.3], dtype=torch.float64)

    def half_sse(v):
        r = y - model_curves(model, v)[0]
        return 0.5 * (r * r).sum(1)

    def gradient(v, step=1e-5):
        cols = []
        for j in range(5):
            e = torch.zeros_like(v)
            e[:, j] = step * v[:, j]
            cols.append((half_sse(v + e) - half_sse(v - e)) / (2 * e[:, j]))
        return torch.stack(cols, dim=1)

    r = y - model_curves(model, x)[0]
    hess, g, _ = newton_system(model, x, r)
    grad = gradient(x)
    assert ((g + grad).abs() / grad.abs().amax(1, keepdim=True)).max() < 1e-6
    fd_hess = []
    for j in range(5):
        e = torch.zeros_like(x)
        e[:, j] = 1e-4 * x[:, j]
        fd_hess.append((gradient(x + e) - gradient(x - e)) / (2 * e[:, j : j + 1]))
    fd_hess = torch.stack(fd_hess, dim=2)
    scale = hess.abs().amax((1, 2), keepdim=True)
    assert ((hess - fd_hess).abs() / scale).max() < 1e-5


def test_batched_delay_fit_matches_the_profile_search():
    """Noisy curves at delays of -8 to 28 s: the batched fit's SSE is no higher than the
    per-curve profile search's (a grid 1 s apart, then Brent per curve, each point a full
    fit; its tolerance 1e-3 s) beyond 1e-6 for nearly all curves. Where the SSE over the
    delay has two minima, the two grids may start in different ones: those few may differ,
    but by less than 1 %. The delays found agree within 0.5 s where the SSEs agree."""
    rng = np.random.default_rng(11)
    n = 24
    params = np.column_stack(
        [rng.uniform(0.2, 1.2, n), rng.uniform(0.2, 2.0, n), rng.uniform(0.01, 0.2, n),
         rng.uniform(0.01, 0.3, n)]
    )  # fmt: skip
    delays = rng.uniform(-8, 28, n)
    pairs = zip(params, delays, strict=True)
    y = np.stack([irreversible_2tc(p, PLASMA.delayed(d), FRAMES) for p, d in pairs])
    y = y + rng.normal(0, 0.03, y.shape) * y.max(axis=1, keepdims=True)
    batched = fit(y, PLASMA, FRAMES, weights="duration", delay_bounds_s=(-10, 30))
    profile = fit_with_delay(y, PLASMA, FRAMES, (-10, 30), 1.0, method="fast", weights="duration")
    ratio = batched.sse / profile.sse
    agree = ratio <= 1 + 1e-6
    assert agree.mean() >= 0.9 and ratio.max() < 1.01
    assert np.abs(batched.delay_s - profile.delay_s)[agree].max() < 0.5
    # 3 % noise moves single delays by up to ~15 s (both searches alike), not the median.
    assert batched.ok.all() and np.median(np.abs(batched.delay_s - delays)) < 3.0


def test_batched_delay_fit_keeps_screening_chunks_and_a_fixed_delay():
    """A broken curve gets NaN and its status; chunks of 2 give the same numbers as one
    chunk; lo = hi holds the delay there; a fixed Vb is held."""
    y = irreversible_2tc(PARAMS, PLASMA.delayed(12.0), FRAMES)
    y = np.vstack([y, np.full(len(FRAMES), np.nan)])
    one = fit(y, PLASMA, FRAMES, delay_bounds_s=(0, 25))
    assert one.ok.tolist() == [True] * 3 + [False] and one.status[3] == STATUS_NONFINITE
    assert np.isnan(one.delay_s[3]) and np.isnan(one.params[3]).all()
    np.testing.assert_allclose(one.delay_s[:3], 12.0, atol=1e-3)
    np.testing.assert_allclose(one.params[:3], PARAMS, rtol=1e-5)
    chunked = fit(y, PLASMA, FRAMES, delay_bounds_s=(0, 25), chunk_size=2)
    np.testing.assert_allclose(chunked.params[:3], one.params[:3], rtol=1e-12)
    held = fit(y[:3], PLASMA, FRAMES, delay_bounds_s=(7, 7), fixed={"Vb": 0.1})
    assert (held.delay_s == 7.0).all() and (held.params[:, 3] == 0.1).all()
    plain = fit(y[:3], PLASMA.delayed(7.0), FRAMES, fixed={"Vb": 0.1})
    np.testing.assert_allclose(held.sse, plain.sse, rtol=1e-6)


def test_runner_up_finds_the_second_local_minimum_within_the_tolerance():
    """Gains over 7 grid delays: the second start is the best local maximum that is not
    the best or its neighbour (an end counts), and it is polished only where its grid SSE
    is within the tolerance of the best one's."""
    top = torch.tensor(
        [
            [1.0, 5.0, 9.0, 8.0, 3.0, 7.0, 2.0],  # peaks at 2 and 5
            [1.0, 5.0, 9.0, 8.0, 3.0, 2.0, 4.0],  # peaks at 2 and the end 6
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 9.0],  # one peak: no second start
        ],
        dtype=torch.float64,
    )
    best = top.argmax(1)
    yy = torch.full((3,), 10.0, dtype=torch.float64)
    second, again = runner_up(top, best, yy, 2.0)  # best SSE 1: within 3
    assert second[:2].tolist() == [5, 6] and again.tolist() == [True, False, False]
    _, again = runner_up(top, best, yy, 6.0)  # the end's SSE 6 is within 7
    assert again.tolist() == [True, True, False]
