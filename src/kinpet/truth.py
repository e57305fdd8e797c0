"""Truth recovery on the phantom: bias, RMSE and within-organ smoothness of estimated
parameter maps against the true maps (arrays in, tables out; the conventions of
:mod:`kinpet.evaluation`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from kinpet.evaluation import erode


def truth_errors(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    """Bias and RMSE of an estimated map against the true map inside a mask.

    Voxels where either map is not finite are left out.

    Returns
    -------
    dict
        ``voxels``, ``truth_mean``, ``estimate_mean``, ``bias`` = mean(estimate - truth),
        ``rmse`` = sqrt(mean((estimate - truth)^2)) (parameter units) and their relative
        values ``bias_pct``, ``rmse_pct`` (percent of the mean true value).
    """
    est, tru = np.asarray(estimate, np.float64)[mask], np.asarray(truth, np.float64)[mask]
    keep = np.isfinite(est) & np.isfinite(tru)
    est, tru = est[keep], tru[keep]
    if not est.size:
        nan = np.nan
        return dict(
            voxels=0,
            truth_mean=nan,
            estimate_mean=nan,
            bias=nan,
            rmse=nan,
            bias_pct=nan,
            rmse_pct=nan,
        )
    diff = est - tru
    truth_mean = float(tru.mean())
    bias, rmse = float(diff.mean()), float(np.sqrt(np.mean(diff**2)))
    scale = 100.0 / truth_mean if truth_mean != 0 else np.nan
    return {
        "voxels": int(est.size),
        "truth_mean": truth_mean,
        "estimate_mean": float(est.mean()),
        "bias": bias,
        "rmse": rmse,
        "bias_pct": bias * scale,
        "rmse_pct": rmse * scale,
    }


def coefficient_of_variation(values: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """Within-mask coefficient of variation sd / mean (ddof 0) of the finite values, and
    their count (NaN, 0 when there are none)."""
    v = np.asarray(values, np.float64)[mask]
    v = v[np.isfinite(v)]
    if not v.size or v.mean() == 0:
        return np.nan, int(v.size)
    return float(v.std() / v.mean()), int(v.size)


def truth_recovery(
    estimates: Mapping[str, Mapping[str, np.ndarray]],
    truth: Mapping[str, np.ndarray],
    labels: np.ndarray,
    organs: Mapping[str, int],
    erode_voxels: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Truth recovery and smoothness of several methods in one subject.

    Parameters
    ----------
    estimates : mapping
        Method name -> (parameter name -> map ``[x, y, z]``).
    truth : mapping
        Parameter name -> true map on the same grid.
    labels : ndarray ``[x, y, z]``
    organs : mapping
        Organ name -> label value.
    erode_voxels : int
        Organ masks are eroded by this many voxels before any statistic.

    Returns
    -------
    errors : DataFrame
        ``organ, parameter, method`` and the fields of :func:`truth_errors`, over the
        eroded organ voxels where the method has a value.
    smoothness : DataFrame
        ``organ, parameter, method, cv, voxels``: within-organ coefficient of variation of
        each method's map and of the truth (method ``truth``) over the same eroded mask
        (each method over the voxels it has values for).
    """
    errors, smooth = [], []
    for organ, index in organs.items():
        mask = erode(labels == index, erode_voxels)
        for name, true_map in truth.items():
            cv, n = coefficient_of_variation(true_map, mask)
            smooth.append(
                {"organ": organ, "parameter": name, "method": "truth", "cv": cv, "voxels": n}
            )
            for method, maps in estimates.items():
                if name not in maps:
                    continue
                row = truth_errors(maps[name], true_map, mask)
                errors.append({"organ": organ, "parameter": name, "method": method, **row})
                cv, n = coefficient_of_variation(maps[name], mask)
                smooth.append(
                    {"organ": organ, "parameter": name, "method": method, "cv": cv, "voxels": n}
                )
    return pd.DataFrame(errors), pd.DataFrame(smooth)


def pool_truth_errors(per_subject: pd.DataFrame) -> pd.DataFrame:
    """Truth errors of several subjects pooled voxel-wise (each subject weighted by its
    voxel count), from per-subject rows of :func:`truth_recovery`.

    Bias and mean are voxel-weighted means; the RMSE is the root of the voxel-weighted
    mean squared error, so the pooled numbers are exactly those of all voxels together.
    """
    df = per_subject[per_subject["voxels"] > 0].copy()
    w = df["voxels"].astype(np.float64)
    df["_w_truth"] = df["truth_mean"] * w
    df["_w_est"] = df["estimate_mean"] * w
    df["_w_bias"] = df["bias"] * w
    df["_w_mse"] = df["rmse"] ** 2 * w
    keys = ["organ", "parameter", "method"]
    g = df.groupby(keys, sort=False)[["voxels", "_w_truth", "_w_est", "_w_bias", "_w_mse"]].sum()
    g = g.reset_index()
    n = g["voxels"].astype(np.float64)
    out = g[keys].copy()
    out["subjects"] = df.groupby(keys, sort=False).size().to_numpy()
    out["voxels"] = g["voxels"].astype(int)
    out["truth_mean"] = g["_w_truth"] / n
    out["estimate_mean"] = g["_w_est"] / n
    out["bias"] = g["_w_bias"] / n
    out["rmse"] = np.sqrt(g["_w_mse"] / n)
    scale = 100.0 / out["truth_mean"].where(out["truth_mean"] != 0)
    out["bias_pct"] = out["bias"] * scale
    out["rmse_pct"] = out["rmse"] * scale
    return out
