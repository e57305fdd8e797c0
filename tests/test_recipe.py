"""The training recipe's options: input scaling, the sigmoid activation, frame weights,
schedules, flips and test-time refinement; the published recipe unchanged."""

import math

import numpy as np
import pytest
import torch

from kinpet.fitting import frame_weights
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import PAPER_LOWER, PAPER_UPPER, irreversible_2tc
from kinpet.network import INITIAL_PARAMETERS, KineticUNet, bounded_logit, bounded_sigmoid
from kinpet.prediction import predict_slices
from kinpet.refinement import refine
from kinpet.training import (
    SliceSet,
    TrainSettings,
    build_model,
    evaluate,
    input_scale,
    learning_rate_schedule,
    loss_weights,
    random_flips,
    training_loss,
)

FRAMES = FrameSchedule.paper()
LOWER = torch.tensor(PAPER_LOWER).view(1, 4, 1, 1)
UPPER = torch.tensor(PAPER_UPPER).view(1, 4, 1, 1)


def subject(seed, n_slices=2, size=16, noise=0.5, peak=200.0):
    """Slices [S, T, H, W] of smooth known maps through the exact model, with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    truth = np.stack([0.3 + 0.6 * xx, 0.4 + yy, 0.02 + 0.06 * xx * yy, 0.05 + 0.1 * yy], -1)
    inp = InputFunction.feng(peak_kbq_per_ml=peak, delay_s=3.0 * seed)
    clean = irreversible_2tc(truth, inp, FRAMES).transpose(2, 0, 1)
    slices = np.stack([clean * (1 + 0.1 * i) for i in range(n_slices)])
    return (slices + rng.normal(0, noise, slices.shape)).astype(np.float32), inp, truth


def test_bounded_sigmoid_stays_inside_the_bounds_and_inverts():
    logits = torch.tensor([-1e4, -30.0, -3.0, 0.0, 3.0, 30.0, 1e4]).view(-1, 1, 1, 1)
    out = bounded_sigmoid(logits.expand(-1, 4, 1, 1), LOWER, UPPER)
    assert torch.isfinite(out).all()
    assert (out >= LOWER).all() and (out <= UPPER).all()
    # Geometric for K1, k2, k3: sigmoid 0.5 is the geometric mean of the bounds.
    mid = out[3, :, 0, 0]
    assert mid[0].item() == pytest.approx(math.sqrt(0.01 * 2.0), rel=1e-6)
    assert mid[2].item() == pytest.approx(math.sqrt(0.01 * 1.0), rel=1e-6)
    assert mid[3].item() == pytest.approx(0.5, rel=1e-6)  # Vb linear in [0, 1]
    values = torch.tensor([0.65, 0.68, 0.0105, 0.02]).view(1, 4, 1, 1)
    back = bounded_sigmoid(bounded_logit(values, LOWER, UPPER), LOWER, UPPER)
    torch.testing.assert_close(back, values, rtol=1e-5, atol=1e-7)


def test_sigmoid_network_starts_at_typical_values_and_keeps_gradients():
    torch.manual_seed(0)
    net = KineticUNet(activation="sigmoid")
    with torch.no_grad():
        for p in net.head[1].parameters():
            if p.ndim > 1:
                p.zero_()  # the output is then the bias alone
        out = net(torch.randn(1, 1, 64, 16, 16))
    start = torch.tensor(INITIAL_PARAMETERS).view(1, 4, 1, 1).expand_as(out)
    torch.testing.assert_close(out, start, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        net.head[1].bias.copy_(torch.tensor([-40.0, 40.0, -40.0, 40.0]))  # far outside
        out = net(50 * torch.randn(2, 1, 64, 16, 16))
    assert (out >= LOWER).all() and (out <= UPPER).all()


def test_input_scale_against_closed_forms():
    end_s = float(FRAMES.starts_s[-1] + FRAMES.durations_s[-1])
    flat = InputFunction([0.0, end_s], [7.0, 7.0])
    assert input_scale(flat, FRAMES) == pytest.approx(7.0, rel=1e-12)
    ramp = InputFunction([0.0, end_s], [0.0, 10.0])
    assert input_scale(ramp, FRAMES) == pytest.approx(5.0, rel=1e-9)
    with pytest.raises(ValueError, match="zero over the whole scan"):
        input_scale(InputFunction([0.0, end_s], [0.0, 0.0], source="x.tsv"), FRAMES)


def test_scaling_leaves_the_parameters_and_the_published_loss_unchanged():
    slices, inp, truth = subject(0, noise=0.0)
    raw = SliceSet.from_subjects([slices], [inp], FRAMES)
    scaled = SliceSet.from_subjects([slices], [inp], FRAMES, scaling="input")
    scale = input_scale(inp, FRAMES)
    assert scaled.scales == [pytest.approx(scale)] and raw.scales == [1.0]
    torch.testing.assert_close(scaled.tacs * scale, raw.tacs, rtol=1e-6, atol=1e-5)
    # The scaled model of the true parameters is the scaled measurement (slice 0 is the
    # model itself; slice 1 is 1.1 times it).
    params = torch.from_numpy(truth).float()[None]
    model = scaled.models[0](params).permute(0, 3, 1, 2)
    torch.testing.assert_close(model, scaled.tacs[:1], rtol=2e-5, atol=1e-5)
    # A network sees the same curves up to the scale; its published loss is in kBq/ml.
    torch.manual_seed(0)
    net = KineticUNet(activation="sigmoid")
    settings = TrainSettings(activation="sigmoid", scaling="input", batch_size=2)
    loss_scaled = evaluate(net, scaled, settings)[0]
    settings_raw = TrainSettings(activation="sigmoid", batch_size=2)
    params_scaled = predict_slices(net, slices, scale=scale)
    params_raw = predict_slices(net, scaled.tacs.numpy())
    np.testing.assert_allclose(params_scaled, params_raw, rtol=1e-5, atol=1e-7)
    # Same parameters, so the same published loss computed on the raw set by hand:
    pred = irreversible_2tc(params_raw.transpose(0, 2, 3, 1), inp, FRAMES).transpose(0, 3, 1, 2)
    area = np.trapezoid(slices, FRAMES.mids_min, axis=1) > settings_raw.mask_threshold
    by_hand = np.mean(((pred - slices) ** 2).transpose(0, 2, 3, 1)[area])
    assert loss_scaled == pytest.approx(by_hand, rel=1e-4)


def loss_by_hand(net, slices, inp):
    """Squared errors [N, T] of the masked pixels: the network run on zero-padded frames,
    the model by kinpet.kinetics in float64, the paper's mask (area > 10 kBq/ml min)."""
    with torch.no_grad():
        x = torch.nn.functional.pad(torch.from_numpy(slices).unsqueeze(1), (0, 0, 0, 0, 1, 1))
        params = net(x).permute(0, 2, 3, 1).double().numpy()
    pred = irreversible_2tc(params, inp, FRAMES).transpose(0, 3, 1, 2)
    mask = np.trapezoid(slices, FRAMES.mids_min, axis=1) > 10.0
    return ((pred - slices) ** 2).transpose(0, 2, 3, 1)[mask]


def test_published_recipe_loss_is_the_plain_masked_mse():
    slices, inp, _ = subject(1)
    data = SliceSet.from_subjects([slices], [inp], FRAMES)
    settings = TrainSettings()  # the published recipe: no scaling, equal weights
    assert (settings.scaling, settings.loss_weights, settings.schedule) == ("none",) * 2 + ("step",)
    torch.manual_seed(0)
    net = build_model(settings)
    assert net.activation == "multi_clamp" and net.straight_through
    rows = torch.arange(2)
    weights = torch.as_tensor(frame_weights(FRAMES, settings.loss_weights))
    loss = training_loss(net, data.tacs, rows, data, settings, weights).item()
    assert loss == pytest.approx(loss_by_hand(net, slices, inp).mean(), rel=1e-4)


def test_duration_weights_weigh_frames_by_their_length():
    slices, inp, _ = subject(2)
    data = SliceSet.from_subjects([slices], [inp], FRAMES)
    settings = TrainSettings(loss_weights="duration")
    torch.manual_seed(0)
    net = build_model(settings)
    w = torch.as_tensor(frame_weights(FRAMES, "duration"))
    assert w.mean().item() == pytest.approx(1.0)
    loss = training_loss(net, data.tacs, torch.arange(2), data, settings, w).item()
    sq = loss_by_hand(net, slices, inp)
    durations = FRAMES.durations_s / FRAMES.durations_s.mean()
    assert loss == pytest.approx(np.mean(sq * durations), rel=1e-4)


def test_blend_weights_are_the_mean_of_equal_and_duration_decay():
    blend = loss_weights(FRAMES, TrainSettings(loss_weights="blend"), "cpu").numpy()
    decay = frame_weights(FRAMES, "duration_decay")
    np.testing.assert_allclose(blend, 0.5 * (1.0 + decay), rtol=1e-12)
    assert blend.mean() == pytest.approx(1.0) and blend.min() >= 0.5 - 1e-12


def test_schedules():
    param = torch.nn.Parameter(torch.zeros(1))
    step = learning_rate_schedule(torch.optim.SGD([param], lr=1.0), TrainSettings(halve_every=2))
    cosine_settings = TrainSettings(schedule="cosine", epochs=10, warmup_epochs=1)
    optimizer = torch.optim.SGD([param], lr=1.0)
    cosine = learning_rate_schedule(optimizer, cosine_settings)
    rates = {"step": [], "cosine": []}
    for _ in range(10):
        rates["step"].append(step.optimizer.param_groups[0]["lr"])
        rates["cosine"].append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        step.optimizer.step()
        step.step()
        cosine.step()
    assert rates["step"] == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625, 0.0625]
    expected = [0.5] + [0.5 * (1 + math.cos(math.pi * (e - 1) / 9)) for e in range(1, 10)]
    np.testing.assert_allclose(rates["cosine"], expected, rtol=1e-12)
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainSettings(schedule="linear")


def test_flips_are_seeded_and_only_flip_space():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    seen = set()
    for seed in range(12):
        out = random_flips(x, torch.Generator().manual_seed(seed))
        again = random_flips(x, torch.Generator().manual_seed(seed))
        assert torch.equal(out, again)
        for dims in ([], [-2], [-1], [-2, -1]):
            if torch.equal(out, x.flip(dims) if dims else x):
                seen.add(tuple(dims))
                break
        else:
            raise AssertionError("not a spatial flip")
    assert len(seen) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["published", "scaled_sigmoid"])
def test_refinement_lowers_the_loss_on_the_test_subject(recipe):
    torch.set_num_threads(2)
    slices, inp, _ = subject(3, n_slices=2)
    settings = (
        TrainSettings(batch_size=2, learning_rate=1e-3)
        if recipe == "published"
        else TrainSettings(
            activation="sigmoid",
            scaling="input",
            loss_weights="duration",
            batch_size=2,
            learning_rate=1e-3,
        )
    )
    data = SliceSet.from_subjects([slices], [inp], FRAMES, scaling=settings.scaling)
    torch.manual_seed(0)
    net = build_model(settings)
    before = evaluate(net, data, settings)[0]
    first = {k: v.clone() for k, v in net.state_dict().items()}
    tuned, losses = refine(net, data, settings, steps=15, stream=open("/dev/null", "w"))
    after = evaluate(tuned, data, settings)[0]
    assert len(losses) == 15
    assert after < 0.7 * before
    # The original network is untouched, and the same seed gives the same refinement.
    assert all(torch.equal(first[k], v) for k, v in net.state_dict().items())
    again, _ = refine(net, data, settings, steps=15, stream=open("/dev/null", "w"))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in tuned.state_dict().items())
