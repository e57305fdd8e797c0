"""Figures of the evaluation (matplotlib with the Agg backend, seaborn for grouped bars).

Functions take arrays or tables and return a :class:`matplotlib.figure.Figure`;
:func:`save_figure` writes it atomically. Image planes follow the NIfTI-ordered grids of
the pipeline (x towards the patient's left, y towards posterior, z towards the head):
axial slices are shown in the radiological view (patient's right on the left, anterior
up) and coronal planes head up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from kinpet.evaluation import UNITS  # noqa: E402
from kinpet.io import atomic_path  # noqa: E402

METHOD_LABELS = {
    "network": "network",
    "curve_fit": "curve fit",
    "curve_fit_paper": "curve fit (published)",
    "fast": "fast fit",
    "reference": "reference",
    "truth": "truth",
}
# Blue, orange and green for network, curve fit and reference, as the paper's Fig. 2.
METHOD_COLOURS = {
    "network": "#1f77b4",
    "curve_fit": "#ff7f0e",
    "curve_fit_paper": "#ff7f0e",
    "fast": "#9467bd",
    "reference": "#2ca02c",
    "truth": "#2ca02c",
}
BAR_WIDTH = 0.8


def _by_method(frame: pd.DataFrame, organs, methods, names=METHOD_LABELS):
    """Rows of ``organs`` and ``methods`` with the methods renamed for the legend, their
    order and their colours: (data, hue_order, palette) for :func:`_organ_bars`."""
    data = frame[frame["organ"].isin(organs) & frame["method"].isin(methods)]
    data = data.assign(method=data["method"].map(lambda m: names.get(m, m)))
    hue_order = [names.get(m, m) for m in methods]
    palette = {names.get(m, m): METHOD_COLOURS.get(m, "grey") for m in methods}
    return data, hue_order, palette


def save_figure(fig: Figure, path, dpi: int = 150) -> None:
    """Write ``fig`` to ``path`` (format from the suffix) through a temporary file.

    PDFs get no creation date, so the same figure gives the same bytes.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    metadata = {"CreationDate": None} if fmt == "pdf" else None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, metadata=metadata)


def dodge_positions(n_groups: int, n_hues: int, width: float = BAR_WIDTH) -> np.ndarray:
    """Centres ``[group, hue]`` of dodged bars as seaborn draws them (groups at 0, 1, ...)."""
    step = width / n_hues
    offsets = -width / 2 + step * (np.arange(n_hues) + 0.5)
    return np.arange(n_groups)[:, None] + offsets[None, :]


def _organ_bars(ax, data, y, organs, hue_order, palette, sd_errors=True):
    """One panel of bars: organs along x, one bar per method (``hue``), error bars the sd
    over subjects (``sd_errors``) or none; x without label, organ names tilted."""
    errors = (
        {"errorbar": "sd", "capsize": 0.15, "err_kws": {"linewidth": 1}}
        if sd_errors
        else {"errorbar": None}
    )
    sns.barplot(
        data=data,
        x="organ",
        y=y,
        hue="method",
        order=list(organs),
        hue_order=hue_order,
        palette=palette,
        width=BAR_WIDTH,
        ax=ax,
        **errors,
    )
    ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=30)


def _one_legend(axes, keep) -> None:
    """Keep the legend of panel ``keep`` only, beside it on the right."""
    for ax in axes:
        if ax is not keep and ax.get_legend() is not None:
            ax.get_legend().remove()
    if keep.get_legend() is not None:
        sns.move_legend(keep, "upper left", bbox_to_anchor=(1.0, 1.0), title=None)


def organ_parameter_figure(
    per_subject: pd.DataFrame,
    organs: Sequence[str],
    methods: Sequence[str],
    parameters: Sequence[str] = ("K1", "k2", "k3", "Vb"),
    given_sd: pd.DataFrame | None = None,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """Fig. 2: organ values of each method, one panel per parameter.

    Parameters
    ----------
    per_subject : DataFrame
        ``subject, method, organ, parameter, value``: one row per subject (a published
        reference is one row); bars show the mean, error bars the sd over subjects.
    organs, methods, parameters : sequences
        What to show, in this order.
    given_sd : DataFrame, optional
        ``method, organ, parameter, sd``: spreads given with single-row values (a
        published mean +/- sd), drawn as error bars on those bars.
    labels : mapping, optional
        Method -> legend text.
    """
    names = {**METHOD_LABELS, **(labels or {})}
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(
        1, len(parameters), figsize=(3.2 * len(parameters), 3.4), layout="constrained"
    )
    axes = np.atleast_1d(axes)
    data, hue_order, palette = _by_method(per_subject, organs, methods, names)
    centres = dodge_positions(len(organs), len(methods))
    for ax, name in zip(axes, parameters, strict=True):
        _organ_bars(ax, data[data["parameter"] == name], "value", organs, hue_order, palette)
        if given_sd is not None:
            for _, row in given_sd[given_sd["parameter"] == name].iterrows():
                if row["organ"] in organs and row["method"] in methods and np.isfinite(row["sd"]):
                    i, j = list(organs).index(row["organ"]), list(methods).index(row["method"])
                    mean = data.loc[
                        (data["parameter"] == name)
                        & (data["organ"] == row["organ"])
                        & (data["method"] == hue_order[j]),
                        "value",
                    ].mean()
                    ax.errorbar(
                        centres[i, j], mean, yerr=row["sd"], color="0.26", capsize=3, linewidth=1
                    )
        ax.set_title(name)
        ax.set_ylabel(f"{name} ({UNITS.get(name, '')})")
    _one_legend(axes, axes[-1])
    return fig


def _masked_image(ax, plane, extent, vmin, vmax, cmap="viridis"):
    cm = plt.get_cmap(cmap).with_extremes(bad="black")
    return ax.imshow(
        np.ma.masked_invalid(plane),
        origin="lower",
        extent=extent,
        cmap=cm,
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
        aspect="equal",
    )


def robust_limits(*arrays, upper: float = 99.0) -> tuple[float, float]:
    """Colour range 0 .. the ``upper`` percentile of the finite values of all arrays."""
    values = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0
    top = float(np.percentile(values, upper))
    return 0.0, top if top > 0 else float(values.max()) or 1.0


def cs_profile_figure(
    metrics: pd.DataFrame,
    voxel_mm: float,
    extents: pd.DataFrame,
    coronal: Mapping[str, np.ndarray],
    subject: str = "",
    fit: tuple[str, pd.DataFrame] | None = None,
) -> Figure:
    """Fig. 3: (a) cosine similarity per axial slice along the body axis, organ extents
    shaded; (b-e) one coronal plane of each parameter map, head up, on the same axis.

    Parameters
    ----------
    metrics : DataFrame
        ``z, pixels, cs`` per axial slice (``slice_metrics.tsv``).
    voxel_mm : float
        Voxel size (mm); positions along the body axis are ``z * voxel_mm``.
    extents : DataFrame
        ``organ, z0, z1`` (slice indices, inclusive) of the shaded organs.
    coronal : mapping
        Parameter name -> coronal plane ``[x, z]``.
    fit : (name, DataFrame), optional
        A voxel-wise fit's ``z, pixels, cs`` on the same slices, drawn beside the network's.
    """
    sns.set_theme(style="ticks", context="paper")
    names = list(coronal)
    fig, axes = plt.subplots(
        1,
        1 + len(names),
        figsize=(2.6 * (1 + len(names)), 5.2),
        sharey=True,
        layout="constrained",
        gridspec_kw={"width_ratios": [1.2] + [1] * len(names)},
    )
    ax = axes[0]
    rows = metrics[(metrics["pixels"] > 0) & np.isfinite(metrics["cs"])]
    colours = sns.color_palette("Set2", max(len(extents), 1))
    # Each organ shades its own vertical strip of the panel: organs whose z ranges overlap
    # (liver and spleen) would otherwise hide one another.
    width = 1.0 / max(len(extents), 1)
    for i, (colour, (_, organ)) in enumerate(zip(colours, extents.iterrows(), strict=False)):
        ax.axhspan(
            (organ["z0"] - 0.5) * voxel_mm,
            (organ["z1"] + 0.5) * voxel_mm,
            xmin=i * width,
            xmax=(i + 1) * width,
            color=colour,
            alpha=0.35,
            linewidth=0,
            label=organ["organ"],
        )
    ax.plot(rows["cs"], rows["z"] * voxel_mm, "-", color="k", linewidth=1.2, label="network")
    if fit is not None:
        name, table = fit
        shown = table[(table["pixels"] > 0) & np.isfinite(table["cs"])]
        ax.plot(shown["cs"], shown["z"] * voxel_mm, "--", color="C1", linewidth=1.0, label=name)
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("position along the body axis (mm, inferior to superior)")
    ax.set_title(f"(a) {subject}".strip())
    # Below the panel: inside it, the legend would cover part of the CS trace.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2, frameon=False)
    first = next(iter(coronal.values())) if coronal else np.zeros((1, 1))
    nx, nz = first.shape
    extent = (0, nx * voxel_mm, -0.5 * voxel_mm, (nz - 0.5) * voxel_mm)
    for k, (ax, name) in enumerate(zip(axes[1:], names, strict=True)):
        plane = coronal[name]
        vmin, vmax = robust_limits(plane)
        image = _masked_image(ax, plane.T, extent, vmin, vmax)
        ax.set_title(f"({'bcdefgh'[k]}) {name}")
        ax.set_xlabel("right -> left (mm)")
        fig.colorbar(image, ax=ax, shrink=0.6, label=UNITS.get(name, ""))
    axes[0].set_ylim(extent[2], extent[3])
    return fig


def axial_comparison_figure(
    left: np.ndarray,
    right: np.ndarray,
    labels: np.ndarray,
    contours: Mapping[str, int],
    voxel_mm: float,
    titles: tuple[str, str],
    parameter: str = "K1",
) -> Figure:
    """Fig. 4: one axial slice of two maps side by side on one colour scale, with organ
    contours.

    Parameters
    ----------
    left, right : ndarray ``[x, y]``
        The two maps of the slice (NaN where there is no value).
    labels : ndarray ``[x, y]``
        Labels of the slice.
    contours : mapping
        Organ name -> label value of the contoured organs (those present are drawn).
    """
    sns.set_theme(style="white", context="paper")
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4), layout="constrained")
    vmin, vmax = robust_limits(left, right)
    nx, ny = left.shape
    # Rows of the shown image run anterior (top) to posterior; columns patient right to left.
    extent = (0, nx * voxel_mm, ny * voxel_mm, 0)
    colours = sns.color_palette("bright", max(len(contours), 1))
    handles = []
    for ax, plane, title in zip(axes, (left, right), titles, strict=True):
        cm = plt.get_cmap("viridis").with_extremes(bad="black")
        image = ax.imshow(
            np.ma.masked_invalid(plane.T),
            extent=extent,
            cmap=cm,
            vmin=vmin,
            vmax=vmax,
            interpolation="nearest",
        )
        for colour, (organ, index) in zip(colours, contours.items(), strict=False):
            mask = (labels == index).T.astype(float)
            if mask.any():
                # Contours at voxel centres of the same extent as the image.
                xs = (np.arange(nx) + 0.5) * voxel_mm
                ys = (np.arange(ny) + 0.5) * voxel_mm
                ax.contour(xs, ys, mask, levels=[0.5], colors=[colour], linewidths=1.2)
                if ax is axes[0]:
                    handles.append(Line2D([], [], color=colour, label=organ))
        ax.set_title(title)
        ax.set_xlabel("patient right -> left (mm)")
        ax.set_ylabel("anterior -> posterior (mm)")
    fig.colorbar(image, ax=axes, shrink=0.8, label=f"{parameter} ({UNITS.get(parameter, '')})")
    if handles:
        axes[1].legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.8)
    return fig


def truth_recovery_figure(
    pooled: pd.DataFrame,
    organs: Sequence[str],
    methods: Sequence[str],
    parameters: Sequence[str] = ("K1", "k2", "k3", "Vb", "Ki"),
) -> Figure:
    """Relative bias and RMSE (percent of the true organ mean) per organ, parameter and
    method, from :func:`kinpet.truth.pool_truth_errors` (symmetric log scale)."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(
        2,
        len(parameters),
        figsize=(3.0 * len(parameters), 5.6),
        layout="constrained",
        sharex=True,
    )
    data, hue_order, palette = _by_method(pooled, organs, methods)
    for row, (column, what) in enumerate((("bias_pct", "bias"), ("rmse_pct", "RMSE"))):
        for col, name in enumerate(parameters):
            ax = axes[row, col]
            subset = data[data["parameter"] == name]
            _organ_bars(ax, subset, column, organs, hue_order, palette, sd_errors=False)
            ax.axhline(0, color="0.3", linewidth=0.8)
            # Errors span from a few percent to thousands (a Vb of 0.01): linear to +-10 %,
            # logarithmic beyond.
            ax.set_yscale("symlog", linthresh=10)
            ax.set_title(f"{name}: {what}")
            ax.set_ylabel(f"{what} (% of true mean)" if col == 0 else "")
    _one_legend(axes.ravel(), axes[0, -1])
    return fig


def smoothness_figure(
    smooth: pd.DataFrame,
    organs: Sequence[str],
    methods: Sequence[str],
    parameters: Sequence[str] = ("K1", "k2", "k3", "Vb", "Ki"),
) -> Figure:
    """Within-organ coefficient of variation of each method's maps and of the truth (bars:
    mean over subjects, error bars: sd over subjects)."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(
        1, len(parameters), figsize=(3.0 * len(parameters), 3.4), layout="constrained"
    )
    axes = np.atleast_1d(axes)
    data, hue_order, palette = _by_method(smooth, organs, methods)
    data = data.assign(cv_pct=100 * data["cv"])
    for col, (ax, name) in enumerate(zip(axes, parameters, strict=True)):
        _organ_bars(ax, data[data["parameter"] == name], "cv_pct", organs, hue_order, palette)
        ax.set_title(name)
        ax.set_ylabel("within-organ CV (%)" if col == 0 else "")
    _one_legend(axes, axes[-1])
    return fig


def _epoch_line(ax, run: pd.DataFrame, column: str, style: str, colour, label: str) -> None:
    """One learning curve: ``column`` of ``run`` against its epoch, where it has values."""
    rows = run[run[column].notna()]
    ax.plot(rows["epoch"], rows[column], style, color=colour, marker=".", label=label)


def convergence_figure(curves: pd.DataFrame, organs: Sequence[str]) -> Figure:
    """Learning curves of the convergence study (:func:`kinpet.convergence.learning_curves`).

    Left: the training, validation and test losses (the published loss, in evaluation
    mode) as ratios to the fast fitter's floor on the same pixels, against the epoch.
    Middle and right: the test subject's organ-mean bias of K1 and Ki against the truth,
    with the fast fitter's bias as a dashed line of the same colour. One line style per
    ablation (column ``ablation``).
    """
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    styles = ["-", "--", ":", "-."]
    colours = sns.color_palette("deep", max(len(organs), 3))
    loss_colours = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}
    for k, (ablation, run) in enumerate(curves.groupby("ablation", sort=False)):
        style = styles[k % len(styles)]
        for name, colour in loss_colours.items():
            column = f"{name}_ratio"
            if column in run and run[column].notna().any():
                _epoch_line(axes[0], run, column, style, colour, f"{name} ({ablation})")
        for ax, parameter in zip(axes[1:], ("K1", "Ki"), strict=True):
            for colour, organ in zip(colours, organs, strict=False):
                column = f"{organ}_{parameter}_bias_pct"
                if column not in run:
                    continue
                _epoch_line(ax, run, column, style, colour, f"{organ} ({ablation})")
                fast = run.get(f"fast_{column}")
                if k == 0 and fast is not None and fast.notna().any():
                    ax.axhline(fast.dropna().iloc[0], color=colour, linestyle=(0, (4, 3)), lw=0.8)
    axes[0].axhline(1.0, color="black", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("loss / fast-fit floor")
    axes[0].set_title("loss (published MSE) / floor")
    for ax, parameter in zip(axes[1:], ("K1", "Ki"), strict=True):
        ax.axhline(0.0, color="black", lw=0.8)
        ax.axhspan(-10, 10, color="0.9", zorder=0)
        ax.set_yscale("symlog", linthresh=10)
        ax.set_ylabel(f"{parameter} organ-mean bias (%)")
        ax.set_title(f"{parameter} bias vs truth (dashed: fast fit)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7, frameon=False)
    return fig
