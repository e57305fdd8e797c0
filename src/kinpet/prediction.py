"""Whole-body prediction of parametric images with a trained kinetic UNet."""

from __future__ import annotations

import sys

import numpy as np
import torch

from kinpet.models import get_model, macro_maps, parameter_map_names
from kinpet.network import KineticUNet, slices_to_parameters


def predict_slices(
    model: KineticUNet, tacs, batch_size: int = 8, scale: float = 1.0, projection=None
) -> np.ndarray:
    """Parameter maps [S, n, H, W] (float32, the network's n outputs) of slices
    [S, T, H, W] (kBq/ml).

    Slices of any size work (the network is fully convolutional): they are zero-padded to
    a multiple of 2**depth pixels and the padding is cut off again. ``scale`` divides the
    slices first (the subject's input scale, for a network trained with
    ``scaling="input"``). ``projection`` (for a network trained with ``projection=True``:
    :func:`kinpet.training.subject_projection`) maps the network's outputs and the
    scaled slices to the parameters.
    """
    device = next(model.parameters()).device
    tacs = torch.as_tensor(np.asarray(tacs, dtype=np.float32) / np.float32(scale))
    out = np.empty((tacs.shape[0], model.n_outputs, *tacs.shape[2:]), dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        for rows in torch.arange(tacs.shape[0]).split(batch_size):
            batch = tacs[rows].to(device)
            params = slices_to_parameters(model, batch)
            if projection is not None:
                params = projection(params, batch)
            out[rows.numpy()] = params.float().cpu().numpy()
    return out


def volume_slices(pet) -> np.ndarray:
    """Axial slices [Z, T, Y, X] of a 4-D image [X, Y, Z, T], as the training data has them."""
    return np.ascontiguousarray(np.transpose(pet, (2, 3, 1, 0)))


def predict_volume(
    model: KineticUNet,
    pet,
    batch_size: int = 8,
    stream=sys.stderr,
    scale: float = 1.0,
    projection=None,
    kinetic_model: str = "irreversible_2tc",
) -> np.ndarray:
    """Parameter maps of every axial slice of a 4D image.

    Parameters
    ----------
    model : KineticUNet
        A trained network (on its device).
    pet : array, shape [X, Y, Z, T]
        The dynamic image (kBq/ml) on its 2.5 mm grid, z the axial axis.
    batch_size : int
        Slices per forward pass.
    scale : float
        Divides the image first (see :func:`predict_slices`).
    projection : callable, optional
        See :func:`predict_slices`.
    kinetic_model : str
        The model of :data:`kinpet.models.MODELS` the network was trained with
        (``TrainSettings.model``).

    Returns
    -------
    numpy.ndarray, shape [X, Y, Z, M], float32
        The model's :func:`kinpet.models.parameter_map_names` per voxel (K1, k2, k3, Vb
        and Ki for ``irreversible_2tc``), predicted on the full transaxial plane.
    """
    spec = get_model(kinetic_model)
    n = len(spec.parameters)
    if model.n_outputs != n:
        raise ValueError(
            f"the network has {model.n_outputs} outputs, model {spec.name} {n} parameters"
        )
    nx, ny, nz, _ = pet.shape
    out = np.empty((nx, ny, nz, len(parameter_map_names(spec))), dtype=np.float32)
    step = max(batch_size, 1) * 4
    for z0 in range(0, nz, step):
        z1 = min(nz, z0 + step)
        # Slices as the training data stores them: [S, T, H, W] with H along y, W along x.
        slab = volume_slices(pet[:, :, z0:z1, :])
        params = predict_slices(model, slab, batch_size, scale, projection)  # [S, n, Y, X]
        per_voxel = np.transpose(params, (3, 2, 0, 1))  # [X, Y, S, n]
        out[:, :, z0:z1, :n] = per_voxel
        for i, values in enumerate(macro_maps(spec, per_voxel).values()):
            out[:, :, z0:z1, n + i] = values
        print(f"predicted slices {z1}/{nz}", file=stream, flush=True)
    return out
