"""Whole-body prediction of parametric images with a trained kinetic UNet."""

from __future__ import annotations

import sys

import numpy as np
import torch

from kinpet.kinetics import ki
from kinpet.network import KineticUNet, pad_frames


def predict_slices(model: KineticUNet, tacs, batch_size: int = 8) -> np.ndarray:
    """Parameter maps [S, 4, H, W] (float32) of slices [S, T, H, W] (kBq/ml).

    Slices of any size work (the network is fully convolutional): they are zero-padded to
    a multiple of 2**depth pixels and the padding is cut off again.
    """
    device = next(model.parameters()).device
    tacs = torch.as_tensor(np.asarray(tacs, dtype=np.float32))
    s, _, h, w = tacs.shape
    m = model.spatial_multiple
    ph, pw = (-h) % m, (-w) % m
    out = np.empty((s, 4, h, w), dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        for rows in torch.arange(s).split(batch_size):
            x = tacs[rows].to(device)
            if ph or pw:
                x = torch.nn.functional.pad(x, (0, pw, 0, ph))
            params = model(pad_frames(x, model.n_frames))
            out[rows.numpy()] = params[:, :, :h, :w].float().cpu().numpy()
    return out


def predict_volume(model: KineticUNet, pet, batch_size: int = 8, stream=sys.stderr) -> np.ndarray:
    """Parameter maps of every axial slice of a 4D image.

    Parameters
    ----------
    model : KineticUNet
        A trained network (on its device).
    pet : array, shape [X, Y, Z, T]
        The dynamic image (kBq/ml) on its 2.5 mm grid, z the axial axis.
    batch_size : int
        Slices per forward pass.

    Returns
    -------
    numpy.ndarray, shape [X, Y, Z, 5], float32
        K1, k2, k3, Vb and Ki per voxel, predicted on the full transaxial plane.
    """
    nx, ny, nz, _ = pet.shape
    out = np.empty((nx, ny, nz, 5), dtype=np.float32)
    step = max(batch_size, 1) * 4
    for z0 in range(0, nz, step):
        z1 = min(nz, z0 + step)
        slab = np.ascontiguousarray(np.transpose(pet[:, :, z0:z1, :], (2, 3, 0, 1)))
        params = predict_slices(model, slab, batch_size)  # [S, 4, X, Y]
        per_voxel = np.transpose(params, (2, 3, 0, 1))  # [X, Y, S, 4]
        out[:, :, z0:z1, :4] = per_voxel
        out[:, :, z0:z1, 4] = ki(per_voxel)
        print(f"predicted slices {z1}/{nz}", file=stream, flush=True)
    return out


def place_slices(maps, z, crop, volume_shape, fill=np.nan) -> np.ndarray:
    """Put cropped slice maps [S, C, H, W] back into a volume [X, Y, Z, C].

    ``z`` [S] are the slices' indices along the volume's third axis and ``crop`` = (x0, y0)
    the volume index of each slice's first row and column; parts of a crop that fall
    outside the volume (a crop larger than the image) are dropped. Voxels no slice covers
    hold ``fill``.
    """
    maps = np.asarray(maps)
    nx, ny, nz = volume_shape[:3]
    s, c, h, w = maps.shape
    out = np.full((nx, ny, nz, c), fill, dtype=np.float32)
    x0, y0 = int(crop[0]), int(crop[1])
    xs, ys = slice(max(x0, 0), min(x0 + h, nx)), slice(max(y0, 0), min(y0 + w, ny))
    hs = slice(xs.start - x0, xs.stop - x0)
    ws = slice(ys.start - y0, ys.stop - y0)
    for i, zi in enumerate(np.asarray(z, dtype=int)):
        out[xs, ys, zi, :] = np.moveaxis(maps[i][:, hs, ws], 0, -1)
    return out
