"""Fitting (kinpet.fitting) and the fit-tacs command, against independent references:
known parameters of noise-free curves, scipy's bounded linear least squares, scipy's
curve_fit, and the weighted SSE recomputed by hand."""

import json
import math
from io import StringIO

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import curve_fit, lsq_linear, minimize

import kinpet.fastfit.lm as fastfit_lm
import kinpet.fitting as fitting
from kinpet.cli import main
from kinpet.fastfit import (
    ALL_FACES,
    GRID_FACES,
    bounded_lsq,
    choose_minimum,
    face_coefficients,
    grid_beta,
    grid_gain,
    linear_fit,
    make_basis,
    newton_system,
)
from kinpet.fastfit.basis import exact_e, model_from_e
from kinpet.fitting import (
    STATUS_ALL_ZERO,
    STATUS_NONFINITE,
    STATUS_OK,
    STATUS_TOO_FEW_POSITIVE,
    check_bounds,
    fit,
    frame_weights,
)
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction, InputFunctionError
from kinpet.kinetics import PAPER_LOWER, PAPER_UPPER, KineticModel, irreversible_2tc

FRAMES = FrameSchedule.paper()


# One torch thread for every test here (conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def idif():
    """An image-derived input: Feng's blood curve averaged per frame, at frame mid-times."""
    feng = InputFunction.feng(peak_kbq_per_ml=250.0, delay_s=10.0)
    blood = irreversible_2tc(np.array([0.0, 0.1, 0.1, 1.0]), feng, FRAMES)
    return InputFunction(FRAMES.mids_s, blood, source="idif")


def interior_params(n, seed):
    """Parameters well inside the paper's bounds, covering organs from brain to spleen."""
    rng = np.random.default_rng(seed)
    return rng.uniform([0.05, 0.05, 0.02, 0.0], [1.5, 2.5, 0.5, 0.4], size=(n, 4))


def noisy(curves, level, seed):
    """The reference noise model: Var = level^2 * C / duration (min), decay left out."""
    rng = np.random.default_rng(seed)
    sd = level * np.sqrt(np.abs(curves) / FRAMES.durations_min)
    return curves + rng.normal(size=curves.shape) * sd


def basis_for(idif, w=None, bounds=None, **kw):
    """The fast fitter's basis for the paper's frames (default weights and bounds)."""
    w = frame_weights(FRAMES) if w is None else w
    lo, hi = check_bounds(bounds)
    kw.setdefault("tie_tolerance", fitting.default_tie_tolerance(w))
    return make_basis(KineticModel(idif, FRAMES), w, lo, hi, start_beta=0.11, device="cpu", **kw)


# -- noise-free curves give back their parameters ---------------------------------------------


@pytest.mark.parametrize("sampling", ["average", "mid", "paper"])
def test_fast_recovers_noise_free_parameters(idif, sampling):
    truth = interior_params(150, seed=1)
    truth[0] = [0.1, 0.15, 0.06, 0.04]  # grey matter
    truth[1] = [1.5, 2.7, 0.03, 0.04]  # spleen-like, k2 near its bound
    y = irreversible_2tc(truth, idif, FRAMES, sampling=sampling)
    res = fit(y, idif, FRAMES, method="fast", sampling=sampling, device="cpu")
    assert res.ok.all()
    # Exact data and an exact model: only float64 round-off and the LM stopping rule
    # (relative SSE change 1e-10) are left, so 1e-6 relative is a tight but safe bar.
    np.testing.assert_allclose(res.params, truth, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(res.ki, truth[:, 0] * truth[:, 2] / truth[:, 1:3].sum(1), rtol=1e-6)
    assert (res.sse <= 1e-12 * (y**2).sum(1)).all()


def test_curve_fit_recovers_noise_free_parameters(idif):
    truth = np.array([[0.1, 0.15, 0.06, 0.04], [0.65, 0.68, 0.02, 0.01], [0.3, 1.2, 0.1, 0.1]])
    y = irreversible_2tc(truth, idif, FRAMES)
    res = fit(y, idif, FRAMES, method="curve_fit")
    assert res.ok.all()
    # curve_fit stops at its default tolerances (ftol = xtol = 1e-8) with forward
    # differences of relative step 1e-3 (the paper's diff_step): ~1e-4 relative.
    np.testing.assert_allclose(res.params, truth, rtol=1e-3, atol=1e-4)


# -- the linear step is the exact bounded least-squares solution -----------------------------


@pytest.mark.parametrize("vb_hi", [1.0 - 1e-9, 0.05])
def test_linear_step_equals_scipy_bounded_least_squares(idif, vb_hi):
    # The box problem in (p1, p2, p3) on I, E_beta and A: X1 = I, X2 = E. With Vb <= 0.05
    # the faces with Vb on its upper bound are the solution for many curves.
    basis = basis_for(idif, w=frame_weights(FRAMES, "duration"), beta_grid=[0.3])
    truth = interior_params(40, seed=2)
    truth[:10, 3] = 0.0  # Vb at its bound: faces with p3 = 0
    truth[10:20, 2] = 0.01  # small k3: p1 near 0
    y = noisy(irreversible_2tc(truth, idif, FRAMES), 0.5, seed=3)
    y_w = torch.from_numpy(y) * basis.sqrt_w
    i_w, e_w, a_w = basis.i_w, basis.e_w[0], basis.a_w
    k = face_coefficients(i_w @ i_w, i_w @ e_w, e_w @ e_w, i_w @ a_w, e_w @ a_w, a_w @ a_w)
    gain, p = bounded_lsq(k, y_w @ i_w, y_w @ e_w, y_w @ a_w, 0.0, vb_hi, solution=True)
    sse = (y_w * y_w).sum(1) - gain
    x = torch.stack([i_w, e_w, a_w], dim=1).numpy()
    on_upper = 0
    for j in range(y.shape[0]):
        ref = lsq_linear(x, y_w[j].numpy(), bounds=([0, 0, 0], [np.inf, np.inf, vb_hi]),
                         tol=1e-14, lsmr_tol="auto", max_iter=1000, method="bvls")  # fmt: skip
        ref_sse = float(np.sum((y_w[j].numpy() - x @ ref.x) ** 2))
        assert sse[j].item() == pytest.approx(ref_sse, rel=1e-7)
        np.testing.assert_allclose([v[j].item() for v in p], ref.x, rtol=1e-5, atol=1e-9)
        on_upper += ref.x[2] == pytest.approx(vb_hi)
    assert on_upper >= (10 if vb_hi < 0.5 else 0)


def test_linear_step_on_the_cone_equals_nnls(idif):
    # On a cone (W, U) with Vb fixed at 0 the problem is nonnegative least squares on
    # [W, U]: scipy's nnls. The grid's faces give the exact gain wherever they hold the
    # solution and a lower one elsewhere (mostly at betas far from the best), never a
    # higher one; the beta chosen from them is nearly always the one all faces choose
    # (docs/fitting.md).
    from scipy.optimize import nnls

    basis = basis_for(idif)
    y = noisy(irreversible_2tc(interior_params(60, seed=20), idif, FRAMES), 0.5, seed=21)
    y_w = torch.from_numpy(y) * basis.sqrt_w
    exact = grid_gain(basis, y_w, ALL_FACES)
    grid = grid_gain(basis, y_w, GRID_FACES)
    assert (grid <= exact * (1 + 1e-12) + 1e-12).all()
    yy = (y_w * y_w).sum(1)
    chosen = [
        choose_minimum(g, yy, basis.start_distance, basis.tie_tolerance) for g in (grid, exact)
    ]
    assert (chosen[0] == chosen[1]).float().mean() >= 0.95
    j = 25  # one beta; Vb fixed at 0 by its bounds
    rho_lo, rho_hi = basis.rho_lo[j], basis.rho_hi[j]
    w_curve = rho_hi * basis.i_w + (1 - rho_hi) * basis.e_w[j]
    u_curve = rho_lo * basis.i_w + (1 - rho_lo) * basis.e_w[j]
    x = torch.stack([w_curve, u_curve], dim=1).numpy()
    k = face_coefficients(*(a @ b for a, b in [(w_curve, w_curve), (w_curve, u_curve),
                          (u_curve, u_curve), (w_curve, basis.a_w), (u_curve, basis.a_w),
                          (basis.a_w, basis.a_w)]))  # fmt: skip
    gain = bounded_lsq(k, y_w @ w_curve, y_w @ u_curve, y_w @ basis.a_w, 0.0, 0.0)
    for i in range(y.shape[0]):
        _, residual = nnls(x, y_w[i].numpy())
        assert gain[i].item() == pytest.approx((y_w[i] @ y_w[i]).item() - residual**2, rel=1e-9)


def test_linear_step_with_k2_k3_bounds_equals_constrained_least_squares(idif):
    # At a fixed beta the bounds of k2 and k3 bound k3 / beta = p1 / (p1 + p2): linear
    # constraints on p. Reference: scipy's SLSQP on p with exactly these constraints.
    lo, hi = check_bounds()
    basis = basis_for(idif)
    beta = 0.7
    truth = np.array([[0.65, 0.69, 0.01, 0.02], [0.3, 0.6, 0.1, 0.05], [0.5, 0.45, 0.25, 0.0]])
    truth[0, 2] = 0.004  # k3 below its bound: the bound is active at the solution
    y = noisy(irreversible_2tc(truth, idif, FRAMES), 0.3, seed=11)
    y_w = torch.from_numpy(y) * basis.sqrt_w
    betas = torch.full((3,), beta, dtype=torch.float64)
    e = exact_e(basis, betas)
    gain, p = linear_fit(basis, y_w, e, betas)
    sse = (y_w * y_w).sum(1) - gain
    rho_lo = max(lo[2] / beta, 1 - hi[1] / beta)
    rho_hi = min(hi[2] / beta, 1 - lo[1] / beta)
    for k in range(3):
        x = torch.stack([basis.i_w, e[k], basis.a_w], dim=1).numpy()
        yk = y_w[k].numpy()
        scale = float(yk @ yk)
        cons = [
            {"type": "ineq", "fun": lambda q: q[0] - rho_lo * (q[0] + q[1])},
            {"type": "ineq", "fun": lambda q: rho_hi * (q[0] + q[1]) - q[0]},
        ]
        ref = minimize(lambda q, x=x, yk=yk, scale=scale: np.sum((yk - x @ q) ** 2) / scale,
                       x0=[0.01, 0.1, 0.05],
                       method="SLSQP", bounds=[(0, None), (0, None), (lo[3], hi[3])],
                       constraints=cons, options={"ftol": 1e-15, "maxiter": 1000})  # fmt: skip
        ref_sse = float(np.sum((yk - x @ ref.x) ** 2))
        # The exact solution can only be as good or better than SLSQP's, and close to it.
        assert sse[k].item() <= ref_sse * (1 + 1e-9)
        assert sse[k].item() == pytest.approx(ref_sse, rel=1e-6)
        np.testing.assert_allclose([v[k].item() for v in p], ref.x, rtol=1e-3, atol=1e-6)
    # The first curve's k3 = beta p1 / (p1 + p2) sits on its lower bound.
    assert beta * (p[0][0] / (p[0][0] + p[1][0])).item() == pytest.approx(lo[2], rel=1e-9)


def test_refined_grid_beta_of_noise_free_curves(idif):
    # The vertex of the parabola through the grid's best gain and its neighbours lands
    # far closer to the true beta than the grid's 5.5 % spacing.
    basis = basis_for(idif)
    truth = interior_params(50, seed=12)
    y_w = torch.from_numpy(irreversible_2tc(truth, idif, FRAMES)) * basis.sqrt_w
    beta = grid_beta(basis, y_w, (y_w * y_w).sum(1)).numpy()
    true_beta = truth[:, 1] + truth[:, 2]
    assert np.median(np.abs(beta / true_beta - 1)) < 2e-3
    assert np.max(np.abs(beta / true_beta - 1)) < 2e-2


def test_tied_minima_resolve_to_the_one_nearest_the_start(idif):
    # Hand-made SSE profiles over the grid's betas: parabolas in log beta with their
    # minima exactly on grid points. yy = 100, so SSE = 100 - gain.
    w = frame_weights(FRAMES)
    basis = basis_for(idif, w)
    log_b = basis.log_betas
    near = lambda beta: int((log_b - math.log(beta)).abs().argmin())  # noqa: E731

    def profile(*minima):
        """Gain with a local maximum (SSE minimum) of height h at each (beta, h)."""
        bumps = [h - 0.5 * (log_b - log_b[near(b)]) ** 2 for b, h in minima]
        return torch.stack(bumps).amax(0)

    tol = fitting.default_tie_tolerance(w)
    assert tol == pytest.approx(1 / 58)
    gain = torch.stack([
        profile((0.3, 99.0 - 0.5 * tol), (3.0, 99.0)),  # tied: the slow one, nearer 0.11
        profile((0.3, 99.0 - 2.0 * tol), (3.0, 99.0)),  # not tied: the best
        profile((0.04, 99.0 - 0.1 * tol), (0.3, 99.0 - 0.5 * tol), (3.0, 99.0)),  # 0.04 nearer
        profile((0.8, 99.0)),  # a single minimum
    ])  # fmt: skip
    yy = torch.full((4,), 100.0, dtype=torch.float64)
    chosen = choose_minimum(gain, yy, basis.start_distance, tol).tolist()
    assert chosen == [near(0.3), near(3.0), near(0.04), near(0.8)]
    strict = choose_minimum(gain, yy, basis.start_distance, 0.0).tolist()
    assert strict == [near(3.0)] * 3 + [near(0.8)]
    with pytest.raises(ValueError, match="tie_tolerance"):
        fit(np.ones((1, len(FRAMES))), idif, FRAMES, tie_tolerance=-0.1)


def test_tied_minima_on_noisy_curves_are_true_local_minima(idif):
    # Noisy curves (seeded) where the SSE over beta has two minima within the tolerance:
    # the default fit takes the one nearer k2 + k3 = 0.11 /min, at most 1/58 above the
    # lowest SSE, and curve_fit started at it (an independent local optimiser) stays in
    # its valley: it is a local minimum, not a point on the way to the other one.
    y = noisy(irreversible_2tc(interior_params(300, seed=30), idif, FRAMES), 0.5, seed=31)
    tied = fit(y, idif, FRAMES)
    best = fit(y, idif, FRAMES, tie_tolerance=0.0)
    log_beta = lambda p: np.log(p[..., 1] + p[..., 2])  # noqa: E731
    other = np.abs(log_beta(tied.params) - log_beta(best.params)) > 0.2
    assert 2 <= other.sum() <= 20  # about 1 in 150 noisy curves at this noise level
    # Elsewhere the same minimum (started from different points of a flat valley).
    np.testing.assert_allclose(tied.sse[~other], best.sse[~other], rtol=1e-5)
    assert (tied.sse[other] <= best.sse[other] * (1 + 1 / 58) * (1 + 1e-9)).all()
    distance = lambda p: np.abs(log_beta(p) - math.log(0.11))  # noqa: E731
    assert (distance(tied.params[other]) < distance(best.params[other])).all()
    model = KineticModel(idif, FRAMES)
    for k in np.flatnonzero(other):
        ref = curve_fit(lambda _x, *p: model(np.array(p)), np.arange(len(FRAMES)), y[k],
                        p0=tied.params[k], bounds=(PAPER_LOWER, PAPER_UPPER))[0]  # fmt: skip
        ref_sse = float(np.sum((y[k] - model(ref)) ** 2))
        # No lower point nearby (along flat valleys the fast fit may stop ~1e-6 short) ...
        assert ref_sse >= tied.sse[k] * (1 - 1e-5)
        # ... and curve_fit stays in this minimum's valley, far from the other's beta.
        gap = abs(log_beta(best.params[k]) - log_beta(tied.params[k]))
        assert abs(log_beta(ref) - log_beta(tied.params[k])) < 0.25 * gap


def test_newton_system_matches_finite_differences(idif):
    # Gradient and full Hessian of SSE / 2, assembled from Gram matrices, against central
    # differences of the SSE of the exact model.
    basis = basis_for(idif)
    x = torch.tensor([[1.5, 1.69, 0.013, 0.127], [0.17, 1.27, 0.05, 0.11], [0.6, 0.3, 0.2, 0.02]],
                     dtype=torch.float64)  # fmt: skip
    y = noisy(irreversible_2tc(interior_params(3, seed=13), idif, FRAMES), 0.5, seed=14)
    y_w = torch.from_numpy(y) * basis.sqrt_w

    def half_sse(x):
        r = y_w - model_from_e(basis, x, exact_e(basis, x[:, 1] + x[:, 2]))
        return 0.5 * (r * r).sum(1)

    e = exact_e(basis, x[:, 1] + x[:, 2])
    hess, g, _ = newton_system(basis, x, e, y_w - model_from_e(basis, x, e))
    h = 1e-4 * x.abs()
    num_g = torch.zeros_like(g)
    num_h = torch.zeros_like(hess)
    for j in range(4):
        dj = torch.zeros_like(x)
        dj[:, j] = h[:, j]
        num_g[:, j] = -(half_sse(x + dj) - half_sse(x - dj)) / (2 * h[:, j])
        for k in range(4):
            dk = torch.zeros_like(x)
            dk[:, k] = h[:, k]
            num_h[:, j, k] = (half_sse(x + dj + dk) - half_sse(x + dj - dk)
                              - half_sse(x - dj + dk) + half_sse(x - dj - dk)) / (
                                  4 * h[:, j] * h[:, k])  # fmt: skip
    scale = num_h.abs().amax((1, 2), keepdim=True)
    assert ((hess - num_h).abs() / scale).max() < 1e-3
    np.testing.assert_allclose(g.numpy(), num_g.numpy(), rtol=1e-3, atol=1e-3 * scale.max().item())


# -- bounds -------------------------------------------------------------------------------------


def test_bounds_hold_for_both_methods(idif):
    # Truth outside the bounds (liver's k3 = 0.0035, a large Vb) and heavy noise.
    truth = np.array([[0.65, 0.68, 0.0035, 0.01], [0.2, 0.5, 0.05, 0.9], [2.5, 3.5, 0.2, 0.05]])
    y = noisy(irreversible_2tc(truth, idif, FRAMES), 1.0, seed=4)
    for method in ("fast", "curve_fit"):
        res = fit(y, idif, FRAMES, method=method)
        assert res.ok.all()
        assert (res.params >= np.array(PAPER_LOWER)).all()
        assert (res.params <= np.array(PAPER_UPPER)).all()
    bounds = ([0.05, 0.1, 0.02, 0.0], [1.0, 1.0, 0.2, 0.05])
    many = noisy(irreversible_2tc(interior_params(200, seed=5), idif, FRAMES), 1.0, seed=6)
    res = fit(many, idif, FRAMES, bounds=bounds)
    assert res.ok.all()
    assert (res.params >= np.array(bounds[0])).all() and (res.params <= np.array(bounds[1])).all()
    assert np.isclose(res.params, np.array(bounds[1])).any(axis=0)[[0, 1, 3]].all()


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="lower <= upper"):
        check_bounds(([0.1, 0.1, 0.1, 0], [0.05, 1, 1, 1]))
    with pytest.raises(ValueError, match="k2 \\+ k3"):
        check_bounds(([0.1, 0, 0, 0], [1, 1, 1, 1]))


# -- fast and curve_fit agree ----------------------------------------------------------------


def test_fast_and_curve_fit_agree_on_easy_curves(idif):
    truth = np.array([[0.1, 0.15, 0.06, 0.04], [0.6, 1.2, 0.1, 0.05],
                      [0.24, 0.78, 0.1, 0.05], [0.8, 0.7, 0.05, 0.08]])  # fmt: skip
    y = noisy(irreversible_2tc(truth, idif, FRAMES), 0.1, seed=7)
    fast = fit(y, idif, FRAMES, method="fast", weights="duration")
    ref = fit(y, idif, FRAMES, method="curve_fit", weights="duration")
    assert fast.ok.all() and ref.ok.all()
    # Both reach the same minimum: the SSE agrees to curve_fit's own tolerance and the
    # parameters to about 1e-3 (flat directions of the SSE are loosely pinned by ftol).
    np.testing.assert_allclose(fast.sse, ref.sse, rtol=1e-5)
    np.testing.assert_allclose(fast.params, ref.params, rtol=2e-3, atol=2e-4)


# -- bad curves ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fast", "curve_fit"])
def test_bad_curves_are_flagged_not_fatal(idif, method):
    good = irreversible_2tc(np.array([0.1, 0.15, 0.06, 0.04]), idif, FRAMES)
    y = np.tile(good, (5, 1))
    y[1] = 0.0
    y[2, 10] = np.nan
    y[3] = 0.0
    y[3, [40, 50]] = 1.0  # two positive frames only
    y[4, 5] = np.inf
    res = fit(y, idif, FRAMES, method=method)
    assert res.status.tolist() == [
        STATUS_OK, STATUS_ALL_ZERO, STATUS_NONFINITE, STATUS_TOO_FEW_POSITIVE, STATUS_NONFINITE
    ]  # fmt: skip
    assert res.ok.tolist() == [True, False, False, False, False]
    assert np.isnan(res.params[1:]).all() and np.isnan(res.sse[1:]).all()
    np.testing.assert_allclose(res.params[0], [0.1, 0.15, 0.06, 0.04], rtol=1e-3)
    assert res.reasons()[3] == "too few positive frames"


def test_wrong_shapes_and_options_raise(idif):
    with pytest.raises(ValueError, match="shape"):
        fit(np.ones((3, 10)), idif, FRAMES)
    with pytest.raises(ValueError, match="method"):
        fit(np.ones((1, 62)), idif, FRAMES, method="nelder")
    with pytest.raises(ValueError, match="weights"):
        fit(np.ones((1, 62)), idif, FRAMES, weights="counts")


# -- weights ------------------------------------------------------------------------------------


def test_frame_weights_follow_their_definitions():
    half_life_min = 109.771
    dur = FRAMES.durations_s / 60.0
    decay = dur * 0.5 ** ((FRAMES.starts_s + FRAMES.durations_s / 2) / 60.0 / half_life_min)
    np.testing.assert_allclose(frame_weights(FRAMES, "duration"), dur / dur.mean(), rtol=1e-12)
    np.testing.assert_allclose(
        frame_weights(FRAMES, "duration_decay"), decay / decay.mean(), rtol=1e-12
    )
    assert (frame_weights(FRAMES, "none") == 1).all()


def test_weights_change_the_fit_as_expected(idif):
    truth = np.array([0.6, 1.2, 0.1, 0.05])
    clean = irreversible_2tc(truth, idif, FRAMES)

    def errors(frame):
        y = clean.copy()
        y[frame] *= 1.3
        fits = [fit(y, idif, FRAMES, weights=w) for w in ("none", "duration")]
        return y, fits, [np.abs(f.params[0] - truth).max() / truth.max() for f in fits]

    # An error in a short (2-s) frame counts less when weighted by frame duration ...
    _, _, (err_plain, err_dur) = errors(20)
    assert err_dur < 0.7 * err_plain
    # ... and an error in a long (300-s) frame counts more.
    y, (_, dur), (err_plain, err_dur) = errors(61)
    assert err_dur > 2 * err_plain
    # The reported SSE is sum w (y - model)^2 with the weights scaled to mean 1.
    w = frame_weights(FRAMES, "duration")
    model = irreversible_2tc(dur.params[0], idif, FRAMES)
    assert dur.sse[0] == pytest.approx(np.sum(w * (y - model) ** 2), rel=1e-10)
    # curve_fit with sigma = 1/sqrt(w) finds the same weighted minimum.
    ref = fit(y, idif, FRAMES, method="curve_fit", weights="duration")
    np.testing.assert_allclose(ref.params, dur.params, rtol=2e-3, atol=2e-4)


# -- determinism and chunking -------------------------------------------------------------------


def test_chunking_does_not_change_results(idif):
    y = noisy(irreversible_2tc(interior_params(300, seed=8), idif, FRAMES), 0.5, seed=9)
    one = fit(y, idif, FRAMES)
    many = fit(y.astype(np.float32), idif, FRAMES, chunk_size=100)
    again = fit(y.astype(np.float32), idif, FRAMES, chunk_size=100)
    np.testing.assert_array_equal(many.params, again.params)
    # float32 input rounds the data (~6e-8), so results agree to that order, not bitwise.
    np.testing.assert_allclose(one.params, many.params, rtol=1e-4, atol=1e-6)


def test_early_stopping_matches_full_convergence(idif, monkeypatch):
    # Curves stop when a step would lower the SSE by less than 1e-8 of it; iterated to a
    # far tighter tolerance, every SSE drops by less than 1e-6 relatively. (Both with a
    # high step cap: the default cap of 15 stops a rare curve along a long, flat valley
    # earlier, here 1 in 300 at 4e-5 above its minimum.)
    y = noisy(irreversible_2tc(interior_params(300, seed=15), idif, FRAMES), 1.0, seed=16)
    y[:20] = noisy(irreversible_2tc(np.array([0.65, 0.68, 0.0035, 0.01]), idif, FRAMES)
                   * np.ones((20, 1)), 1.0, seed=17)  # k3 on its bound  # fmt: skip
    quick = fit(y, idif, FRAMES, lm_iterations=60)
    capped = fit(y, idif, FRAMES)
    monkeypatch.setattr(fastfit_lm, "LM_RTOL", 1e-14)
    full = fit(y, idif, FRAMES, lm_iterations=60)
    assert quick.ok.all() and full.ok.all()
    np.testing.assert_allclose(quick.sse, full.sse, rtol=1e-6)
    assert np.mean(np.abs(capped.sse / full.sse - 1) < 1e-6) >= 0.99


def test_worker_threads_do_not_change_results(idif):
    y = noisy(irreversible_2tc(interior_params(9000, seed=18), idif, FRAMES), 0.5, seed=19)
    one = fit(y, idif, FRAMES, workers=1)
    two = fit(y, idif, FRAMES, workers=2)
    np.testing.assert_allclose(one.params, two.params, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(one.sse, two.sse, rtol=1e-9)


# -- the fit-tacs command -----------------------------------------------------------------------


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fit_tacs_on_real_curves(real_tacs_path, tmp_path, capsys):
    out = tmp_path / "fit.tsv"
    plot = tmp_path / "fit.png"
    code, _, err = run_cli(["fit-tacs", "--tsv", str(real_tacs_path), "-o", str(out),
                            "--plot", str(plot)], capsys)  # fmt: skip
    assert code == 0, err
    table = pd.read_csv(out, sep="\t").set_index("region")
    assert list(table.columns) == ["K1", "k2", "k3", "Vb", "Ki", "SSE", "ok", "status"]
    gm = table.loc["grey_matter_bq_per_ml"]
    # Physiological grey matter (Huang et al. 1980; docs/phantom.md): K1 ~0.1,
    # Ki 0.03-0.05 ml/cm3/min.
    assert 0.07 <= gm.K1 <= 0.16 and 0.03 <= gm.Ki <= 0.05 and gm.ok
    assert table.ok.all()
    assert plot.stat().st_size > 10_000
    # CSV by extension, and the paper's reference method gives the same grey matter fit.
    csv = tmp_path / "fit.csv"
    args = ["fit-tacs", "--tsv", str(real_tacs_path), "--method", "curve_fit",
            "--tissue-cols", "grey_matter_bq_per_ml", "-o", str(csv)]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    ref = pd.read_csv(csv).set_index("region").loc["grey_matter_bq_per_ml"]
    assert ref.K1 == pytest.approx(gm.K1, rel=1e-3) and ref.Ki == pytest.approx(gm.Ki, rel=1e-3)


def write_bids_pair(tmp_path, table, keep=slice(None)):
    """A PET-BIDS ``_pet.json`` of the table's frames and a blood recording of its aorta
    column (Bq/ml) at the frames' mid-times, ``keep`` of them; their paths."""
    frames = FrameSchedule(table.frame_start_s, table.frame_duration_s)
    pet_json = tmp_path / "sub-01_pet.json"
    pet_json.write_text(json.dumps(frames.to_bids()))
    blood = tmp_path / "sub-01_recording-idif_blood.tsv"
    pd.DataFrame(
        {"time": frames.mids_s[keep], "whole_blood_radioactivity": table.aorta_bq_per_ml[keep]}
    ).to_csv(blood, sep="\t", index=False)
    return frames, pet_json, blood


def test_fit_tacs_from_a_pet_bids_pair(real_tacs_path, tmp_path, capsys):
    table = pd.read_csv(real_tacs_path, sep="\t")
    table["aorta_bq_per_ml"] /= 1000.0  # the recording in kBq/ml, as its sidecar says
    _, pet_json, blood = write_bids_pair(tmp_path, table)
    blood.with_suffix(".json").write_text(
        json.dumps({"whole_blood_radioactivity": {"Units": "kBq/mL"}, "time": {"Units": "s"}})
    )
    tissue = tmp_path / "tissue.tsv"
    table[["grey_matter_bq_per_ml"]].rename(columns={"grey_matter_bq_per_ml": "gm"}).to_csv(
        tissue, sep="\t", index=False
    )
    code, out, err = run_cli(["fit-tacs", "--pet-json", str(pet_json), "--blood-tsv", str(blood),
                              "--tsv", str(tissue), "--units", "Bq/ml"], capsys)  # fmt: skip
    assert code == 0, err
    bids = pd.read_csv(StringIO(out), sep="\t").set_index("region").loc["gm"]
    code, out, err = run_cli(["fit-tacs", "--tsv", str(real_tacs_path),
                              "--tissue-cols", "grey_matter_bq_per_ml"], capsys)  # fmt: skip
    direct = pd.read_csv(StringIO(out), sep="\t").iloc[0]
    # The same input and frames by two routes: the same fit.
    for name in ("K1", "k2", "k3", "Vb", "Ki"):
        assert bids[name] == pytest.approx(direct[name], rel=1e-5)


def test_fit_tacs_errors_name_the_file(real_tacs_path, tmp_path, capsys):
    out = tmp_path / "never.tsv"
    code, _, err = run_cli(["fit-tacs", "--tsv", str(tmp_path / "missing.tsv"), "-o", str(out)],
                           capsys)  # fmt: skip
    assert code == 2 and "missing.tsv" in err and "not found" in err and "Traceback" not in err
    bad = tmp_path / "bad.tsv"
    table = pd.read_csv(real_tacs_path, sep="\t")
    table.rename(columns={"liver_bq_per_ml": "liver"}).to_csv(bad, sep="\t", index=False)
    code, _, err = run_cli(["fit-tacs", "--tsv", str(bad), "-o", str(out)], capsys)
    assert code == 2 and "bad.tsv" in err and "'liver'" in err and "--units" in err
    code, _, err = run_cli(["fit-tacs", "--tsv", str(bad), "--input-col", "nope", "-o", str(out)],
                           capsys)  # fmt: skip
    assert code == 2 and "no column 'nope'" in err
    table = table.astype({"grey_matter_bq_per_ml": object})
    table.loc[3, "grey_matter_bq_per_ml"] = "abc"
    table.to_csv(bad, sep="\t", index=False)
    code, _, err = run_cli(["fit-tacs", "--tsv", str(bad), "-o", str(out)], capsys)
    assert code == 2 and "row 4" in err and "not a number" in err
    code, _, err = run_cli(["fit-tacs", "--tsv", str(real_tacs_path), "-o", str(out),
                            "--plot", str(tmp_path / "no" / "fig.png")], capsys)  # fmt: skip
    assert code == 2 and "fig.png: its folder does not exist" in err
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_fit_tacs_flags_an_empty_region(real_tacs_path, tmp_path, capsys):
    table = pd.read_csv(real_tacs_path, sep="\t")
    table["empty_bq_per_ml"] = 0.0
    path = tmp_path / "with_empty.tsv"
    table.to_csv(path, sep="\t", index=False)
    code, out, err = run_cli(["fit-tacs", "--tsv", str(path)], capsys)
    assert code == 0, err
    res = pd.read_csv(StringIO(out), sep="\t").set_index("region")
    assert not res.loc["empty_bq_per_ml"].ok and res.loc["empty_bq_per_ml"].status == "all zero"
    assert math.isnan(res.loc["empty_bq_per_ml"].K1) and res.loc["grey_matter_bq_per_ml"].ok


def test_fit_tacs_checks_every_output_before_writing(real_tacs_path, tmp_path, capsys):
    tsv = tmp_path / "tacs.tsv"
    tsv.write_bytes(real_tacs_path.read_bytes())
    before = tsv.read_bytes()
    code, _, err = run_cli(["fit-tacs", "--tsv", str(tsv), "-o", str(tsv)], capsys)
    assert code == 2 and f"{tsv}: is an input" in err
    assert tsv.read_bytes() == before
    out = tmp_path / "fit.tsv"
    code, _, err = run_cli(["fit-tacs", "--tsv", str(tsv), "-o", str(out),
                            "--plot", str(tmp_path / "fit.xyz")], capsys)  # fmt: skip
    assert code == 2 and "fit.xyz: unknown figure format 'xyz'" in err and "png" in err
    assert not out.exists()
    code, _, err = run_cli(["fit-tacs", "--tsv", str(tsv), "-o", str(out),
                            "--plot", str(out)], capsys)  # fmt: skip
    assert code == 2 and "both -o and --plot" in err and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tacs.tsv"]


@pytest.mark.parametrize(
    "model, method",
    [
        ("irreversible_2tc", "fast"),
        ("irreversible_2tc", "curve_fit"),
        ("irreversible_2tc", "curve_fit_paper"),
        ("reversible_2tc", "fast"),
        ("reversible_2tc", "curve_fit"),
        ("fit_reversible", "fast"),
    ],
)
def test_a_zero_input_is_refused_before_fitting(model, method):
    """Every fitter (fit, the published organ fit, the reversible model's through
    fit_model and its own entry point) names the input's source, not a LinAlgError."""
    from kinpet.modelfit import fit_model, fit_reversible

    zero = InputFunction(FRAMES.mids_s, np.zeros(len(FRAMES)), source="sub-09_blood.tsv")
    curves = np.ones((2, len(FRAMES)))
    with pytest.raises(InputFunctionError, match="^sub-09_blood.tsv: .* zero everywhere"):
        if model == "fit_reversible":
            fit_reversible(curves, zero, FRAMES, method)
        elif model == "irreversible_2tc":
            fit(curves, zero, FRAMES, method=method)
        else:
            fit_model(curves, model, zero, FRAMES, method=method)


def test_fit_tacs_times_in_minutes_are_refused(real_tacs_path, tmp_path, capsys):
    table = pd.read_csv(real_tacs_path, sep="\t")
    table[["frame_start_s", "frame_duration_s"]] /= 60.0
    tsv = tmp_path / "minutes.tsv"
    table.to_csv(tsv, sep="\t", index=False)
    out = tmp_path / "fit.tsv"
    code, _, err = run_cli(["fit-tacs", "--tsv", str(tsv), "-o", str(out)], capsys)
    assert code == 2 and not out.exists()
    assert f"{tsv}: the 29 frames end at 60 s, too short for a dynamic FDG scan" in err
    assert "--time-units min" in err
    code, _, err = run_cli(["fit-tacs", "--tsv", str(tsv), "--time-units", "min"], capsys)
    assert code == 0, err
    # Seconds given as minutes: possible in principle, so only a warning with the numbers.
    code, _, err = run_cli(["fit-tacs", "--tsv", str(real_tacs_path), "--time-units", "min"],
                           capsys)  # fmt: skip
    assert code == 0 and "frames end at 216000 s (60 h), long for" in err


def test_fit_tacs_refuses_a_blood_recording_that_stops_early(real_tacs_path, tmp_path, capsys):
    table = pd.read_csv(real_tacs_path, sep="\t")
    early = (table.frame_start_s + table.frame_duration_s / 2).to_numpy() < 1200
    _, pet_json, blood = write_bids_pair(tmp_path, table, early)
    code, _, err = run_cli(["fit-tacs", "--pet-json", str(pet_json), "--blood-tsv", str(blood),
                            "--blood-units", "Bq/ml", "--tsv", str(real_tacs_path),
                            "--tissue-cols", "grey_matter_bq_per_ml"], capsys)  # fmt: skip
    assert code == 2
    assert f"{blood}: the input function ends at 1170 s but the scan ends at 3600 s" in err


def test_fit_tacs_flags_a_strongly_negative_region(real_tacs_path, tmp_path, capsys):
    table = pd.read_csv(real_tacs_path, sep="\t")
    # A background subtracted twice: the curve sinks well below zero late in the scan.
    table["offset_bq_per_ml"] = table.grey_matter_bq_per_ml - 12000.0
    path = tmp_path / "offset.tsv"
    table.to_csv(path, sep="\t", index=False)
    code, out, err = run_cli(["fit-tacs", "--tsv", str(path)], capsys)
    assert code == 0, err
    res = pd.read_csv(StringIO(out), sep="\t").set_index("region")
    bad = res.loc["offset_bq_per_ml"]
    assert not bad.ok and bad.status == "strongly negative values" and np.isfinite(bad.K1)
    assert res.loc["grey_matter_bq_per_ml"].ok and res.loc["liver_bq_per_ml"].ok
    assert f"{path}: region 'offset_bq_per_ml' goes down to -12 kBq/ml" in err


def test_fit_tacs_patlak_flags_a_strongly_negative_region(real_tacs_path, tmp_path, capsys):
    """--model patlak: the same ok/status columns and the same flag and warning as the
    compartment models; a region of zeros has no line (NaN, status all zero)."""
    table = pd.read_csv(real_tacs_path, sep="\t")
    table["offset_bq_per_ml"] = table.grey_matter_bq_per_ml - 12000.0
    table["empty_bq_per_ml"] = 0.0
    path = tmp_path / "offset.tsv"
    table.to_csv(path, sep="\t", index=False)
    code, out, err = run_cli(["fit-tacs", "--tsv", str(path), "--model", "patlak"], capsys)
    assert code == 0, err
    res = pd.read_csv(StringIO(out), sep="\t").set_index("region")
    bad = res.loc["offset_bq_per_ml"]
    assert not bad.ok and bad.status == "strongly negative values" and np.isfinite(bad.Ki)
    assert res.loc["grey_matter_bq_per_ml"].ok and res.loc["liver_bq_per_ml"].ok
    assert res.loc["grey_matter_bq_per_ml"].status == "ok"
    empty = res.loc["empty_bq_per_ml"]
    assert not empty.ok and empty.status == "all zero" and np.isnan(empty.Ki)
    assert f"{path}: region 'offset_bq_per_ml' goes down to -12 kBq/ml" in err
    assert "of its maximum" in err and "flagged ok=False" in err


def test_fit_tacs_refuses_an_input_column_of_zeros(real_tacs_path, tmp_path, capsys):
    table = pd.read_csv(real_tacs_path, sep="\t")
    table["aorta_bq_per_ml"] = 0.0
    path = tmp_path / "zero_input.tsv"
    table.to_csv(path, sep="\t", index=False)
    code, _, err = run_cli(["fit-tacs", "--tsv", str(path)], capsys)
    assert code == 2 and f"{path}:aorta_bq_per_ml: the input function is zero everywhere" in err


# -- fixed parameters (lower = upper, or fixed=) ------------------------------------------------


@pytest.mark.parametrize("name, index", [("Vb", 3), ("k3", 2), ("K1", 0)])
def test_fixed_parameters_are_held_and_the_others_fitted(idif, name, index):
    """A parameter held at its true value: both methods give back the others from
    noise-free curves; on noisy ones the fast fitter's SSE is at most curve_fit's + 0.1 %,
    and curve_fit's fit equals scipy's own fit of the reduced model, written here."""
    truth = interior_params(6, seed=31)
    clean = irreversible_2tc(truth, idif, FRAMES)
    for i, row in enumerate(truth):
        value = float(row[index])
        for method in ("fast", "curve_fit"):
            r = fit(clean[i], idif, FRAMES, method=method, fixed={name: value})
            assert r.ok[0] and r.params[0, index] == value, method
            np.testing.assert_allclose(r.params[0], row, rtol=2e-3, err_msg=method)
    curves = noisy(clean, 0.3, seed=32)
    value = 0.05 if name == "Vb" else float(np.median(truth[:, index]))
    fast = fit(curves, idif, FRAMES, method="fast", fixed={name: value})
    slow = fit(curves, idif, FRAMES, method="curve_fit", fixed={name: value})
    assert (fast.params[:, index] == value).all() and (slow.params[:, index] == value).all()
    assert (fast.sse <= slow.sse * 1.001).all()
    model = KineticModel(idif, FRAMES)
    lo, hi = np.array(PAPER_LOWER, float), np.array(PAPER_UPPER, float)
    hi[3] = 1 - 1e-9
    free = [j for j in range(4) if j != index]

    def reduced(_x, *q):
        p = np.insert(np.array(q), index, value)
        return model(p)

    for i in range(2):
        q, _ = curve_fit(reduced, np.arange(len(FRAMES)), curves[i],
                         p0=np.clip(fitting.PAPER_P0, lo, hi)[free],
                         bounds=(lo[free], hi[free]), diff_step=0.001)  # fmt: skip
        np.testing.assert_allclose(slow.params[i, free], q, rtol=1e-12)


def test_fixed_equals_lower_equal_upper_and_names_are_checked(idif):
    curves = noisy(irreversible_2tc(interior_params(3, seed=33), idif, FRAMES), 0.3, seed=34)
    lo, hi = list(PAPER_LOWER), list(PAPER_UPPER)
    lo[3] = hi[3] = 0.04
    for method in ("fast", "curve_fit"):
        a = fit(curves, idif, FRAMES, method=method, fixed={"Vb": 0.04})
        b = fit(curves, idif, FRAMES, method=method, bounds=(lo, hi))
        np.testing.assert_array_equal(a.params, b.params)
    every = dict(zip(("K1", "k2", "k3", "Vb"), (0.5, 0.4, 0.1, 0.05), strict=True))
    r = fit(curves, idif, FRAMES, method="curve_fit", fixed=every)
    np.testing.assert_array_equal(r.params, np.tile([0.5, 0.4, 0.1, 0.05], (3, 1)))
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['vb'\]"):
        fit(curves, idif, FRAMES, fixed={"vb": 0.05})


def test_fit_tacs_fixed_parameters(real_tacs_path, tmp_path, capsys):
    out = tmp_path / "fixed.tsv"
    args = ["fit-tacs", "--tsv", str(real_tacs_path), "--method", "curve_fit",
            "--fixed", "Vb=0.05", "--fixed", "k3=0.06", "-o", str(out)]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    table = pd.read_csv(out, sep="\t")
    assert (table.Vb == 0.05).all() and (table.k3 == 0.06).all() and table.ok.all()
    code, _, err = run_cli([*args[:-2], "--fixed", "Vb", "-o", str(out)], capsys)
    assert code == 2 and "--fixed 'Vb': expected NAME=VALUE" in err
    code, _, err = run_cli([*args[:-2], "--fixed", "V_b=0.1", "-o", str(out)], capsys)
    assert code == 2 and "fixed ['V_b']: not a parameter of irreversible_2tc" in err


# -- input delay (delay_bounds_s) ---------------------------------------------------------------


def test_noise_free_delays_are_recovered(idif):
    """Curves whose input arrives -10 to +30 s late: the fast fitter gives back delay
    (within 0.1 s) and parameters (within 0.1 %); curve_fit too (two curves, a coarser
    grid: it costs 0.1 s per fit)."""
    truth = interior_params(4, seed=41)
    delays = np.array([-10.0, 4.6, 17.25, 30.0])
    curves = np.stack(
        [irreversible_2tc(p, idif.delayed(d), FRAMES) for p, d in zip(truth, delays, strict=True)]
    )
    r = fit(curves, idif, FRAMES, delay_bounds_s=(-10, 40))
    np.testing.assert_allclose(r.delay_s, delays, atol=0.1)
    np.testing.assert_allclose(r.params, truth, rtol=1e-3)
    assert r.ok.all() and list(r.as_dict())[:7] == ["K1", "k2", "k3", "Vb", "Ki", "delay_s", "SSE"]
    slow = fit(
        curves[1:3], idif, FRAMES, method="curve_fit", delay_bounds_s=(0, 20), delay_step_s=4
    )
    np.testing.assert_allclose(slow.delay_s, delays[1:3], atol=0.1)
    np.testing.assert_allclose(slow.params, truth[1:3], rtol=1e-3)


def test_delay_fit_is_the_minimum_of_the_delay_profile(idif):
    """On noisy curves the fitted delay's SSE is the lowest of a fine scan of delays (each
    a plain fit with the delayed input), and no higher than the fit without delay."""
    truth = interior_params(3, seed=42)
    curves = noisy(
        np.stack([irreversible_2tc(p, idif.delayed(8.0), FRAMES) for p in truth]), 0.3, seed=43
    )
    r = fit(curves, idif, FRAMES, delay_bounds_s=(0, 16))
    scan = np.array([fit(curves, idif.delayed(d), FRAMES).sse for d in np.arange(0, 16.01, 0.25)])
    assert (r.sse <= scan.min(axis=0) * (1 + 1e-9)).all()
    assert (r.sse <= fit(curves, idif, FRAMES).sse).all()
    assert (np.abs(r.delay_s - 8.0) < 3.0).all()  # noise moves it, but not far


def test_delay_bounds_are_checked(idif):
    y = irreversible_2tc(np.array([0.5, 0.5, 0.05, 0.05]), idif, FRAMES)
    for bad in ((10, 0), (0, float("inf")), ("a", 1)):
        with pytest.raises(ValueError, match="delay bounds"):
            fit(y, idif, FRAMES, delay_bounds_s=bad)
    assert fit(y, idif, FRAMES, delay_bounds_s=(3, 3)).delay_s[0] == 3.0


def test_fit_tacs_with_a_fitted_delay_on_real_curves(real_tacs_path, tmp_path, capsys):
    """The real uEXPLORER curves (KMAP's example): KMAP finds about 5 s in grey matter and
    17 s in the liver, and the SSE falls with the delay (threefold in grey matter)."""
    plain, delayed = tmp_path / "plain.tsv", tmp_path / "delayed.tsv"
    base = ["fit-tacs", "--tsv", str(real_tacs_path)]
    assert run_cli([*base, "-o", str(plain)], capsys)[0] == 0
    code, _, err = run_cli([*base, "--fit-delay", "-10", "40", "-o", str(delayed),
                            "--plot", str(tmp_path / "fit.png")], capsys)  # fmt: skip
    assert code == 0, err
    a = pd.read_csv(plain, sep="\t").set_index("region")
    b = pd.read_csv(delayed, sep="\t").set_index("region")
    gm, liver = "grey_matter_bq_per_ml", "liver_bq_per_ml"
    assert 3.0 <= b.loc[gm, "delay_s"] <= 7.0 and 14.0 <= b.loc[liver, "delay_s"] <= 22.0
    assert (
        b.loc[gm, "SSE"] < a.loc[gm, "SSE"] / 2.5 and b.loc[liver, "SSE"] < a.loc[liver, "SSE"] / 3
    )
    code, _, err = run_cli([*base, "--fit-delay", "40", "-10"], capsys)
    assert code == 2 and "lo <= hi" in err and "Traceback" not in err
