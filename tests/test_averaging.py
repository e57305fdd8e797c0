"""Weight averaging in training (``ema_decay``): the average, and what training keeps."""

import pytest
import torch
from test_network_training import Killed, kill_at, tiny_sets

from kinpet.averaging import average_decay, averaged_copy, snapshot_weight, update_average
from kinpet.training import TrainSettings, train


def test_average_decay_warms_up_then_holds():
    assert average_decay(0, 0.99) == pytest.approx(1 / 10)
    assert average_decay(8, 0.99) == pytest.approx(9 / 18)
    assert average_decay(10_000, 0.99) == 0.99
    assert average_decay(10_000, 0.5) == 0.5


def test_snapshot_weights_give_a_uniform_average():
    """Folding snapshots 1..6 in with the weights, from start 3: the mean of 3..6."""
    average = 0.0
    for epoch in range(1, 7):
        average = snapshot_weight(epoch, 3) * average + (1 - snapshot_weight(epoch, 3)) * epoch
    assert average == pytest.approx((3 + 4 + 5 + 6) / 4)
    assert [snapshot_weight(e, 3) for e in (1, 2, 3)] == [0, 0, 0]


def test_update_average_against_the_formula():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    average = averaged_copy(model)
    start = {k: v.clone() for k, v in average.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    update_average(average, model, 0.8)
    for name, value in model.state_dict().items():
        expected = 0.8 * start[name] + 0.2 * value
        torch.testing.assert_close(average.state_dict()[name], expected, rtol=0, atol=1e-7)
    assert not any(p.requires_grad for p in average.parameters())
    assert not average.training


def states(path):
    state = torch.load(path, weights_only=True)
    return state["model"], state.get("trained")


@pytest.mark.slow
def test_training_with_averaging(tmp_path):
    """The optimiser's trajectory is the plain run's; the saved "model" is the running
    average of it, step by step; a killed averaging run resumes to the same weights."""
    train_set, val_set = tiny_sets()
    one_step = len(train_set)  # one optimiser step per epoch: epoch e holds step e's weights

    def settings(epochs, decay):
        return TrainSettings(
            epochs=epochs,
            batch_size=one_step,
            validate_every=1,
            learning_rate=1e-3,
            schedule="step",  # its learning rates do not depend on the number of epochs
            ema_decay=decay,
        )

    decay = 0.6
    for epochs in (1, 2, 3):
        train(train_set, val_set, settings(epochs, decay), tmp_path / f"ema{epochs}")
    train(train_set, val_set, settings(3, 0.0), tmp_path / "plain")

    plain, no_trained = states(tmp_path / "plain" / "last.pt")
    average3, trained3 = states(tmp_path / "ema3" / "last.pt")
    assert no_trained is None
    assert all(torch.equal(plain[k], trained3[k]) for k in plain)  # averaging steers nothing

    average, _ = states(tmp_path / "ema1" / "last.pt")
    for step, epochs in ((1, 2), (2, 3)):
        trained = states(tmp_path / f"ema{epochs}" / "last.pt")[1]
        weight = average_decay(step, decay)
        average = {k: weight * average[k] + (1 - weight) * trained[k] for k in average}
    for k in average:
        torch.testing.assert_close(average3[k], average[k], rtol=0, atol=1e-6)
    assert any(not torch.allclose(average3[k], trained3[k]) for k in average3)

    # Killed in its second epoch and resumed: the uninterrupted run's weights, both kinds.
    out, state, ema3 = tmp_path / "out", tmp_path / "state", settings(3, decay)
    with pytest.raises(Killed):
        train(train_set, val_set, ema3, out, True, monitor=kill_at(2), state_dir=state)
    train(train_set, val_set, ema3, out, True, monitor=lambda m: {}, state_dir=state)
    resumed_average, resumed_trained = states(out / "last.pt")
    assert all(torch.equal(resumed_average[k], average3[k]) for k in average3)
    assert all(torch.equal(resumed_trained[k], trained3[k]) for k in trained3)


@pytest.mark.slow
def test_training_with_weight_averaging_over_epochs(tmp_path):
    """swa_start: the saved "model" is the trained weights up to the window, then the plain
    run's epoch-end weights averaged uniformly; the trajectory is the plain run's."""
    train_set, val_set = tiny_sets()

    def settings(epochs, start):
        return TrainSettings(
            epochs=epochs,
            batch_size=4,
            validate_every=1,
            learning_rate=1e-3,
            schedule="step",  # its learning rates do not depend on the number of epochs
            swa_start=start,
        )

    plain = {}
    for epochs in (2, 3, 4):
        train(train_set, val_set, settings(epochs, 0), tmp_path / f"plain{epochs}")
        plain[epochs] = states(tmp_path / f"plain{epochs}" / "last.pt")[0]
    train(train_set, val_set, settings(4, 2), tmp_path / "swa")
    average, trained = states(tmp_path / "swa" / "last.pt")
    assert all(torch.equal(trained[k], plain[4][k]) for k in trained)  # steers nothing
    for k in average:
        expected = (plain[2][k] + plain[3][k] + plain[4][k]) / 3
        torch.testing.assert_close(average[k], expected, rtol=0, atol=1e-6)
    assert any(not torch.allclose(average[k], trained[k]) for k in average)
    # Up to the window the validated weights are the trained ones: epoch 2 of the average's
    # run equals the plain 2-epoch run.
    train(train_set, val_set, settings(2, 2), tmp_path / "swa2")
    first = states(tmp_path / "swa2" / "last.pt")[0]
    assert all(torch.equal(first[k], plain[2][k]) for k in first)


def test_swa_start_is_checked():
    with pytest.raises(ValueError, match="swa_start must be an epoch in"):
        TrainSettings(epochs=10, swa_start=11)
    with pytest.raises(ValueError, match="pick one"):
        TrainSettings(epochs=10, swa_start=5, ema_decay=0.9)


def test_ema_decay_outside_its_range_is_refused():
    with pytest.raises(ValueError, match="ema_decay must lie in"):
        TrainSettings(ema_decay=1.0)
