"""Variable projection (kinpet.projection): the model's basis, the bounded linear solve
against scipy's BVLS, noise-free recovery, gradients, and the network trained through it."""

import numpy as np
import pytest
import torch
from scipy.optimize import lsq_linear

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import PAPER_LOWER, PAPER_UPPER, KineticModel, irreversible_2tc
from kinpet.prediction import predict_slices
from kinpet.projection import (
    newton_log_beta,
    project,
    project_maps,
    projected_cost,
    solve_linear,
)
from kinpet.refinement import refine
from kinpet.training import (
    SliceSet,
    TrainSettings,
    build_model,
    evaluate,
    loss_weights,
    masked_mse,
    model_tacs,
    subject_projection,
    training_loss,
)

FRAMES = FrameSchedule.paper()
INPUT = InputFunction.feng(peak_kbq_per_ml=250.0, delay_s=5.0)
MODEL = KineticModel(INPUT, FRAMES)


def random_parameters(n, seed=0):
    """Parameters inside the bounds; a quarter with k3 on its lower bound, a sixth Vb = 0."""
    rng = np.random.default_rng(seed)
    p = np.stack(
        [
            rng.uniform(0.05, 1.5, n),
            rng.uniform(0.05, 2.8, n),
            rng.uniform(0.01, 0.3, n),
            rng.uniform(0.0, 0.4, n),
        ],
        -1,
    )
    p[: n // 4, 2] = PAPER_LOWER[2]
    p[n // 4 : n // 4 + n // 6, 3] = 0.0
    return p


def coefficients(p):
    """(Vb, a, b) of parameters: C = Vb A + a I + b E with a, b = (1-Vb) K1 (k3, k2)/beta."""
    k1, k2, k3, vb = p.T
    beta = k2 + k3
    return np.stack([vb, (1 - vb) * k1 * k3 / beta, (1 - vb) * k1 * k2 / beta], -1)


@pytest.mark.parametrize("sampling", ["average", "mid", "paper"])
def test_basis_reproduces_the_model(sampling):
    model = KineticModel(INPUT, FRAMES, sampling)
    p = random_parameters(50)
    basis = model.basis(torch.from_numpy(p[:, 1] + p[:, 2])).numpy()
    assert basis.shape == (50, len(FRAMES), 3)
    by_basis = np.einsum("ntk,nk->nt", basis, coefficients(p))
    np.testing.assert_allclose(by_basis, model(p), rtol=1e-12, atol=1e-10)


def test_projection_recovers_noise_free_parameters_also_on_the_bounds():
    p = random_parameters(200)
    curves = torch.from_numpy(MODEL(p))
    out = project(torch.from_numpy(p[:, 1] + p[:, 2]), curves, MODEL).numpy()
    np.testing.assert_allclose(out, p, rtol=1e-9, atol=1e-11)


def bvls_reference(beta, curves, basis, weights):
    """The constrained minimum by scipy's BVLS in cone coordinates u = M c, where the
    constraints Vb >= 0, k3 >= lo, k2 >= lo are u >= 0."""
    lo = PAPER_LOWER[2]
    out = []
    for b, y, x in zip(beta, curves, basis, strict=True):
        m = np.array([[1.0, 0, 0], [0, b - lo, -lo], [0, -lo, b - lo]])
        m_inv = np.linalg.inv(m)
        sw = np.sqrt(weights)
        fit = lsq_linear((x * sw[:, None]) @ m_inv, y * sw, bounds=(0, np.inf), method="bvls")
        out.append(m_inv @ fit.x)
    return np.array(out)


@pytest.mark.parametrize("weighted", [False, True])
def test_bounded_solve_equals_scipy_bvls_on_noisy_curves(weighted):
    rng = np.random.default_rng(1)
    p = random_parameters(300, seed=1)
    curves = MODEL(p) + rng.normal(0, 3.0, (300, len(FRAMES)))
    curves[:10] = rng.normal(0, 1.0, (10, len(FRAMES)))  # background: the vertex c = 0
    beta = p[:, 1] + p[:, 2]
    basis = MODEL.basis(torch.from_numpy(beta)).numpy()
    weights = FRAMES.durations_s / FRAMES.durations_s.mean() if weighted else np.ones(len(FRAMES))
    ours = solve_linear(
        torch.from_numpy(beta),
        torch.from_numpy(curves),
        torch.from_numpy(basis),
        torch.from_numpy(weights),
    ).numpy()
    reference = bvls_reference(beta, curves, basis, weights)
    scale = np.abs(reference).max(axis=1, keepdims=True) + 1e-12
    np.testing.assert_allclose(ours / scale, reference / scale, atol=1e-8)
    # Some solutions are on each kind of face, so the test covers them.
    assert (ours[:, 0] <= 1e-12).sum() > 10
    assert np.isclose(ours[:, 1] / (ours[:, 1] + ours[:, 2] + 1e-30) * beta, 0.01).sum() > 10


def test_projection_is_differentiable_in_beta():
    rng = np.random.default_rng(2)
    p = random_parameters(40, seed=2)[10:]  # k3 free: the active face stays put
    curves = torch.from_numpy(MODEL(p) + rng.normal(0, 1.0, (30, len(FRAMES))))
    curves = torch.cat([curves, torch.zeros(2, len(FRAMES))])  # empty pixels too
    beta = torch.from_numpy(np.concatenate([p[:, 1] + p[:, 2], [0.5, 0.5]]))

    def cost(b):
        return ((MODEL(project(b, curves, MODEL)) - curves) ** 2).sum()

    b = beta.clone().requires_grad_(True)
    cost(b).backward()
    assert torch.isfinite(b.grad).all()
    step = 1e-6
    for i in (0, 5, 17):
        up, down = beta.clone(), beta.clone()
        up[i] += step
        down[i] -= step
        numeric = (cost(up) - cost(down)).item() / (2 * step)
        assert b.grad[i].item() == pytest.approx(numeric, rel=1e-4, abs=1e-6)


def small_subject(seed, size=16):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    truth = np.stack([0.3 + 0.6 * xx, 0.4 + yy, 0.01 + 0.06 * xx * yy, 0.05 * yy], -1)
    clean = irreversible_2tc(truth, INPUT, FRAMES).transpose(2, 0, 1)
    slices = np.stack([clean, 1.1 * clean])
    return (slices + rng.normal(0, 0.5, slices.shape)).astype(np.float32)


def network_and_loss(slices, **options):
    """A seeded projection network on the two slices of ``slices`` and its training loss:
    (settings, data, network, rows, frame weights, loss)."""
    torch.set_num_threads(2)
    settings = TrainSettings(
        activation="sigmoid", scaling="input", projection=True, batch_size=2, **options
    )
    data = SliceSet.from_subjects([slices], [INPUT], FRAMES, scaling="input")
    torch.manual_seed(0)
    net = build_model(settings)
    rows = torch.arange(2)
    weights = loss_weights(FRAMES, settings, "cpu")
    return (
        settings,
        data,
        net,
        rows,
        weights,
        training_loss(net, data.tacs, rows, data, settings, weights),
    )


@pytest.mark.slow
def test_projected_network_loss_prediction_and_refinement():
    slices = small_subject(4)
    settings, data, net, rows, weights, loss = network_and_loss(slices, learning_rate=1e-3)
    # By hand: the network's beta, the rest solved per pixel, the masked MSE.
    with torch.no_grad():
        x = torch.nn.functional.pad(data.tacs.unsqueeze(1), (0, 0, 0, 0, 1, 1))
        raw = net(x)
        params = project_maps(raw, data.tacs, data.models[0])
        mask = torch.from_numpy(np.trapezoid(slices, FRAMES.mids_min, axis=1) > 10.0)
        by_hand = masked_mse(model_tacs(params, data.subject, data.models), data.tacs, mask)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    torch.testing.assert_close(params[:, 1] + params[:, 2], raw[:, 1] + raw[:, 2])
    lower, upper = torch.tensor(PAPER_LOWER), torch.tensor(PAPER_UPPER)
    assert ((params >= lower.view(1, 4, 1, 1)) & (params <= upper.view(1, 4, 1, 1))).all()
    # predict_slices with the subject's projection gives the same maps from kBq/ml.
    predicted = predict_slices(
        net, slices, scale=data.scales[0], projection=subject_projection(INPUT, FRAMES, settings)
    )
    with torch.no_grad():
        replicated = torch.nn.functional.pad(
            data.tacs.unsqueeze(1), (0, 0, 0, 0, 1, 1), "replicate"
        )
        expected = project_maps(net(replicated), data.tacs, data.models[0])
    np.testing.assert_allclose(predicted, expected.numpy(), rtol=1e-5, atol=1e-6)
    # Trained through the projection, the loss falls.
    before = evaluate(net, data, settings)[0]
    tuned, _ = refine(net, data, settings, steps=10, stream=open("/dev/null", "w"))
    assert evaluate(tuned, data, settings)[0] < 0.9 * before


def scipy_optimal_log_beta(curve, weights=None):
    """The log beta that minimises the projected cost of one curve, by scipy's bounded
    scalar search (an independent reference for the Newton steps)."""
    from scipy.optimize import minimize_scalar

    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    y = torch.as_tensor(curve, dtype=torch.float64)[None]

    def cost(u):
        return float(projected_cost(torch.tensor([np.exp(u)]), y, MODEL, w)[0])

    lo = np.log((PAPER_LOWER[1] + PAPER_LOWER[2]) * 1.01)
    hi = np.log(PAPER_UPPER[1] + PAPER_UPPER[2])
    return minimize_scalar(cost, bounds=(lo, hi), method="bounded", options={"xatol": 1e-7}).x


def test_newton_steps_reach_the_projected_cost_minimum_found_by_scipy():
    """Repeated Newton targets of noisy curves converge to the minimum of each curve's
    projected cost (scipy's bounded search on the same cost): fast exchange (the
    spleen's beta ~2.6 /min, a flat cost) as well as slow; the steps are capped."""
    truth = np.array([[0.9, 2.6, 0.05, 0.1], [0.8, 0.9, 0.02, 0.05], [0.15, 0.7, 0.1, 0.05]])
    rng = np.random.default_rng(3)
    clean = irreversible_2tc(truth, INPUT, FRAMES)
    curves = clean + rng.normal(0, 0.02 * clean.max(), clean.shape)
    y = torch.from_numpy(curves)
    weights = torch.from_numpy(np.linspace(0.5, 1.5, FRAMES.n_frames))
    u = torch.log(torch.tensor([1.0, 2.5, 0.3], dtype=torch.float64))
    for _ in range(20):
        new = newton_log_beta(torch.exp(u), y, MODEL, weights, max_step=0.5)
        assert (new - u).abs().max() <= 0.5 + 1e-12
        u = new
    expected = [scipy_optimal_log_beta(c, weights) for c in curves]
    np.testing.assert_allclose(u.numpy(), expected, atol=2e-3)  # 0.2 % in beta


def test_newton_loss_trains_toward_the_fitted_beta_and_needs_projection():
    """One Newton-loss step of a tiny network lowers the distance between its beta and
    the Newton targets (equal to it computed by hand). Without projection the setting is
    refused."""
    with pytest.raises(ValueError, match="needs projection"):
        TrainSettings(loss="newton", projection=False)
    slices = small_subject(5)
    settings, data, net, rows, weights, loss = network_and_loss(slices, loss="newton")
    # By hand: the network's log beta against one Newton step on each masked pixel.
    with torch.no_grad():
        x = torch.nn.functional.pad(data.tacs.unsqueeze(1), (0, 0, 0, 0, 1, 1))
        raw = net(x)
        beta = (raw[:, 1] + raw[:, 2]).double()
        mask = torch.from_numpy(np.trapezoid(slices, FRAMES.mids_min, axis=1) > 10.0)
        curves = data.tacs.permute(0, 2, 3, 1)[mask].double()
        target = newton_log_beta(beta[mask], curves, data.models[0], weights)
        by_hand = ((beta[mask].log() - target) ** 2).mean()
    assert mask.sum() > 50
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-4)
    loss.backward()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    optimizer.step()
    assert training_loss(net, data.tacs, rows, data, settings, weights).item() < loss.item()


def test_projection_weights_of_their_own_leave_the_loss_weights():
    """projection_equal_share: each pixel's least squares at the network's beta uses its own
    blend of equal and duration x decay weights; the loss keeps ``loss_weights``."""
    from kinpet.fitting import frame_weights
    from kinpet.training import projection_weights

    slices = small_subject(4)
    settings, data, net, rows, weights, loss = network_and_loss(
        slices, loss_weights="blend", blend_equal_share=0.75, projection_equal_share=0.2
    )
    dd = frame_weights(FRAMES, "duration_decay")
    np.testing.assert_allclose(weights.numpy(), 0.75 + 0.25 * dd)  # the loss's, unchanged
    own = projection_weights(FRAMES, settings, "cpu")
    np.testing.assert_allclose(own.numpy(), 0.2 + 0.8 * dd)
    with torch.no_grad():
        x = torch.nn.functional.pad(data.tacs.unsqueeze(1), (0, 0, 0, 0, 1, 1))
        raw = net(x)
        params = project_maps(raw, data.tacs, data.models[0], own)
        other = project_maps(raw, data.tacs, data.models[0], weights)
        mask = torch.from_numpy(np.trapezoid(slices, FRAMES.mids_min, axis=1) > 10.0)
        pred = model_tacs(params, data.subject, data.models)
        by_hand = masked_mse(pred, data.tacs, mask, weights)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # The choice matters: the loss's own weights would give other K1 maps.
    assert (params[:, 0] - other[:, 0]).abs().max() > 1e-4
    # Prediction solves with the same weights as training.
    predicted = subject_projection(INPUT, FRAMES, settings)(raw, data.tacs)
    np.testing.assert_allclose(predicted.numpy(), params.numpy(), rtol=1e-6, atol=1e-7)
    # Unset, the projection weighs frames as the loss does.
    plain = TrainSettings(loss_weights="blend", blend_equal_share=0.75)
    torch.testing.assert_close(
        projection_weights(FRAMES, plain, "cpu"), loss_weights(FRAMES, plain, "cpu")
    )
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match="projection_equal_share"):
            TrainSettings(projection_equal_share=bad)
