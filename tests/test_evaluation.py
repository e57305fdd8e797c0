"""kinpet.evaluation against hand-computed values, and kinpet.figures on small inputs."""

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from kinpet import evaluation as ev
from kinpet import figures
from kinpet import truth as tr


def test_organ_indices_names_the_file_of_a_missing_organ():
    names = {"background": 0, "liver": 5}
    assert ev.organ_indices(names, ["liver"]) == {"liver": 5}
    with pytest.raises(ev.EvaluationError, match=r"labels\.tsv: no label named 'spleen'"):
        ev.organ_indices(names, ["liver", "spleen"], source="labels.tsv")


def test_organ_means_skip_nan_and_count_voxels():
    labels = np.array([[[1, 1, 2, 0]]])
    k1 = np.array([[[1.0, 3.0, np.nan, 9.0]]])
    table = ev.organ_means({"K1": k1}, labels, {"a": 1, "b": 2, "c": 3})
    got = table.set_index("organ")
    assert got.loc["a", "value"] == 2.0 and got.loc["a", "voxels"] == 2
    assert np.isnan(got.loc["b", "value"]) and got.loc["b", "voxels"] == 0
    assert got.loc["c", "voxels"] == 0


def test_slice_metric_summary_uses_masked_slices_and_sample_sd():
    metrics = pd.DataFrame(
        {
            "z": [0, 1, 2, 3, 4],
            "pixels": [0, 10, 12, 8, 5],
            "cs": [np.nan, 0.7, 0.8, 0.9, 0.1],
            "mae": [np.nan, 1.0, 2.0, 4.0, 100.0],
        }
    )
    got = ev.slice_metric_summary(metrics, z=[0, 1, 2, 3])
    assert got["slices"] == 3
    assert got["cs_mean"] == pytest.approx(0.8)
    assert got["cs_sd"] == pytest.approx(0.1)  # sqrt(((-.1)^2 + 0 + .1^2) / 2)
    assert got["mae_mean"] == pytest.approx(7 / 3)
    assert got["mae_sd"] == pytest.approx(
        np.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    )


def test_extents_planes_and_slices():
    labels = np.zeros((4, 5, 6), dtype=int)
    labels[1:3, 1:4, 1:5] = 1  # body
    labels[1, 2, 2:4] = 5  # liver: z 2..3 in the coronal plane y = 2
    labels[2, 3, 4] = 6  # kidney: z 4, y = 3
    extents = ev.z_extents(labels, {"liver": 5, "kidneys": 6, "spleen": 7})
    assert extents.to_dict("records") == [
        {"organ": "liver", "z0": 2, "z1": 3},
        {"organ": "kidneys", "z0": 4, "z1": 4},
    ]
    assert ev.coronal_plane(labels, {"liver": 5, "kidneys": 6}) == 2
    assert ev.coronal_plane(labels, {"spleen": 7}) == 1  # no organ: most body voxels
    covered = np.array([False, True, False, True, True, False])
    assert ev.axial_slice(covered, labels, {"liver": 5, "kidneys": 6}) == 3
    assert ev.axial_slice(covered, labels, {"spleen": 7}) == 1
    with pytest.raises(ev.EvaluationError):
        ev.axial_slice(np.zeros(6, bool), labels, {"liver": 5})


def test_erode_removes_the_border():
    mask = np.zeros((5, 5, 5), bool)
    mask[1:4, 1:4, 1:4] = True
    eroded = ev.erode(mask, 1)
    assert eroded.sum() == 1 and eroded[2, 2, 2]
    np.testing.assert_array_equal(ev.erode(mask, 0), mask)


def test_truth_errors_and_cv_by_hand():
    est = np.array([1.0, 2.0, 3.0, np.nan])
    truth = np.array([1.0, 1.0, 1.0, 1.0])
    got = tr.truth_errors(est, truth, np.ones(4, bool))
    assert got["voxels"] == 3 and got["bias"] == pytest.approx(1.0)
    assert got["rmse"] == pytest.approx(np.sqrt(5 / 3))
    assert got["bias_pct"] == pytest.approx(100.0)
    assert tr.truth_errors(est, truth, np.zeros(4, bool))["voxels"] == 0
    cv, n = tr.coefficient_of_variation(est, np.ones(4, bool))
    assert n == 3 and cv == pytest.approx(np.std([1, 2, 3]) / 2)


def test_pooled_truth_errors_equal_those_of_all_voxels():
    rng = np.random.default_rng(0)
    truth = [rng.uniform(0.5, 1.0, n) for n in (7, 12)]
    est = [t + rng.normal(0.1, 0.2, t.size) for t in truth]
    rows = [
        {"organ": "liver", "parameter": "K1", "method": "network", **tr.truth_errors(e, t, t > 0)}
        for e, t in zip(est, truth, strict=True)
    ]
    pooled = tr.pool_truth_errors(pd.DataFrame(rows)).iloc[0]
    every = tr.truth_errors(np.concatenate(est), np.concatenate(truth), np.ones(19, bool))
    for key in ("voxels", "truth_mean", "bias", "rmse", "bias_pct", "rmse_pct"):
        assert pooled[key] == pytest.approx(every[key])
    assert pooled["subjects"] == 2


def test_truth_recovery_tables():
    labels = np.zeros((5, 5, 5), int)
    labels[1:4, 1:4, 1:4] = 2
    truth = {"K1": np.full(labels.shape, 0.5)}
    est = {"network": {"K1": np.full(labels.shape, 0.6)}}
    errors, smooth = tr.truth_recovery(est, truth, labels, {"liver": 2}, erode_voxels=0)
    row = errors.iloc[0]
    assert row["voxels"] == 27 and row["bias"] == pytest.approx(0.1)
    assert row["bias_pct"] == pytest.approx(20.0)
    assert set(smooth["method"]) == {"truth", "network"} and (smooth["cv"] == 0).all()
    errors, _ = tr.truth_recovery(est, truth, labels, {"liver": 2}, erode_voxels=1)
    assert errors.iloc[0]["voxels"] == 1


def test_runtime_table_by_hand():
    network = pd.DataFrame(
        {
            "seconds": [10.0, 30.0],
            "voxels": [1000, 3000],
            "slices": [10, 20],
            "voxels_per_slice": [100.0, 150.0],
        }
    )
    fits = pd.DataFrame(
        {
            "method": ["curve_fit", "curve_fit", "fast"],
            "seconds": [50.0, 150.0, 2.0],
            "fitted": [100, 100, 4000],
            "voxels": [1000, 3000, 4000],
            "voxels_per_slice": [100.0, 150.0, 200.0],
        }
    )
    table = ev.runtime_table(network, fits).set_index("method")
    assert table.loc["network", "s_per_voxel"] == pytest.approx(40 / 4000)
    assert table.loc["network", "s_per_slice"] == pytest.approx((1.0 + 1.5) / 2)
    assert table.loc["network", "s_per_body"] == pytest.approx(20.0)
    assert table.loc["curve_fit", "s_per_voxel"] == pytest.approx(1.0)
    assert table.loc["curve_fit", "s_per_slice"] == pytest.approx(125.0)
    assert table.loc["curve_fit", "s_per_body"] == pytest.approx(2000.0)
    assert table.loc["fast", "s_per_body"] == pytest.approx(2.0)
    assert table.loc["network", "speedup"] == pytest.approx(100.0)
    assert table.loc["curve_fit", "speedup"] == pytest.approx(1.0)
    assert list(table.index) == ["network", "curve_fit", "fast"]


def test_markdown_table_bolds_the_best():
    table = pd.DataFrame({"name": ["a", "b|c"], "cs": ["0.70", "0.80"]})
    bold = ev.best_mask(pd.Series([0.7, 0.8]), "max")
    text = ev.markdown_table(table, {"name": "Exp", "cs": "CS"}, bold={"cs": bold})
    assert text.splitlines() == [
        "| Exp | CS |",
        "|---|---|",
        "| a | 0.70 |",
        "| b\\|c | **0.80** |",
    ]
    assert list(ev.best_mask(pd.Series([3.0, np.nan, 2.0, 2.0]), "min")) == [
        False,
        False,
        True,
        True,
    ]
    assert ev.mean_sd(0.781, 0.0512) == "0.78 ± 0.05"


def check_images(tmp_path, fig, stem):
    png, pdf = tmp_path / f"{stem}.png", tmp_path / f"{stem}.pdf"
    figures.save_figure(fig, png)
    figures.save_figure(fig, pdf)
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    assert pdf.read_bytes()[:4] == b"%PDF"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def test_dodge_positions_are_where_seaborn_draws_the_bars():
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = pd.DataFrame({"x": list("aabbcc"), "h": list("uvuvuv"), "y": [1, 2, 3, 4, 5, 6]})
    fig, ax = plt.subplots()
    sns.barplot(
        data=data,
        x="x",
        y="y",
        hue="h",
        order=list("abc"),
        hue_order=list("uv"),
        width=figures.BAR_WIDTH,
        errorbar=None,
        ax=ax,
    )
    centres = sorted(p.get_x() + p.get_width() / 2 for p in ax.patches if p.get_height() > 0)
    np.testing.assert_allclose(centres, np.sort(figures.dodge_positions(3, 2).ravel()))
    plt.close(fig)


def test_figures_write_valid_images(tmp_path):
    rng = np.random.default_rng(1)
    organs, methods = ["liver", "kidneys"], ["network", "curve_fit", "reference"]
    per_subject = pd.DataFrame(
        [
            {"subject": s, "method": m, "organ": o, "parameter": p, "value": rng.uniform(0.1, 1)}
            for s in ("sub-01", "sub-02")
            for m in methods
            for o in organs
            for p in ("K1", "k2", "k3", "Vb")
        ]
    )
    sd = pd.DataFrame([{"method": "reference", "organ": "liver", "parameter": "K1", "sd": 0.1}])
    check_images(
        tmp_path, figures.organ_parameter_figure(per_subject, organs, methods, given_sd=sd), "fig2"
    )

    labels = np.zeros((12, 10, 20), int)
    labels[2:10, 2:8, 1:19] = 1
    labels[3:6, 3:6, 10:14] = 5
    metrics = pd.DataFrame(
        {"z": np.arange(20), "pixels": [0] + [50] * 18 + [0], "cs": rng.uniform(0.7, 0.9, 20)}
    )
    maps = {n: np.where(labels > 0, rng.uniform(0, 1, labels.shape), np.nan) for n in "ABCD"}
    coronal = {n: m[:, 4, :] for n, m in maps.items()}
    extents = ev.z_extents(labels, {"liver": 5})
    check_images(tmp_path, figures.cs_profile_figure(metrics, 2.5, extents, coronal, "s"), "fig3")
    fig = figures.axial_comparison_figure(
        maps["A"][:, :, 12], maps["B"][:, :, 12], labels[:, :, 12], {"liver": 5}, 2.5, ("a", "b")
    )
    check_images(tmp_path, fig, "fig4")

    pooled = pd.DataFrame(
        [
            {
                "organ": o,
                "parameter": p,
                "method": m,
                "bias_pct": rng.normal(),
                "rmse_pct": rng.uniform(),
            }
            for o in organs
            for p in ev.PARAMETERS
            for m in ("network", "fast")
        ]
    )
    check_images(
        tmp_path, figures.truth_recovery_figure(pooled, organs, ["network", "fast"]), "truth"
    )
    smooth = pooled.assign(cv=pooled["rmse_pct"], subject="sub-01")
    check_images(tmp_path, figures.smoothness_figure(smooth, organs, ["network", "fast"]), "cv")


def test_reference_values_and_summaries_over_subjects():
    table = pd.DataFrame(
        {"organ": ["liver", "lungs"], "K1": [0.6, 0.2], "K1_sd": [0.1, 0.05], "k2": [0.7, 1.5]}
    )
    long = ev.reference_long(table).set_index(["organ", "parameter"])
    assert long.loc[("liver", "K1"), "value"] == 0.6 and long.loc[("lungs", "K1"), "sd"] == 0.05
    assert np.isnan(long.loc[("liver", "k2"), "sd"])
    with_k3 = ev.with_ki(table.assign(k3=[0.01, 0.02]))
    assert with_k3["Ki"].iloc[0] == pytest.approx(0.6 * 0.01 / 0.71)
    per_subject = pd.concat(
        [
            pd.DataFrame(
                {
                    "subject": ["a", "b", "c"],
                    "method": "network",
                    "organ": "liver",
                    "parameter": "K1",
                    "value": [1.0, 2.0, 4.0],
                }
            ),
            long.reset_index().assign(subject="reference", method="reference"),
        ],
        ignore_index=True,
    )
    summary = ev.summarise_over_subjects(per_subject).set_index(["method", "organ", "parameter"])
    assert summary.loc[("network", "liver", "K1"), "mean"] == pytest.approx(7 / 3)
    assert summary.loc[("network", "liver", "K1"), "sd"] == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert summary.loc[("network", "liver", "K1"), "subjects"] == 3
    assert summary.loc[("reference", "liver", "K1"), "sd"] == 0.1  # the given spread


def test_pdfs_are_reproducible(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [1, 0, 2])
    figures.save_figure(fig, tmp_path / "a.pdf")
    figures.save_figure(fig, tmp_path / "b.pdf")
    plt.close(fig)
    data = (tmp_path / "a.pdf").read_bytes()
    assert b"CreationDate" not in data
    assert data == (tmp_path / "b.pdf").read_bytes()


def test_every_figure_is_written_by_save_figure():
    """A bare ``savefig`` stamps a CreationDate into PDFs: reruns would differ."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sources = [*root.glob("workflow/scripts/*.py"), *root.glob("src/kinpet/*.py")]
    bare = [
        p.relative_to(root).as_posix()
        for p in sources
        if ".savefig(" in p.read_text() and p.name != "figures.py"
    ]
    assert bare == []


def test_reference_values_keep_the_maps_of_the_model():
    table = pd.DataFrame({"organ": ["liver"], "K1": [0.9], "k3": [0.01], "Ki": [0.02]})
    long = ev.reference_long(table, ("K1", "k2", "k3", "k4", "Vb", "VT", "VS"))
    assert list(long["parameter"]) == ["K1", "k3"]  # Ki is not the reversible model's


def test_comparison_note_names_the_maps_either_side_lacks():
    truth = ("K1", "k2", "k3", "Vb", "Ki")
    assert ev.comparison_note("irreversible_2tc", truth, truth, "truth") == ""
    note = ev.comparison_note(
        "reversible_2tc", ("K1", "k2", "k3", "k4", "Vb", "VT", "VS"), truth, "truth"
    )
    assert note == (
        "Model reversible_2tc: compared with the truth on K1, k2, k3, Vb; k4, VT, VS have no "
        "reference value; Ki is not defined for reversible_2tc."
    )
    assert ev.UNITS["k4"] == "1/min" and ev.UNITS["VT"] == "ml/cm3"
