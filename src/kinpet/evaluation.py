"""Evaluation computations behind the tables and figures (arrays in, tables out).

Everything here is pure: no file is read or written (the pipeline's scripts do that), so
each number of a table can be recomputed from the maps in a notebook or a test.

Conventions: volumes are NIfTI-ordered ``[x, y, z]`` arrays on one grid, ``z`` the axial
(body) axis; parameter maps are NaN where a method gave no value (outside the body, or
outside the slices a fit covered); label maps are integers named by a label table
(name -> index, as :func:`kinpet.io.read_label_table` returns it).
Units: K1 in ml/cm3/min, k2, k3 and k4 in 1/min, Vb dimensionless, Ki in ml/cm3/min, VT
and VS in ml/cm3 (:data:`UNITS`, from :mod:`kinpet.models`); times in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.ndimage import binary_erosion

from kinpet.models import MODELS

# The maps of the irreversible two-tissue model (the paper's and the phantom's truth).
PARAMETERS = ("K1", "k2", "k3", "Vb", "Ki")
# Unit of every parameter and macro-parameter of every model.
UNITS = {name: unit for model in MODELS.values() for name, unit in model.units.items()}


class EvaluationError(ValueError):
    """An evaluation input does not hold what is needed; the message names the source."""


# -- organs -----------------------------------------------------------------------------


def organ_indices(label_names: Mapping[str, int], organs: Sequence[str], source=None) -> dict:
    """Label value of each organ, from a label table.

    Parameters
    ----------
    label_names : mapping
        Label name -> integer value (a ``labels.tsv`` / ``_dseg.tsv``).
    organs : sequence of str
        Organ names that must be in the table.
    source : str, optional
        The label table's file name, for the error message.

    Raises
    ------
    EvaluationError
        When an organ is not in the table (naming ``source`` and the labels it has).
    """
    missing = [o for o in organs if o not in label_names]
    if missing:
        where = f"{source}: " if source else ""
        raise EvaluationError(
            f"{where}no label named {', '.join(map(repr, missing))} "
            f"(labels: {', '.join(label_names)})"
        )
    return {o: int(label_names[o]) for o in organs}


def erode(mask: np.ndarray, voxels: int = 1) -> np.ndarray:
    """A boolean mask eroded by ``voxels`` voxels (6-connected structuring element).

    Erosion keeps organ statistics away from the edges, where a 2.5-mm voxel mixes the
    organ with its neighbours (partial volume); ``voxels = 0`` returns the mask unchanged.
    """
    mask = np.asarray(mask, dtype=bool)
    if voxels <= 0:
        return mask.copy()
    return binary_erosion(mask, iterations=int(voxels), border_value=0)


def organ_means(
    maps: Mapping[str, np.ndarray], labels: np.ndarray, organs: Mapping[str, int]
) -> pd.DataFrame:
    """Mean of each parameter map over each organ mask (finite voxels only).

    Parameters
    ----------
    maps : mapping
        Parameter name -> map ``[x, y, z]`` (NaN where there is no value).
    labels : ndarray ``[x, y, z]`` int
    organs : mapping
        Organ name -> label value (:func:`organ_indices`).

    Returns
    -------
    DataFrame
        Columns ``organ, parameter, value, voxels``: the mean (parameter units) over the
        organ's voxels where the map is finite, and how many voxels that is (value NaN
        when none).
    """
    rows = []
    for organ, index in organs.items():
        mask = labels == index
        for name, volume in maps.items():
            values = np.asarray(volume)[mask]
            values = values[np.isfinite(values)]
            rows.append(
                {
                    "organ": organ,
                    "parameter": name,
                    "value": float(values.astype(np.float64).mean()) if values.size else np.nan,
                    "voxels": int(values.size),
                }
            )
    return pd.DataFrame(rows, columns=["organ", "parameter", "value", "voxels"])


def with_ki(table: pd.DataFrame) -> pd.DataFrame:
    """A wide organ table (K1, k2, k3, ...) with ``Ki = K1 k3 / (k2 + k3)`` added if absent."""
    table = table.copy()
    if "Ki" not in table.columns:
        table["Ki"] = table["K1"] * table["k3"] / (table["k2"] + table["k3"])
    return table


def reference_long(table: pd.DataFrame, parameters: Sequence[str] = PARAMETERS) -> pd.DataFrame:
    """A wide table of reference organ values as long rows.

    Parameters
    ----------
    table : DataFrame
        Columns ``organ`` and any of ``parameters``, each optionally with a spread column
        ``<parameter>_sd`` (e.g. a published mean +/- sd).
    parameters : sequence of str
        The maps to keep (default :data:`PARAMETERS`; a kinetic model's
        :func:`kinpet.models.parameter_map_names`); the table's other columns are left out.

    Returns
    -------
    DataFrame
        ``organ, parameter, value, sd`` (sd NaN where none is given).
    """
    names = [p for p in parameters if p in table.columns]
    long = table.melt(id_vars=["organ"], value_vars=names, var_name="parameter")
    sd = pd.Series(np.nan, index=long.index)
    for name in names:
        if f"{name}_sd" in table.columns:
            spread = dict(zip(table["organ"], table[f"{name}_sd"], strict=True))
            rows = long["parameter"] == name
            sd[rows] = long.loc[rows, "organ"].map(spread).to_numpy(dtype=float)
    return long.assign(sd=sd.to_numpy())


def comparison_note(model: str, names: Sequence[str], reference: Sequence[str], label: str) -> str:
    """One line saying on which maps a model's estimates meet a reference, and which maps of
    either side have no counterpart; "" when both have the same maps.

    Parameters
    ----------
    model : str
        The kinetic model's name.
    names : sequence of str
        Its maps (parameters, macro-parameters).
    reference : sequence of str
        The reference's maps (the phantom's truth: the irreversible model's).
    label : str
        What the reference is, e.g. "truth (the phantom's irreversible two-tissue model)".
    """
    shared = [n for n in names if n in reference]
    own = [n for n in names if n not in reference]
    other = [n for n in reference if n not in names]
    if not own and not other:
        return ""
    text = f"Model {model}: compared with the {label} on {', '.join(shared) or 'no map'}"
    if own:
        text += f"; {', '.join(own)} {'has' if len(own) == 1 else 'have'} no reference value"
    if other:
        text += f"; {', '.join(other)} {'is' if len(other) == 1 else 'are'} not defined for {model}"
    return text + "."


def summarise_over_subjects(long: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over subjects of per-subject organ values.

    Parameters
    ----------
    long : DataFrame
        Columns ``subject, method, organ, parameter, value`` and optionally ``sd`` (a
        spread given with the value, e.g. a published mean +/- sd with one row).

    Returns
    -------
    DataFrame
        ``method, organ, parameter, mean, sd, subjects``: sd is the sample sd (ddof 1)
        over subjects; with a single row per group it is the row's given ``sd`` (NaN if
        none).
    """
    groups = long.groupby(["method", "organ", "parameter"], sort=False)
    out = groups["value"].agg(mean="mean", sd="std", subjects="count").reset_index()
    if "sd" in long.columns:
        given = groups["sd"].first().reset_index(drop=True)
        single = out["subjects"] == 1
        out.loc[single, "sd"] = given[single].to_numpy()
    return out


# -- TAC agreement (Table 1, Fig. 3a) ---------------------------------------------------


# slice_metrics.tsv columns of each test domain (kinpet.metrics.domain_mask).
DOMAIN_COLUMNS = {
    "kinpet": {"pixels": "pixels", "cs": "cs", "mae": "mae"},
    "paper": {"paper_pixels": "pixels", "paper_cs": "cs", "paper_mae": "mae"},
}


def domain_slice_metrics(metrics: pd.DataFrame, domain: str, source=None) -> pd.DataFrame:
    """The per-slice metrics of one test domain as columns ``z, pixels, cs, mae``.

    Parameters
    ----------
    metrics : DataFrame
        ``slice_metrics.tsv`` of the predict rule: ``z, pixels, cs, mae`` (kinpet's
        domain) and ``paper_pixels, paper_cs, paper_mae`` (the published test's).
    domain : {"kinpet", "paper"}
    source : str, optional
        The file, for the error message.
    """
    if domain not in DOMAIN_COLUMNS:
        raise EvaluationError(f"test domain must be one of {tuple(DOMAIN_COLUMNS)}, not {domain!r}")
    wanted = DOMAIN_COLUMNS[domain]
    missing = [c for c in ("z", *wanted) if c not in metrics.columns]
    if missing:
        where = f"{source}: " if source else ""
        raise EvaluationError(
            f"{where}no column(s) {', '.join(missing)} for test domain {domain!r} "
            "(written by an older predict rule? rerun it)"
        )
    return metrics[["z", *wanted]].rename(columns=wanted)


def slice_metric_summary(metrics: pd.DataFrame, z=None) -> dict:
    """Mean and sd of the per-slice CS and MAE over the test slices.

    Parameters
    ----------
    metrics : DataFrame
        ``slice_metrics.tsv`` rows (columns ``z, pixels, cs, mae``), of one or more
        subjects.
    z : array of int, optional
        Keep only these axial slices (e.g. the lungs-to-bladder slices of the dataset);
        with several subjects, filter each before concatenating instead.

    Returns
    -------
    dict
        ``cs_mean, cs_sd, mae_mean, mae_sd`` (MAE in kBq/ml; sd with ddof 1) and
        ``slices``, the number of slices with masked pixels that were averaged.
    """
    rows = metrics if z is None else metrics[metrics["z"].isin(np.asarray(z))]
    rows = rows[(rows["pixels"] > 0) & np.isfinite(rows["cs"]) & np.isfinite(rows["mae"])]
    cs, mae = rows["cs"].to_numpy(np.float64), rows["mae"].to_numpy(np.float64)
    sd = lambda v: float(np.std(v, ddof=1)) if v.size > 1 else np.nan  # noqa: E731
    return {
        "cs_mean": float(cs.mean()) if cs.size else np.nan,
        "cs_sd": sd(cs),
        "mae_mean": float(mae.mean()) if mae.size else np.nan,
        "mae_sd": sd(mae),
        "slices": int(cs.size),
    }


def z_extents(labels: np.ndarray, organs: Mapping[str, int]) -> pd.DataFrame:
    """First and last axial slice holding each organ (``z0, z1`` inclusive; organs
    without voxels are left out)."""
    rows = []
    for organ, index in organs.items():
        z = np.flatnonzero((labels == index).any(axis=(0, 1)))
        if z.size:
            rows.append({"organ": organ, "z0": int(z.min()), "z1": int(z.max())})
    return pd.DataFrame(rows, columns=["organ", "z0", "z1"])


def organ_slice_cs(extents: pd.DataFrame, cs: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean per-slice cosine similarity over the axial slices each organ spans (Fig. 3a's
    organ comparison: the paper reports 0.71 at heart and lungs against 0.87 in the liver).

    Parameters
    ----------
    extents : DataFrame
        ``organ, z0, z1`` (:func:`z_extents`).
    cs : mapping
        Method name -> ``z, pixels, cs`` per slice (``slice_metrics.tsv`` columns).

    Returns
    -------
    DataFrame ``organ, z0, z1, slices`` and one column per method (NaN slices skipped).
    """
    rows = []
    for _, organ in extents.iterrows():
        row = {"organ": organ["organ"], "z0": organ["z0"], "z1": organ["z1"]}
        for method, table in cs.items():
            inside = table["z"].between(organ["z0"], organ["z1"]) & (table["pixels"] > 0)
            values = table.loc[inside, "cs"].dropna()
            row.setdefault("slices", int(values.size))
            row[method] = float(values.mean()) if values.size else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["organ", "z0", "z1", "slices", *cs])


def coronal_plane(labels: np.ndarray, organs: Mapping[str, int]) -> int:
    """The coronal plane (y index) that cuts the most voxels of the given organs.

    Falls back to the plane with the most body voxels (label > 0) when none of the
    organs has voxels; ties go to the lowest y.
    """
    indices = list(organs.values())
    counts = np.isin(labels, indices).sum(axis=(0, 2)) if indices else np.zeros(1)
    if not np.any(counts):
        counts = (labels > 0).sum(axis=(0, 2))
    return int(np.argmax(counts))


def axial_slice(covered: np.ndarray, labels: np.ndarray, organs: Mapping[str, int]) -> int:
    """The axial slice (z) that shows the given organs best among the covered ones.

    Among the slices where ``covered`` is true (e.g. the slices a fit covered), the one
    holding the most of the organs, and among those the most of their voxels; if none of
    them holds any, the covered slice with the most body voxels. This is also how
    :func:`kinpet.voxelfit.figure_slice` chooses the slice of Fig. 4 that curve_fit
    covers, so the figure shows that slice.

    Raises
    ------
    EvaluationError
        When no slice is covered.
    """
    covered = np.asarray(covered, dtype=bool)
    if not covered.any():
        raise EvaluationError("the fit covers no axial slice")
    counts = np.stack(
        [(labels == v).sum(axis=(0, 1)) for v in organs.values()]
        or [np.zeros(labels.shape[2], dtype=np.int64)]
    )  # [organ, Z]
    # Organs present first; the voxel count (< total + 1) only breaks ties.
    score = (counts > 0).sum(axis=0) * (counts.sum() + 1) + counts.sum(axis=0)
    score = np.where(covered, score, -1)
    if score.max() <= 0:
        score = np.where(covered, (labels > 0).sum(axis=(0, 1)), -1)
    return int(np.argmax(score))


# -- run time ------------------------------------------------------------------------------


def body_voxel_counts(labels: np.ndarray) -> dict:
    """Body voxels (label > 0) of a subject: ``voxels`` in all, ``slices`` (axial slices
    of the volume), ``body_slices`` (those with body voxels) and ``voxels_per_slice``
    (mean over the body slices)."""
    per_slice = (np.asarray(labels) > 0).sum(axis=(0, 1))
    body_slices = int((per_slice > 0).sum())
    total = int(per_slice.sum())
    return {
        "voxels": total,
        "slices": int(per_slice.size),
        "body_slices": body_slices,
        "voxels_per_slice": total / body_slices if body_slices else np.nan,
    }


def runtime_table(
    network: pd.DataFrame, fits: pd.DataFrame, reference: str = "curve_fit"
) -> pd.DataFrame:
    """Seconds per voxel, per slice and per whole body of the network and the fitters.

    Parameters
    ----------
    network : DataFrame
        One row per test subject: ``seconds`` (the prediction job's wall time, s),
        ``voxels`` (body voxels), ``slices`` (axial slices
        predicted), ``voxels_per_slice``.
    fits : DataFrame
        One row per (method, subject): ``method``, ``seconds`` (sum over the subject's
        chunk jobs, s), ``fitted`` (voxels fitted in those
        jobs), and the subject's ``voxels`` and ``voxels_per_slice``.
    reference : str
        The method the speed-up ratios are relative to.

    Returns
    -------
    DataFrame
        One row per method (``network`` first): ``subjects``, ``voxels_timed``,
        ``seconds_timed``, ``s_per_voxel``, ``s_per_slice``, ``s_per_body`` and ``speedup`` (the
        reference's seconds per body over this method's).

    Notes
    -----
    The network predicts whole volumes: its per-body time is measured (mean over subjects),
    per slice is that divided by the slices predicted, per voxel by the body voxels. A fit
    is timed per chunk job, on the voxels it fitted (curve_fit may cover only some slices):
    its cost per voxel is total seconds over total voxels fitted, scaled to a mean body
    slice and to a whole body with the subjects' body-voxel counts.
    """
    rows = []
    if len(network):
        seconds = network["seconds"].to_numpy(np.float64)
        rows.append(
            {
                "method": "network",
                "subjects": len(network),
                "voxels_timed": int(network["voxels"].sum()),
                "seconds_timed": float(seconds.sum()),
                "s_per_voxel": float(seconds.sum() / network["voxels"].sum()),
                "s_per_slice": float(np.mean(seconds / network["slices"])),
                "s_per_body": float(seconds.mean()),
            }
        )
    for method, group in fits.groupby("method", sort=False):
        fitted = int(group["fitted"].sum())
        seconds = float(group["seconds"].sum())
        per_voxel = seconds / fitted if fitted else np.nan
        rows.append(
            {
                "method": method,
                "subjects": len(group),
                "voxels_timed": fitted,
                "seconds_timed": seconds,
                "s_per_voxel": per_voxel,
                "s_per_slice": per_voxel * float(group["voxels_per_slice"].mean()),
                "s_per_body": per_voxel * float(group["voxels"].mean()),
            }
        )
    table = pd.DataFrame(rows)
    ref = table.loc[table["method"] == reference, "s_per_body"]
    table["speedup"] = float(ref.iloc[0]) / table["s_per_body"] if len(ref) else np.nan
    return table


# -- Markdown ---------------------------------------------------------------------------


def markdown_table(
    table: pd.DataFrame,
    columns: Mapping[str, str] | None = None,
    bold: Mapping[str, pd.Series] | None = None,
) -> str:
    """A plain Markdown pipe table of already formatted cells.

    Parameters
    ----------
    table : DataFrame
        Cell values (converted with ``str``).
    columns : mapping, optional
        Column -> header text (default: the column names; the order of ``columns`` is the
        order of the output).
    bold : mapping, optional
        Column -> boolean Series (aligned with ``table``) of the cells to set in bold.
    """
    columns = dict(columns or {c: c for c in table.columns})
    bold = bold or {}
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for i in range(len(table)):
        cells = []
        for col in columns:
            text = str(table[col].iloc[i]).replace("|", "\\|")
            if col in bold and bool(bold[col].iloc[i]):
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_mask(values: pd.Series, mode: str, groups: pd.Series | None = None) -> pd.Series:
    """Where a column reaches its best value (``mode`` "max" or "min"), ties included,
    within each group if ``groups`` is given; NaN is never best."""
    values = pd.to_numeric(values, errors="coerce")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
    keys = groups if groups is not None else pd.Series(0, index=values.index)
    best = values.groupby(keys).transform(mode)
    return values.notna() & np.isclose(values, best, rtol=0, atol=0)


def mean_sd(mean: float, sd: float, digits: int = 2) -> str:
    """``"0.78 ± 0.05"`` (sd left out when NaN)."""
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if np.isfinite(sd) else f"{mean:.{digits}f}"
