"""Convergence study of the self-supervised network on the phantom.

The phantom knows the true parameters, so a training run can be followed not only by
its loss but by what matters: how far the network's organ means are from the truth. This
module gives the two references the study plots the network against:

- the *floor* of the loss: the voxel-wise least-squares optimum of the fast fitter on the
  same pixels. No parameter map within the bounds fits the measured curves better on
  this loss (up to the fitter's own tolerance), so a network's loss divided by the floor
  is >= 1, and 1 means it fits as well as fitting each voxel on its own;
- a *monitor* of a test subject: at every validation of a training run, its whole body
  is predicted and the organ-mean bias and voxel RMSE against the true maps computed,
  on the eroded organ masks of the truth-recovery table.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from kinpet.fitting import fit
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import KineticModel
from kinpet.metrics import activity_mask
from kinpet.prediction import predict_volume
from kinpet.truth import truth_recovery

MAP_NAMES = ("K1", "k2", "k3", "Vb", "Ki")


def published_loss(measured: np.ndarray, params: np.ndarray, model: KineticModel) -> float:
    """Mean squared error (kBq/ml)^2 over curves and frames of the model of ``params``.

    Parameters
    ----------
    measured : array [N, T]
        Measured curves (kBq/ml).
    params : array [N, 4]
        K1, k2, k3, Vb per curve.
    model : KineticModel
        The subject's model (input in kBq/ml).
    """
    if not len(measured):
        return float("nan")
    predicted = model(np.asarray(params, dtype=np.float64))
    return float(np.mean((predicted - np.asarray(measured, dtype=np.float64)) ** 2))


def masked_curves(
    tacs: np.ndarray, frames: FrameSchedule, threshold: float, auc_times: str = "mid"
) -> np.ndarray:
    """The curves [N, T] of the pixels of slices [S, T, H, W] whose area exceeds
    ``threshold`` (kBq/ml x min; the loss's mask, its area over ``auc_times`` as
    :func:`kinpet.metrics.activity_mask`)."""
    tacs = np.asarray(tacs, dtype=np.float32)
    return np.moveaxis(tacs, 1, -1)[activity_mask(tacs, frames, threshold, auc_times)]


def _fast_fit(curves, input_function, frames, sampling):
    """The fast fitter's unweighted fits of curves [N, T], and their parameters with the
    curves it could not fit set to the lower bounds (so that they still have a model)."""
    result = fit(curves, input_function, frames, method="fast", weights="none", sampling=sampling)
    filled = np.where(np.isfinite(result.params), result.params, [0.01, 0.01, 0.01, 0.0])
    return result, filled


def loss_floor(
    curves: np.ndarray, input_function: InputFunction, frames: FrameSchedule, sampling="average"
) -> float:
    """The fast fitter's least-squares optimum of the published loss on these curves.

    Parameters
    ----------
    curves : array [N, T]
        Measured curves (kBq/ml) of one subject, e.g. from :func:`masked_curves`.
    input_function, frames, sampling
        The subject's kinetic model.

    Returns
    -------
    float
        Mean squared error (kBq/ml)^2 of the unweighted voxel-wise fits; curves the fitter
        cannot fit count with their model at the lower bounds.
    """
    _, params = _fast_fit(curves, input_function, frames, sampling)
    return published_loss(curves, params, KineticModel(input_function, frames, sampling))


def pooled_floor(floors: Sequence[float], counts: Sequence[int]) -> float:
    """Floors of several subjects pooled as one loss over all their pixels."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() == 0:
        return float("nan")
    return float(np.sum(np.asarray(floors) * counts) / counts.sum())


def monitor_subject(
    pet: np.ndarray,
    labels: np.ndarray,
    organs: Mapping[str, int],
    truth: Mapping[str, np.ndarray],
    input_function: InputFunction,
    frames: FrameSchedule,
    sampling: str = "average",
    mask_threshold: float = 10.0,
    erode_voxels: int = 1,
    scale: float = 1.0,
    projection=None,
    mask_auc: str = "mid",
):
    """A function ``monitor(network) -> dict`` scoring a network on one phantom subject.

    Parameters
    ----------
    pet : array [X, Y, Z, T]
        The subject's 2.5-mm image (kBq/ml).
    labels : array [X, Y, Z]
        Its labels (0 outside the body).
    organs : mapping
        Organ name -> label value, for the bias and RMSE.
    truth : mapping
        Parameter name (K1, k2, k3, Vb, Ki) -> true map on the same grid.
    input_function, frames, sampling
        The subject's kinetic model.
    mask_threshold : float
        Area threshold of the loss's mask (kBq/ml x min).
    mask_auc : {"mid", "start"}
        Time points of that area (:func:`kinpet.metrics.activity_mask`).
    erode_voxels : int
        Erosion of the organ masks (as the truth-recovery table).
    scale : float
        The subject's input scale, for a network trained with ``scaling="input"``.
    projection : callable, optional
        For a network trained with ``projection=True``
        (:func:`kinpet.training.subject_projection`).

    Returns
    -------
    callable
        ``monitor(network)`` returns ``test_loss`` (the published loss over the body's
        masked voxels), ``test_floor`` (the fast fitter's on the same voxels, fitted once
        here), ``<organ>_<parameter>_bias_pct`` and ``..._rmse_pct`` for K1 and Ki, and
        the same for the fast fitter's maps, prefixed ``fast_``.
    """
    body = labels > 0
    curves = pet[body]  # [N, T]
    keep = activity_mask(curves.T[:, :, None], frames, mask_threshold, mask_auc)[:, 0]
    measured = curves[keep]
    model = KineticModel(input_function, frames, sampling)
    fitted, fast_params = _fast_fit(measured, input_function, frames, sampling)
    reference = {"test_floor": published_loss(measured, fast_params, model)}
    fast_maps = np.full((*labels.shape, 5), np.nan, dtype=np.float32)
    body_values = np.full((int(body.sum()), 5), np.nan, dtype=np.float32)
    body_values[keep, :4] = fitted.params
    body_values[keep, 4] = fitted.ki
    fast_maps[body] = body_values
    reference.update(_organ_errors(fast_maps, truth, labels, organs, erode_voxels, "fast_"))

    def monitor(network) -> dict:
        maps = predict_volume(
            network, pet, stream=io.StringIO(), scale=scale, projection=projection
        )
        maps[~body] = np.nan
        row = {"test_loss": published_loss(measured, maps[body][keep][:, :4], model)}
        row.update(reference)
        row.update(_organ_errors(maps, truth, labels, organs, erode_voxels))
        return row

    return monitor


def _organ_errors(maps, truth, labels, organs, erode_voxels, prefix="") -> dict:
    """``<prefix><organ>_<K1|Ki>_{bias,rmse}_pct`` of maps [X, Y, Z, 5] against the truth."""
    estimate = {name: maps[..., i] for i, name in enumerate(MAP_NAMES)}
    errors, _ = truth_recovery({"m": estimate}, truth, labels, organs, erode_voxels)
    row = {}
    for rec in errors[errors["parameter"].isin(["K1", "Ki"])].itertuples():
        row[f"{prefix}{rec.organ}_{rec.parameter}_bias_pct"] = rec.bias_pct
        row[f"{prefix}{rec.organ}_{rec.parameter}_rmse_pct"] = rec.rmse_pct
    return row


def learning_curves(log: pd.DataFrame, monitor: pd.DataFrame) -> pd.DataFrame:
    """One table per epoch of a training's ``log.csv`` and ``monitor.csv`` (joined on
    ``epoch``), with the losses as ratios to their floors."""
    table = log.merge(monitor, on="epoch", how="left")
    losses = {"train": "train_eval_loss", "val": "val_loss", "test": "test_loss"}
    for name, loss in losses.items():
        floor = f"{name}_floor"
        if loss in table and floor in table:
            table[f"{name}_ratio"] = table[loss] / table[floor]
    return table
