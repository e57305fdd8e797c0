"""The network, its loss and its checkpoints under another kinetic model than the paper's
(``TrainSettings.model``): outputs, bounds and loss follow the registry's model."""

import numpy as np
import pytest
import torch

from kinpet.checkpoints import stale_reason
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import tacs
from kinpet.models import get_model
from kinpet.network import INITIAL_VALUES, KineticUNet
from kinpet.prediction import predict_volume
from kinpet.training import (
    SliceSet,
    TrainSettings,
    batch_mask,
    build_model,
    loss_weights,
    save_checkpoint,
    training_loss,
)
from kinpet.training import (
    load_model as load_network,
)

FRAMES = FrameSchedule.paper()
REVERSIBLE = get_model("reversible_2tc")


def reversible_subject(seed=0, size=16):
    """Two slices of smooth reversible-model maps through the exact model, with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    truth = np.stack(
        [0.3 + 0.6 * xx, 0.4 + yy, 0.02 + 0.06 * xx, 0.005 + 0.02 * yy, 0.05 + 0.1 * yy], -1
    )
    inp = InputFunction.feng(peak_kbq_per_ml=200.0, delay_s=6.0)
    clean = tacs("reversible_2tc", truth, inp, FRAMES).transpose(2, 0, 1)  # [T, H, W]
    slices = np.stack([clean, 1.1 * clean]) + rng.normal(0, 1.0, (2, *clean.shape))
    return slices.astype(np.float32), inp


@pytest.mark.parametrize("activation", ["multi_clamp", "sigmoid"])
def test_reversible_network_has_five_outputs_inside_the_registry_bounds(activation):
    torch.manual_seed(0)
    net = build_model(TrainSettings(model="reversible_2tc", activation=activation))
    assert net.n_outputs == 5
    lo = torch.tensor(REVERSIBLE.lower, dtype=torch.float32).view(1, 5, 1, 1)
    hi = torch.tensor(REVERSIBLE.upper, dtype=torch.float32).view(1, 5, 1, 1)
    torch.testing.assert_close(net.lower, lo)
    torch.testing.assert_close(net.upper, hi)
    x = 50 * torch.randn(2, 1, 64, 16, 16)
    with torch.no_grad():
        start = net(x)
        # Push the head's bias outside every bound, so that the activation must act.
        net.head[1].bias.copy_(torch.tensor([-9.0, 9.0, 0.5, 9.0, -9.0]))
        out = net(x)
    assert start.shape == out.shape == (2, 5, 16, 16)
    for values in (start, out):
        assert (values >= lo).all() and (values <= hi).all()
    if activation == "sigmoid":  # the head starts at typical values, k4 among them
        initial = torch.tensor([INITIAL_VALUES[p] for p in REVERSIBLE.parameters])
        net = build_model(TrainSettings(model="reversible_2tc", activation=activation))
        net.head[1].weight.data.zero_()
        with torch.no_grad():
            flat = net(x)[0, :, 0, 0]
        torch.testing.assert_close(flat, initial, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["reversible_2tc", "one_tc"])
def test_training_loss_is_the_masked_mse_of_the_model_curves(model):
    slices, inp = reversible_subject()
    settings = TrainSettings(model=model, activation="sigmoid", loss_weights="none")
    data = SliceSet.from_subjects([slices], [inp], FRAMES, settings.sampling, settings.scaling)
    torch.manual_seed(0)
    net = build_model(settings)
    rows = torch.arange(2)
    meas = data.tacs[rows]
    weights = loss_weights(FRAMES, settings, "cpu")
    loss = training_loss(net, meas, rows, data, settings, weights)
    # By hand: the network's maps (time padded with zeros, as in training), their curves
    # from kinpet.kinetics.tacs, the squared error over the masked pixels' frames.
    from kinpet.network import slices_to_parameters

    with torch.no_grad():
        params = slices_to_parameters(net, meas, "zeros").permute(0, 2, 3, 1).double().numpy()
    assert params.shape[-1] == len(get_model(model).parameters)
    curves = tacs(model, params, inp, FRAMES).transpose(0, 3, 1, 2)  # [B, T, H, W]
    mask = batch_mask(meas, rows, data, settings).numpy()
    assert mask.any()
    error = (curves - meas.numpy().astype(np.float64)) ** 2
    expected = error.transpose(0, 2, 3, 1)[mask].mean()
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-4)
    loss.backward()  # the closed form is differentiable
    assert all(p.grad is not None for p in net.head.parameters())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"model": "patlak"}, "unknown kinetic model 'patlak'; known: irreversible_2tc"),
        ({"projection": True}, "projection: true is for model 'irreversible_2tc' only"),
        (
            {"activation": "log_beta", "projection": False},
            "activation 'log_beta' needs projection",
        ),
        (
            {"activation": "sigmoid", "loss": "newton", "projection": False},
            "loss 'newton' needs projection",
        ),
    ],
)
def test_settings_refuse_what_the_model_cannot_train(options, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(**{"model": "reversible_2tc", **options})


def test_irreversible_only_switches_are_refused_for_another_model():
    # log_beta and the Newton loss need projection, which is the irreversible model's.
    message = "projection: true is for model 'irreversible_2tc' only .*, not 'one_tc'"
    with pytest.raises(ValueError, match=message):
        TrainSettings(model="one_tc", activation="log_beta", projection=True)
    with pytest.raises(ValueError, match=message):
        TrainSettings(model="one_tc", loss="newton", projection=True)
    TrainSettings(activation="log_beta", projection=True, loss="newton")  # irreversible: fine


def test_checkpoint_keeps_the_model_for_prediction(tmp_path):
    settings = TrainSettings(model="reversible_2tc", activation="sigmoid")
    torch.manual_seed(0)
    net = build_model(settings)
    optimizer = torch.optim.AdamW(net.parameters())
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    best = {"val_loss": 1.0, "epoch": 1}
    generator = torch.Generator()
    save_checkpoint(tmp_path / "best.pt", net, optimizer, schedule, generator, 0, best, settings)
    loaded, saved = load_network(tmp_path / "best.pt", "cpu")
    assert saved.model == "reversible_2tc" and loaded.n_outputs == 5
    pet = np.random.default_rng(1).uniform(0, 20, (16, 16, 2, 62)).astype(np.float32)
    maps = predict_volume(loaded, pet, kinetic_model=saved.model)
    assert maps.shape == (16, 16, 2, 7)  # K1, k2, k3, k4, Vb, VT, VS
    k1, k2, k3, k4 = (maps[..., i].astype(np.float64) for i in range(4))
    np.testing.assert_allclose(maps[..., 5], k1 / k2 * (1 + k3 / k4), rtol=1e-5)
    np.testing.assert_allclose(maps[..., 6], k1 * k3 / (k2 * k4), rtol=1e-5)
    with pytest.raises(ValueError, match="5 outputs, model irreversible_2tc 4 parameters"):
        predict_volume(loaded, pet)


def test_states_saved_before_the_model_setting_resume_as_irreversible():
    """A state saved before `model` and `ema_decay` existed resumes under their defaults."""
    settings = TrainSettings()
    saved = {k: v for k, v in vars(settings).items() if k not in ("model", "ema_decay")}
    assert stale_reason({"settings": saved, "data": "x"}, settings, "x") is None
    other = TrainSettings(model="reversible_2tc", projection=False)
    assert "model 'irreversible_2tc' -> 'reversible_2tc'" in stale_reason(
        {"settings": saved, "data": "x"}, other, "x"
    )
    averaged = TrainSettings(ema_decay=0.99)
    assert "ema_decay 0.0 -> 0.99" in stale_reason({"settings": saved, "data": "x"}, averaged, "x")


def test_the_default_network_is_the_papers():
    # Four outputs within the paper's bounds: build_model's registry bounds are those.
    net = build_model(TrainSettings())
    reference = KineticUNet("space_time", "3d", "multi_clamp")
    assert net.n_outputs == 4
    torch.testing.assert_close(net.lower, reference.lower, rtol=0, atol=0)
    torch.testing.assert_close(net.upper, reference.upper, rtol=0, atol=0)
    torch.testing.assert_close(net.head[1].bias, reference.head[1].bias, rtol=0, atol=0)
