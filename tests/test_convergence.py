"""The convergence study's references: the loss floor, the truth monitor, learning curves."""

import numpy as np
import pandas as pd
import pytest
import torch

from kinpet.convergence import (
    learning_curves,
    loss_floor,
    masked_curves,
    monitor_subject,
    pooled_floor,
    published_loss,
)
from kinpet.figures import convergence_figure
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import KineticModel, irreversible_2tc, ki
from kinpet.network import KineticUNet

FRAMES = FrameSchedule.paper()
INPUT = InputFunction.feng(peak_kbq_per_ml=250.0, delay_s=10.0)


def curves_with_truth(n=200, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    truth = np.column_stack(
        [
            rng.uniform(0.2, 1.0, n),
            rng.uniform(0.3, 1.0, n),
            rng.uniform(0.02, 0.1, n),
            rng.uniform(0.0, 0.1, n),
        ]
    )
    clean = irreversible_2tc(truth, INPUT, FRAMES)
    return clean + rng.normal(0, noise, clean.shape), truth


def test_floor_of_noise_free_curves_is_zero():
    curves, _ = curves_with_truth()
    assert loss_floor(curves, INPUT, FRAMES) < 1e-6 * np.mean(curves**2)


def test_floor_is_below_the_truth_on_noisy_curves():
    curves, truth = curves_with_truth(noise=2.0, seed=1)
    model = KineticModel(INPUT, FRAMES)
    at_truth = published_loss(curves, truth, model)
    floor = loss_floor(curves, INPUT, FRAMES)
    # The truth's loss is the noise variance (4) on average; least squares fits 4 of the
    # 62 degrees of freedom, so the floor is about 58/62 of it, and never above it.
    assert at_truth == pytest.approx(4.0, rel=0.05)
    assert floor <= at_truth
    assert floor == pytest.approx(at_truth * 58 / 62, rel=0.05)


def test_masked_curves_and_pooling():
    tacs = np.zeros((2, 62, 3, 4), np.float32)
    tacs[0, :, 1, 2] = 5.0  # area 5 x 60 min = 300 > 10
    tacs[1, :, 0, 0] = 0.1  # area 6 < 10
    curves = masked_curves(tacs, FRAMES, 10.0)
    assert curves.shape == (1, 62) and np.all(curves == 5.0)
    assert pooled_floor([1.0, 4.0], [3, 1]) == pytest.approx(7 / 4)
    assert np.isnan(pooled_floor([1.0], [0]))


def test_monitor_scores_a_network_against_the_truth():
    # A 16 x 16 x 3 "subject": two organs with known parameters.
    labels = np.zeros((16, 16, 3), np.int16)
    labels[2:14, 2:8] = 1
    labels[2:14, 8:14] = 2
    params = np.zeros((16, 16, 3, 4))
    params[labels == 1] = [0.6, 0.7, 0.02, 0.02]
    params[labels == 2] = [1.2, 1.5, 0.05, 0.04]
    pet = np.where(labels[..., None] > 0, irreversible_2tc(params, INPUT, FRAMES), 0.0)
    truth = {n: params[..., i] for i, n in enumerate(("K1", "k2", "k3", "Vb"))}
    truth["Ki"] = np.where(labels > 0, ki(np.where(params > 0, params, 1.0)), 0.0)
    monitor = monitor_subject(
        pet.astype(np.float32), labels, {"a": 1, "b": 2}, truth, INPUT, FRAMES, erode_voxels=0
    )
    torch.manual_seed(0)
    row = monitor(KineticUNet())
    assert row["test_floor"] < 1e-6 * np.mean(pet[labels > 0] ** 2)
    assert abs(row["fast_a_K1_bias_pct"]) < 0.1 and abs(row["fast_b_Ki_bias_pct"]) < 0.1
    # An untrained network is far off, and the monitor says so in numbers.
    assert row["test_loss"] > 100 * row["test_floor"]
    assert set(row) >= {
        f"{o}_{p}_{m}_pct" for o in "ab" for p in ("K1", "Ki") for m in ("bias", "rmse")
    }


def test_learning_curves_and_figure():
    log = pd.DataFrame(
        {
            "epoch": [1, 2, 3, 4],
            "train_loss": [1.0, 0.8, 0.7, 0.6],
            "val_loss": [np.nan, 20, np.nan, 15],
        }
    )
    monitor = pd.DataFrame(
        {
            "epoch": [2, 4],
            "train_eval_loss": [30.0, 20.0],
            "train_floor": [10.0, 10.0],
            "val_floor": [5.0, 5.0],
            "test_loss": [40.0, 30.0],
            "test_floor": [10.0, 10.0],
            "liver_K1_bias_pct": [-20.0, -5.0],
            "fast_liver_K1_bias_pct": [2.0, 2.0],
            "liver_Ki_bias_pct": [50.0, 10.0],
        }
    )
    table = learning_curves(log, monitor).assign(ablation="x")
    np.testing.assert_allclose(table["train_ratio"].dropna(), [3.0, 2.0])
    np.testing.assert_allclose(table["val_ratio"].dropna(), [4.0, 3.0])
    np.testing.assert_allclose(table["test_ratio"].dropna(), [4.0, 3.0])
    fig = convergence_figure(table, ["liver"])
    assert len(fig.axes) == 3
