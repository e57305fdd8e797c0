"""The exact model against independent references: an ODE solver, the paper's discrete
algorithm restated with numpy.convolve, finite differences and closed forms."""

import numpy as np
import pytest
import torch
from conftest import REAL_TACS
from scipy.integrate import quad, solve_ivp

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import (
    PAPER_LOWER,
    PAPER_UPPER,
    KineticModel,
    irreversible_2tc,
    ki,
)


def random_params(n, seed):
    rng = np.random.default_rng(seed)
    p = rng.uniform(PAPER_LOWER, PAPER_UPPER, size=(n, 4))
    # Edge cases: k2 + k3 at its lower bound, Vb = 0 and Vb = 1, the largest rates.
    p[0] = [0.5, 0.01, 0.01, 0.0]
    p[1] = [2.0, 0.01, 0.01, 1.0]
    p[2] = [0.1, 3.0, 1.0, 0.0]
    p[3] = [1.0, 0.02, 0.01, 0.5]
    return p


def gamma_bolus(t_s):
    """A bolus-and-washout input, unlike Feng's, for a second input shape."""
    t = np.asarray(t_s) / 60.0
    return 300.0 * t**2 * np.exp(-3.0 * t) + 8.0 * np.exp(-0.01 * t) * (1 - np.exp(-5 * t))


def input_cases():
    paper = FrameSchedule.paper()
    # Finer than the frames: Feng's model sampled every second during the bolus.
    yield "feng-fine", InputFunction.feng(peak_kbq_per_ml=200.0, delay_s=12.0), paper
    # Coarser than the frames: one sample per frame at its mid-time (an image-derived input).
    yield "bolus-mids", InputFunction(paper.mids_s, gamma_bolus(paper.mids_s)), paper
    # A real measured aorta curve with its own 29-frame schedule.
    import pandas as pd

    table = pd.read_csv(REAL_TACS, sep="\t")
    frames = FrameSchedule(table.frame_start_s, table.frame_duration_s)
    yield "real-aorta", InputFunction(frames.mids_s, table.aorta_bq_per_ml / 1000.0), frames


def ode_reference(params, inp, frames, delay_s=0.0):
    """Frame averages and mid-time values by integrating the compartment ODEs
    (``params`` [N, 4] K1, k2, k3, Vb, or [N, 5] with k4 before Vb).

    State per parameter set: free F, bound B, and Q = int (F + B) dt, so that frame
    averages are differences of Q. Integrated knot to knot (the input has kinks there)
    with DOP853 at tight tolerances; the blood term is integrated with quad. With
    ``delay_s`` the tissue and the blood term see A(t - delay_s) (0 before injection).
    """
    if params.shape[1] == 5:  # the reversible model: K1, k2, k3, k4, Vb
        k1, k2, k3, k4, vb = (params[:, i] for i in range(5))
    else:
        k1, k2, k3, vb = (params[:, i] for i in range(4))
        k4 = np.zeros_like(k1)
    knots = np.unique(
        np.concatenate(
            [inp.knots_s + delay_s, frames.starts_s, frames.ends_s, frames.mids_s, [0.0]]
        )
    )
    knots = knots[(knots >= 0) & (knots <= frames.end_s)] / 60.0
    m = params.shape[0]

    def a_of(t):
        return np.interp(t * 60.0 - delay_s, inp.knots_s, inp.knot_values, left=0.0)

    def rhs(t, y):
        f, b = y[:m], y[m : 2 * m]
        a = a_of(t)
        return np.concatenate([k1 * a - (k2 + k3) * f + k4 * b, k3 * f - k4 * b, f + b])

    y = np.zeros(3 * m)
    states = {0.0: y}
    for t0, t1 in zip(knots[:-1], knots[1:], strict=True):
        sol = solve_ivp(rhs, (t0, t1), y, method="DOP853", rtol=1e-12, atol=1e-12)
        y = sol.y[:, -1]
        states[t1] = y
    ts, te, tm = frames.starts_min, frames.ends_min, frames.mids_min
    q = np.array([[states[t][2 * m :] for t in row] for row in (ts, te)])  # [2, F, m]
    ct_avg = (q[1] - q[0]) / frames.durations_min[:, None]
    a_avg = np.array(
        [
            quad(a_of, s, e, points=knots[(knots > s) & (knots < e)], limit=500, epsabs=1e-13)[0]
            / (e - s)
            for s, e in zip(ts, te, strict=True)
        ]
    )
    average = (1 - vb) * ct_avg + vb * a_avg[:, None]
    ct_mid = np.array([states[t][:m] + states[t][m : 2 * m] for t in tm])
    mid = (1 - vb) * ct_mid + vb * a_of(tm)[:, None]
    return average.T, mid.T


@pytest.mark.parametrize("case", ["feng-fine", "bolus-mids", "real-aorta"])
def test_exact_modes_match_ode_solution(case):
    name, inp, frames = next(c for c in input_cases() if c[0] == case)
    params = random_params(200, seed=1)
    ref_avg, ref_mid = ode_reference(params, inp, frames)
    for sampling, ref in (("average", ref_avg), ("mid", ref_mid)):
        model = irreversible_2tc(params, inp, frames, sampling=sampling)
        assert model.shape == (200, len(frames))
        peak = np.abs(ref).max(axis=1, keepdims=True)
        rel = np.abs(model - ref) / peak
        assert rel.max() < 1e-6, f"{name} {sampling}: worst relative error {rel.max():.2e}"


@pytest.mark.parametrize("case", ["feng-fine", "bolus-mids"])
@pytest.mark.parametrize("delay_s", [-7.5, 12.3])
def test_delayed_input_matches_ode_solution(case, delay_s):
    """The exact modes with the input delayed (InputFunction.delayed) against the ODEs
    integrated with A(t - delay): frame averages and mid-times within 1e-6 of the peak."""
    name, inp, frames = next(c for c in input_cases() if c[0] == case)
    params = random_params(50, seed=2)
    ref_avg, ref_mid = ode_reference(params, inp, frames, delay_s)
    for sampling, ref in (("average", ref_avg), ("mid", ref_mid)):
        model = irreversible_2tc(params, inp.delayed(delay_s), frames, sampling=sampling)
        rel = np.abs(model - ref) / np.abs(ref).max(axis=1, keepdims=True)
        assert rel.max() < 1e-6, f"{name} {sampling} {delay_s} s: {rel.max():.2e}"


def test_delayed_input_is_the_shifted_curve():
    inp = InputFunction.feng(peak_kbq_per_ml=200.0, delay_s=12.0)
    assert inp.delayed(0.0) is inp
    t = np.linspace(0, 3900, 7801)
    for d in (-20.0, 3.7, 30.0):
        np.testing.assert_allclose(
            inp.delayed(d)(t), np.interp(t - d, inp.knots_s, inp.knot_values, left=0.0),
            atol=1e-12 * inp.values.max(),
        )  # fmt: skip
    with pytest.raises(ValueError, match="finite"):
        inp.delayed(float("nan"))


def paper_reference(params, inp, frames):
    """The paper's discrete model, restated directly from docs/model.md ("paper")."""
    starts = np.round(frames.starts_s / 60.0, 2)
    t = np.arange(starts[0], starts[-1], 0.1)

    def lin_extrap(x, xp, fp):
        y = np.interp(x, xp, fp)
        lo, hi = x < xp[0], x > xp[-1]
        y[lo] = fp[0] + (fp[1] - fp[0]) / (xp[1] - xp[0]) * (x[lo] - xp[0])
        y[hi] = fp[-1] + (fp[-1] - fp[-2]) / (xp[-1] - xp[-2]) * (x[hi] - xp[-1])
        return y

    a = lin_extrap(t, inp.times_s / 60.0, inp.values)
    out = []
    for k1, k2, k3, vb in params:
        h = k1 / (k2 + k3) * (k3 + k2 * np.exp(-(k2 + k3) * t))
        full = np.convolve(a, h)
        conv = np.concatenate([[0.0], 0.1 * full[: t.size - 1]])
        c = (1 - vb) * conv + vb * a
        out.append(lin_extrap(starts, t, c))
    return np.array(out)


@pytest.mark.parametrize("case", ["feng-fine", "bolus-mids"])
def test_paper_mode_matches_direct_discrete_convolution(case):
    _, inp, frames = next(c for c in input_cases() if c[0] == case)
    params = random_params(50, seed=2)
    ref = paper_reference(params, inp, frames)
    model = irreversible_2tc(params, inp, frames, sampling="paper")
    np.testing.assert_allclose(model, ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())


def test_paper_mode_differs_from_exact_model():
    # The paper's one-step delay and start-time sampling bias the early frames.
    _, inp, frames = next(input_cases())
    p = np.array([[0.65, 0.68, 0.0035, 0.01]])
    exact = irreversible_2tc(p, inp, frames)
    paper = irreversible_2tc(p, inp, frames, sampling="paper")
    assert np.abs(exact - paper).max() > 0.05 * exact.max()


@pytest.mark.parametrize("sampling", ["average", "mid", "paper"])
def test_numpy_and_torch_agree(sampling):
    _, inp, frames = next(input_cases())
    params = random_params(300, seed=3)
    ref = irreversible_2tc(params, inp, frames, sampling)
    assert isinstance(ref, np.ndarray) and ref.dtype == np.float64
    t64 = irreversible_2tc(torch.from_numpy(params), inp, frames, sampling)
    assert torch.is_tensor(t64) and t64.dtype == torch.float64
    np.testing.assert_allclose(t64.numpy(), ref, rtol=1e-12, atol=1e-12)
    t32 = irreversible_2tc(torch.from_numpy(params).float(), inp, frames, sampling)
    assert t32.dtype == torch.float32
    # float32: a few units of its 6e-8 epsilon, relative to each curve's peak.
    err = np.abs(t32.numpy() - ref) / np.abs(ref).max(axis=1, keepdims=True)
    assert err.max() < 2e-6


def test_batch_shape_and_chunking_are_transparent():
    _, inp, frames = next(input_cases())
    params = random_params(40000, seed=4)  # more than one internal chunk
    flat = irreversible_2tc(params, inp, frames)
    shaped = irreversible_2tc(params.reshape(200, 200, 4), inp, frames)
    assert shaped.shape == (200, 200, len(frames))
    np.testing.assert_array_equal(shaped.reshape(40000, -1), flat)
    single = irreversible_2tc(params[12345], inp, frames)
    np.testing.assert_allclose(single, flat[12345], rtol=1e-13)


@pytest.mark.parametrize("sampling", ["average", "mid", "paper"])
def test_torch_gradients_match_finite_differences(sampling):
    _, inp, frames = next(c for c in input_cases() if c[0] == "bolus-mids")
    model = KineticModel(inp, frames, sampling)
    p = torch.tensor(random_params(4, seed=5)[[0, 3]] * 0.9 + 0.05, dtype=torch.float64)
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(model, (p,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_float32_stays_finite_for_extreme_rates():
    _, inp, frames = next(input_cases())
    p = torch.tensor([[2.0, 3.0, 1.0, 0.0], [0.01, 0.01, 0.01, 0.0]], dtype=torch.float32)
    out = irreversible_2tc(p, inp, frames)
    assert torch.isfinite(out).all()


def test_blood_only_voxel_is_the_frame_averaged_input():
    _, inp, frames = next(input_cases())
    out = irreversible_2tc(np.array([0.3, 0.2, 0.1, 1.0]), inp, frames)
    ref = [
        quad(inp, s, e, limit=500)[0] / (e - s)
        for s, e in zip(frames.starts_s, frames.ends_s, strict=True)
    ]
    np.testing.assert_allclose(out, ref, rtol=1e-7, atol=1e-9)


def test_ki_closed_form():
    p = np.array([[0.6, 1.2, 0.1, 0.05], [0.1, 0.13, 0.06, 0.0]])
    np.testing.assert_allclose(ki(p), [0.6 * 0.1 / 1.3, 0.1 * 0.06 / 0.19])
    assert torch.is_tensor(ki(torch.from_numpy(p)))


def test_bad_arguments_are_explained():
    _, inp, frames = next(input_cases())
    with pytest.raises(ValueError, match="sampling must be one of"):
        irreversible_2tc(np.ones(4), inp, frames, sampling="start")
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 4\]"):
        irreversible_2tc(np.ones(3), inp, frames)
    with pytest.raises(TypeError, match="FrameSchedule"):
        irreversible_2tc(np.ones(4), inp, frames.starts_s)


def test_short_input_is_held_with_a_warning():
    frames = FrameSchedule.paper()
    inp = InputFunction([0.0, 60.0, 600.0], [0.0, 100.0, 10.0])
    with pytest.warns(UserWarning, match="held"):
        out = irreversible_2tc(np.array([0.0, 0.1, 0.1, 1.0]), inp, frames)
    np.testing.assert_allclose(out[-1], 10.0)
