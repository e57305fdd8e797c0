"""Agreement between measured and model time-activity curves, per slice.

The paper (Sec. 2.2, Table 1) scores the network by the cosine similarity (CS) and the mean
absolute error (MAE) between measured and predicted TACs over the pixels of the
low-activity mask, reported as mean +/- sd over test slices. Its code averages the
per-pixel CS over masked pixels and the absolute error over masked pixel-frames; so do we.
"""

from __future__ import annotations

import numpy as np
import torch

MASK_AUC_TIMES = ("mid", "start")
# Where Table 1 scores the test slices (domain_mask): kinpet's whole body plane, or the
# published test's crop.
TEST_DOMAINS = ("kinpet", "paper")


def activity_mask(tacs, frames, threshold: float = 10.0, auc_times: str = "mid"):
    """Pixels whose curve has enough activity to be fitted.

    Parameters
    ----------
    tacs : array or tensor, shape [..., T, H, W]
        Frame values (kBq/ml).
    frames : FrameSchedule
        The T frames.
    threshold : float
        Minimum area under the curve (kBq/ml x min); the paper's code uses 10.
    auc_times : {"mid", "start"}
        Where the frame values sit on the time axis (min) of the trapezoidal area:
        frame mid-times (kinpet's default), or frame starts (the published code's
        mask; for FDG curves on the paper's schedule its area is 3 to 4.5 % smaller,
        mostly because it ends at the last frame's start, 60 of 65 min).

    Returns
    -------
    Boolean mask of shape [..., H, W], same kind as ``tacs``.
    """
    if auc_times not in MASK_AUC_TIMES:
        raise ValueError(f"auc_times must be one of {MASK_AUC_TIMES}, not {auc_times!r}")
    t = frames.mids_min if auc_times == "mid" else frames.starts_min
    if torch.is_tensor(tacs):
        t = torch.as_tensor(t, dtype=tacs.dtype, device=tacs.device)
        return torch.trapezoid(tacs, t, dim=-3) > threshold
    return np.trapezoid(np.asarray(tacs), t, axis=-3) > threshold


def domain_mask(
    tacs,
    frames,
    labels,
    domain: str = "kinpet",
    threshold: float = 10.0,
    auc_times: str = "mid",
    window=None,
):
    """The pixels of axial slices that the test metrics (Table 1) score.

    Parameters
    ----------
    tacs : ndarray, shape [..., T, X, Y]
        Measured frame values (kBq/ml) of whole transaxial planes.
    frames : FrameSchedule
    labels : ndarray of int, shape [..., X, Y]
        Label map of the same planes (0 outside the body).
    domain : {"kinpet", "paper"}
        "kinpet": the whole plane, pixels with enough activity (:func:`activity_mask`)
        inside the body (labels > 0), so that noise outside the body is never scored.
        "paper": the published test: pixels with enough activity inside ``window`` (the
        112 x 112 crop of the slice dataset), whatever their label.
    threshold, auc_times
        Of :func:`activity_mask`: minimum TAC area (kBq/ml x min) and its time points.
    window : ((x0, x1), (y0, y1)), optional
        Half-open index ranges along X and Y of the crop; needed with "paper". Parts
        outside the plane are the crop's zero padding, which is never active.

    Returns
    -------
    ndarray of bool, shape [..., X, Y]
    """
    if domain not in TEST_DOMAINS:
        raise ValueError(f"domain must be one of {TEST_DOMAINS}, not {domain!r}")
    mask = activity_mask(np.asarray(tacs), frames, threshold, auc_times)
    if domain == "kinpet":
        return mask & (np.asarray(labels) > 0)
    if window is None:
        raise ValueError("domain 'paper' scores the crop: give its window ((x0, x1), (y0, y1))")
    (x0, x1), (y0, y1) = window
    inside = np.zeros(mask.shape[-2:], dtype=bool)
    inside[max(x0, 0) : max(x1, 0), max(y0, 0) : max(y1, 0)] = True
    return mask & inside


def tac_metrics(measured, predicted, mask):
    """Cosine similarity and mean absolute error per slice over masked pixels.

    Parameters
    ----------
    measured, predicted : array or tensor, shape [S, T, H, W]
    mask : array or tensor of bool, shape [S, H, W]

    Returns
    -------
    cs, mae : numpy arrays of shape [S]; NaN for a slice without masked pixels.
    """
    m = torch.as_tensor(np.asarray(measured) if not torch.is_tensor(measured) else measured)
    p = torch.as_tensor(np.asarray(predicted) if not torch.is_tensor(predicted) else predicted)
    k = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask).bool()
    m, p = m.double(), p.double()
    cos = torch.nn.functional.cosine_similarity(m, p, dim=1, eps=1e-12)  # [S, H, W]
    n = k.sum(dim=(1, 2))
    cs = (cos * k).sum(dim=(1, 2)) / n
    mae = ((m - p).abs() * k[:, None]).sum(dim=(1, 2, 3)) / (n * m.shape[1])
    return cs.cpu().numpy(), mae.cpu().numpy()


def slice_metrics(pet, curves, labels, frames, threshold=10.0, auc_times="mid", paper=None):
    """CS and MAE of model curves against a measured volume, per axial slice.

    Parameters
    ----------
    pet : ndarray, shape [X, Y, Z, T]
        Measured frame values (kBq/ml).
    curves : callable
        ``curves(z)`` -> model frame values of slice ``z``, shape [X, Y, T]; called only for
        slices with scored pixels.
    labels : ndarray of int, shape [X, Y, Z]
        0 outside the body.
    frames : FrameSchedule
    threshold, auc_times
        Of :func:`activity_mask`.
    paper : (window, z), optional
        Also score the published test's domain (columns ``paper_pixels, paper_cs,
        paper_mae``): the crop ``window`` ((x0, x1), (y0, y1)) of the slices in ``z``.

    Returns
    -------
    dict of 1-D arrays over z: ``z, pixels, cs, mae`` (kinpet's domain: whole plane, body
    pixels), and the ``paper_`` columns when ``paper`` is given; NaN where no pixel counts.
    """
    n_z = pet.shape[2]
    prefixes = ["", "paper_"] if paper is not None else [""]
    out = {"z": np.arange(n_z)}
    for prefix in prefixes:
        out[f"{prefix}pixels"] = np.zeros(n_z, dtype=int)
        out[f"{prefix}cs"] = np.full(n_z, np.nan)
        out[f"{prefix}mae"] = np.full(n_z, np.nan)
    for z in range(n_z):
        measured = np.transpose(pet[:, :, z, :], (2, 0, 1))[None]  # [1, T, X, Y]
        plane = labels[None, :, :, z]
        masks = {"": domain_mask(measured, frames, plane, "kinpet", threshold, auc_times)}
        if paper is not None:
            window, paper_z = paper
            masks["paper_"] = (
                domain_mask(measured, frames, plane, "paper", threshold, auc_times, window)
                if z in paper_z
                else np.zeros_like(masks[""])
            )
        predicted = None
        for prefix, mask in masks.items():
            out[f"{prefix}pixels"][z] = int(mask.sum())
            if not mask.any():
                continue
            if predicted is None:
                predicted = np.transpose(curves(z), (2, 0, 1))[None]
            cs, mae = tac_metrics(measured, predicted, mask)
            out[f"{prefix}cs"][z], out[f"{prefix}mae"][z] = cs[0], mae[0]
    return out
