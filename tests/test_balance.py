"""Balanced pixel weights of the training loss (kinpet.balance)."""

import io

import numpy as np
import pytest
import torch
from test_network_training import tiny_sets

from kinpet.balance import balanced_weights, smoothed_density
from kinpet.settings import TrainSettings
from kinpet.training import masked_mse, train


def test_smoothed_density_of_a_normal_sample():
    """Within 5 % of the normal density (widened by the kernel: sd^2 + (2 bins)^2) at
    -1, 0 and 1 sd, for 200,000 draws of sd 0.5."""
    values = np.random.default_rng(0).normal(0.0, 0.5, 200_000)
    density = smoothed_density(values)
    sd = np.sqrt(0.5**2 + 0.2**2)
    for x in (-0.5, 0.0, 0.5):
        near = np.abs(values - x) < 0.01
        expected = np.exp(-0.5 * (x / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
        assert density[near].mean() == pytest.approx(expected, rel=0.05)


def test_a_rare_tissue_gets_the_inverse_of_its_share():
    """99 % of the pixels near log beta -0.5, 1 % near 1.0: with inverse-density weights
    each group carries about half of the total weight, and the square-root variant about
    the square root of the ratio; weights have mean 1 and obey the cap."""
    rng = np.random.default_rng(1)
    log_beta = np.concatenate([rng.normal(-0.5, 0.05, 9900), rng.normal(1.0, 0.05, 100)])
    rare = np.arange(log_beta.size) >= 9900
    w = balanced_weights(log_beta, 1.0, max_ratio=1000)
    assert w.mean() == pytest.approx(1.0)
    assert w[rare].sum() / w.sum() == pytest.approx(0.5, abs=0.02)
    root = balanced_weights(log_beta, 0.5, max_ratio=1000)
    assert root[rare].mean() / root[~rare].mean() == pytest.approx(np.sqrt(99), rel=0.05)
    capped = balanced_weights(log_beta, 1.0, max_ratio=10)
    assert capped.max() <= 10 * (1 + 1e-9) and capped.mean() == pytest.approx(1.0)
    np.testing.assert_array_equal(balanced_weights(log_beta, 0.0), np.ones(log_beta.size))


def test_pixel_weights_in_the_loss():
    rng = np.random.default_rng(2)
    pred, meas = (torch.from_numpy(rng.random((2, 5, 3, 4))) for _ in range(2))
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    pixels = torch.from_numpy(rng.random((2, 3, 4)))
    expected = (((pred - meas) ** 2).mean(1) * pixels).sum() / pixels.sum()
    assert masked_mse(pred, meas, mask, pixels=pixels).item() == pytest.approx(expected.item())
    assert masked_mse(pred, meas, mask, pixels=torch.ones(2, 3, 4)).item() == pytest.approx(
        masked_mse(pred, meas, mask).item()
    )


def test_settings_check_pixel_weights():
    with pytest.raises(ValueError, match="pixel_weights must be one of"):
        TrainSettings(pixel_weights="inverse")
    with pytest.raises(ValueError, match="apply to loss 'curves' only"):
        TrainSettings(pixel_weights="balanced", projection=True, loss="newton")


@pytest.mark.slow
def test_training_with_balanced_pixel_weights(tmp_path):
    """Trains (flips on: the weights flip with the curves), says what the weights are, and
    the loss falls."""
    import pandas as pd

    train_set, val_set = tiny_sets()
    settings = TrainSettings(epochs=4, batch_size=3, validate_every=2, learning_rate=1e-3,
                             threads=2, pixel_weights="balanced", flips=True)  # fmt: skip
    stream = io.StringIO()
    train(train_set, val_set, settings, tmp_path, stream=stream)
    assert "pixel weights (balanced)" in stream.getvalue()
    log = pd.read_csv(tmp_path / "log.csv")
    assert log.train_loss.iloc[-1] < log.train_loss.iloc[0]


def test_two_features_single_out_what_one_cannot():
    """Two groups with the same beta but a tenfold K1, 95 % and 5 %: beta alone gives both
    the same weight, (K1, beta) gives the rare group about its inverse share."""
    rng = np.random.default_rng(3)
    beta = rng.normal(0.0, 0.05, 10_000)
    k1 = np.where(np.arange(10_000) < 9500, -2.0, 0.3) + rng.normal(0.0, 0.05, 10_000)
    rare = np.arange(10_000) >= 9500
    one = balanced_weights(beta, 1.0, max_ratio=1000)
    assert one[rare].mean() / one[~rare].mean() == pytest.approx(1.0, abs=0.1)
    two = balanced_weights(np.column_stack([k1, beta]), 1.0, max_ratio=1000)
    assert two[rare].mean() / two[~rare].mean() == pytest.approx(95 / 5, rel=0.1)
