"""Pixel weights of the training loss that balance rare kinetics against common ones.

The curve loss is a mean over pixels, so a tissue that covers few pixels counts little
however wrong the network is there. On the phantom the spleen (fast exchange,
beta = k2 + k3 ~ 2.8 /min against ~0.6 in liver and kidneys) is 0.6 % of the training
pixels, and the network's beta stays there well below each pixel's own optimum. Weighting
each pixel by the inverse of how common its kinetics are (imbalanced regression; the
label-distribution smoothing of Yang et al., ICML 2021, "Delving into deep imbalanced
regression") makes rare curves count. No label enters: the "kinetics" of a pixel is its
own least-squares (K1, beta) from the fast fitter on its curve, and only their histogram
is used. beta alone does not single the spleen out (noise spreads the body's many pixels
over every beta); with K1 beside it, it does.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

# Histogram of (log K1, log beta): bins of 0.1 (10 % steps), smoothed with a Gaussian of
# 2 bins (LDS's kernel); weights at most MAX_RATIO times the mean.
BIN_WIDTH = 0.1
SMOOTH_BINS = 2.0
MAX_RATIO = 10.0
POWERS = {"none": 0.0, "balanced": 1.0, "balanced_sqrt": 0.5}


def smoothed_density(features: np.ndarray, bin_width=BIN_WIDTH, smooth_bins=SMOOTH_BINS):
    """The histogram density of points ``features`` [N, d] (or [N]) smoothed with a
    Gaussian kernel, evaluated at each point ([N]); it integrates to 1 over the bins."""
    x = np.asarray(features, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    pad = 4 * smooth_bins * bin_width
    lo = np.floor(x.min(0) / bin_width) * bin_width - pad
    n_bins = np.ceil((x.max(0) - lo + pad) / bin_width).astype(int) + 1
    index = np.minimum(((x - lo) / bin_width).astype(np.int64), n_bins - 1)
    counts = np.zeros(n_bins)
    np.add.at(counts, tuple(index.T), 1.0)
    density = gaussian_filter(counts, smooth_bins, mode="constant", truncate=4.0)
    return density[tuple(index.T)] / (len(x) * bin_width ** x.shape[1])


def balanced_weights(features: np.ndarray, power: float = 1.0, max_ratio: float = MAX_RATIO):
    """Pixel weights ``density(features) ** -power``, mean 1, at most ``max_ratio``.

    Parameters
    ----------
    features : numpy.ndarray, [N, d] or [N]
        What each pixel's kinetics are: its own least-squares (log K1, log beta).
    power : float
        1: inverse density (every bin of kinetics counts alike); 0.5: its square root; 0:
        equal weights.
    max_ratio : float
        Largest weight, as a multiple of the mean: a handful of outlying pixels must not
        dominate the loss.

    Returns
    -------
    numpy.ndarray, [N], float64, mean 1.
    """
    n = len(features)
    if power == 0 or n == 0:
        return np.ones(n)
    w = smoothed_density(features) ** -power
    w /= w.mean()
    # Clip, renormalise, repeat: clipping lowers the mean and lets others pass the cap.
    for _ in range(50):
        if w.max() <= max_ratio * (1 + 1e-9):
            break
        w = np.minimum(w, max_ratio)
        w /= w.mean()
    return w


def pixel_weight_maps(train_set, settings, frame_weights, stream=None) -> np.ndarray:
    """Balanced weights [S, H, W] of a :class:`kinpet.training.SliceSet`'s masked pixels
    (0 elsewhere), from each pixel's fast least-squares K1 and beta on its own curve with
    the loss's frame weights; ``settings.pixel_weights`` chooses the power."""
    import torch

    from kinpet.fitting import fit
    from kinpet.metrics import activity_mask

    power = POWERS[settings.pixel_weights]
    tacs = train_set.tacs
    scale = torch.tensor(train_set.scales, dtype=tacs.dtype)[train_set.subject]
    mask = activity_mask(
        tacs * scale.view(-1, 1, 1, 1), train_set.frames, settings.mask_threshold,
        settings.mask_auc,
    ).numpy()  # fmt: skip
    features = np.zeros((*mask.shape, 2))
    for s, model in enumerate(train_set.models):
        rows = (train_set.subject == s).numpy()
        inside = mask & rows[:, None, None]
        curves = tacs.numpy().transpose(0, 2, 3, 1)[inside]
        result = fit(curves, model.input_function, model.frames, weights=frame_weights,
                     sampling=model.sampling)  # fmt: skip
        k1, beta = result.params[:, 0], result.params[:, 1] + result.params[:, 2]
        features[inside] = np.log(np.column_stack([k1, beta]).clip(min=1e-3))
    features = np.nan_to_num(features, nan=np.log(1e-3))
    weights = np.zeros(mask.shape)
    weights[mask] = balanced_weights(features[mask], power)
    if stream is not None:
        print(
            f"pixel weights ({settings.pixel_weights}): {int(mask.sum())} pixels, weight "
            f"5th/50th/95th percentile {np.percentile(weights[mask], [5, 50, 95]).round(3)}, "
            f"max {weights[mask].max():.2f}",
            file=stream,
        )
    return weights
