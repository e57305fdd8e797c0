"""The paper's experiment: Table 1's test domains (kinpet.metrics.domain_mask,
kinpet.evaluation.domain_slice_metrics) and the plans of config/paper.yaml and
config/paper_cpu.yaml (dry runs)."""

import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from snakemake.common.configfile import load_configfile
from test_pipeline import copy_workflow, snakemake

from kinpet.evaluation import EvaluationError, domain_slice_metrics, organ_slice_cs
from kinpet.frames import FrameSchedule
from kinpet.metrics import activity_mask, domain_mask, slice_metrics, tac_metrics
from kinpet.settings import TrainSettings, settings_from_config

FRAMES = FrameSchedule.paper()


def one_slice():
    """A 6 x 5 plane: body (label 1) in columns 1-3 of rows 0-4; an active pixel outside
    the body at (5, 4) (label 0: e.g. noise, or an arm without labels); a cold body pixel
    at (2, 2)."""
    x, y = 6, 5
    labels = np.zeros((x, y), dtype=np.int16)
    labels[0:5, 1:4] = 1
    level = np.where(labels > 0, 1.0, 0.0)
    level[5, 4] = 2.0
    level[2, 2] = 0.001
    shape = np.linspace(0.0, 5.0, len(FRAMES))  # kBq/ml; area ~160 x level over 65 min
    tacs = shape[:, None, None] * level[None]  # [T, X, Y]
    return tacs, labels


def test_slice_metrics_against_numpy():
    """Per-slice CS and MAE of a volume (kinpet.metrics.slice_metrics, what predict and
    Fig. 3 score) equal numpy's cosine and absolute error over each slice's mask, in both
    domains; a slice outside the paper's z gets no paper pixels."""
    tacs, labels = one_slice()
    rng = np.random.default_rng(3)
    pet = np.stack([tacs * (1 + 0.3 * z) for z in range(3)], axis=-1)  # [T, X, Y, Z]
    pet = np.transpose(pet, (1, 2, 3, 0)) + rng.uniform(0, 0.2, (6, 5, 3, len(FRAMES)))
    model = pet * rng.uniform(0.5, 1.5, pet.shape)
    vol_labels = np.repeat(labels[..., None], 3, axis=-1)
    window = ((1, 6), (2, 7))
    called = []

    def curves(z):
        called.append(z)
        return model[:, :, z]

    out = slice_metrics(pet, curves, vol_labels, FRAMES, paper=(window, {0, 2}))
    assert list(out) == ["z", "pixels", "cs", "mae", "paper_pixels", "paper_cs", "paper_mae"]
    for z in range(3):
        for prefix, domain in (("", "kinpet"), ("paper_", "paper")):
            mask = domain_mask(
                pet[:, :, z].T[None].swapaxes(-1, -2), FRAMES, labels[None], domain, window=window
            )[0]
            if prefix and z == 1:
                assert out["paper_pixels"][1] == 0 and np.isnan(out["paper_cs"][1])
                continue
            m, p = pet[:, :, z][mask], model[:, :, z][mask]  # [pixels, T]
            cos = (m * p).sum(1) / np.linalg.norm(m, axis=1) / np.linalg.norm(p, axis=1)
            assert out[f"{prefix}pixels"][z] == mask.sum() > 0
            assert out[f"{prefix}cs"][z] == pytest.approx(cos.mean(), rel=1e-12)
            assert out[f"{prefix}mae"][z] == pytest.approx(np.abs(m - p).mean(), rel=1e-12)
    assert called == [0, 1, 2]  # once per scored slice, for both domains


def test_organ_slice_cs():
    """The mean CS over an organ's slices skips slices without pixels and NaN."""
    extents = pd.DataFrame({"organ": ["a", "b"], "z0": [0, 2], "z1": [1, 4]})
    table = pd.DataFrame(
        {"z": range(5), "pixels": [3, 3, 0, 4, 4], "cs": [0.9, 0.8, 0.1, np.nan, 0.6]}
    )
    other = table.assign(cs=[0.5, 0.5, 0.5, 0.5, 0.5])
    out = organ_slice_cs(extents, {"network": table, "fast": other})
    assert list(out.columns) == ["organ", "z0", "z1", "slices", "network", "fast"]
    assert out["network"].tolist() == pytest.approx([0.85, 0.6])
    assert out["slices"].tolist() == [2, 1]
    assert out["fast"].tolist() == pytest.approx([0.5, 0.5])


def test_domain_masks():
    tacs, labels = one_slice()
    active = activity_mask(tacs, FRAMES, 10.0)
    kinpet = domain_mask(tacs, FRAMES, labels, "kinpet")
    np.testing.assert_array_equal(kinpet, active & (labels > 0))
    assert not kinpet[5, 4] and not kinpet[2, 2] and kinpet.sum() == 14
    # The crop x 1..5, y 2..6 (past the plane's edge: zero padding, never active).
    paper = domain_mask(tacs, FRAMES, labels, "paper", window=((1, 6), (2, 7)))
    expected = np.zeros_like(active)
    expected[1:6, 2:5] = active[1:6, 2:5]
    np.testing.assert_array_equal(paper, expected)
    assert paper[5, 4] and not paper[0, 1] and paper.sum() == 8
    # The published mask: the area over frame starts (auc_times as in training).
    start = domain_mask(tacs, FRAMES, labels, "paper", 10.0, "start", ((0, 6), (0, 5)))
    np.testing.assert_array_equal(start, activity_mask(tacs, FRAMES, 10.0, "start"))
    with pytest.raises(ValueError, match="window"):
        domain_mask(tacs, FRAMES, labels, "paper")
    with pytest.raises(ValueError, match="domain must be one of"):
        domain_mask(tacs, FRAMES, labels, "crop")


def test_metrics_in_each_domain():
    """CS and MAE of a prediction off by +10 % inside the body and 2 kBq/ml outside: the
    published domain counts the active pixel outside the body, kinpet's does not."""
    tacs, labels = one_slice()
    predicted = np.where(labels > 0, 1.1 * tacs, tacs + 2.0)
    for domain, window in (("kinpet", None), ("paper", ((1, 6), (2, 7)))):
        mask = domain_mask(tacs, FRAMES, labels, domain, window=window)
        cs, mae = tac_metrics(tacs[None], predicted[None], mask[None])
        cos, err = [], []
        for i, j in zip(*np.nonzero(mask), strict=True):
            m, p = tacs[:, i, j], predicted[:, i, j]
            cos.append(m @ p / np.linalg.norm(m) / np.linalg.norm(p))
            err.append(np.abs(m - p).mean())
        assert cs[0] == pytest.approx(np.mean(cos), rel=1e-12)
        assert mae[0] == pytest.approx(np.mean(err), rel=1e-12)
        if domain == "kinpet":
            assert cs[0] == pytest.approx(1.0) and mae[0] == pytest.approx(0.25, rel=1e-9)
        else:
            assert cs[0] < 1 and mae[0] > 0.25


def test_domain_columns_of_slice_metrics():
    metrics = pd.DataFrame(
        {"z": [0, 1], "pixels": [10, 0], "cs": [0.9, np.nan], "mae": [1.0, np.nan],
         "paper_pixels": [12, 3], "paper_cs": [0.8, 0.7], "paper_mae": [2.0, 3.0]}
    )  # fmt: skip
    kinpet = domain_slice_metrics(metrics, "kinpet")
    assert list(kinpet.columns) == ["z", "pixels", "cs", "mae"] and kinpet.cs[0] == 0.9
    paper = domain_slice_metrics(metrics, "paper")
    assert list(paper.columns) == ["z", "pixels", "cs", "mae"]
    assert paper.cs.tolist() == [0.8, 0.7] and paper.pixels.tolist() == [12, 3]
    with pytest.raises(EvaluationError, match="old.tsv: no column.*paper_cs"):
        domain_slice_metrics(metrics.drop(columns="paper_cs"), "paper", source="old.tsv")


# -- dry runs ------------------------------------------------------------------------------


def job_counts(stdout):
    """Snakemake's 'Job stats' table of a dry run as {rule: count}."""
    block = stdout.split("Job stats:", 1)[1].split("total", 1)[0]
    return Counter({m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, flags=re.M)})


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A copy of the workflow with its profiles (Snakemake ignores a --workflow-profile
    folder that does not exist, so without them the SLURM plan would be the local one)."""
    work = copy_workflow(tmp_path_factory.mktemp("paper"))
    shutil.copytree(Path(__file__).resolve().parents[1] / "profiles", work / "profiles")
    return work


@pytest.mark.slow
def test_paper_config_plans_the_papers_experiment(work):
    config = yaml.safe_load((work / "config/paper.yaml").read_text())
    split = config["data"]["split"]
    assert [len(split[r]) for r in ("train", "validation", "test")] == [10, 4, 9]
    assert len({s for r in split.values() for s in r}) == 23
    training = config["training"]
    assert training["recipe"] == "paper" and training["epochs"] == 500
    assert training["batch_size"] == 5 and len(training["run"]) == 8
    assert config["preprocess"]["crop"] == [112, 112] and config["preprocess"]["n_slices"] == 75
    assert config["preprocess"]["n_slices_test"] is None
    # --forceall: the plan of a fresh run, whatever is in the folder.
    res = snakemake("-n", "--forceall", "--cores", "1", "--configfile", "config/paper.yaml",
                    cwd=work)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = job_counts(res.stdout)
    chunks = config["fit"]["chunks"]
    assert jobs["simulate"] == 23 and jobs["resample"] == 23 and jobs["slices"] == 23
    assert jobs["train"] == 8
    assert jobs["predict"] == 9 * 8
    assert jobs["organ_fit"] == 9 and jobs["gather_fit"] == 9 * 2
    assert jobs["fit_chunk"] == 9 * 2 * chunks and jobs["resample_truth"] == 9
    for rule in ("table1", "figure2", "figure3", "figure4", "runtime_table", "truth_recovery"):
        assert jobs[rule] == 1, rule
    # Every planned prediction is of a test subject, for every ablation.
    predicted = set(re.findall(r"results/prediction/([\d.]+)/(sub-\d+)/slice_metrics", res.stdout))
    assert predicted == {(a, s) for a in training["run"] for s in split["test"]}


@pytest.mark.slow
def test_paper_config_on_the_slurm_profile(work):
    """As written, with the SLURM profile: GPU jobs go to the gpu partition with a GPU."""
    res = snakemake("-n", "--forceall", "--workflow-profile", "profiles/slurm",
                    "--configfile", "config/paper.yaml", cwd=work)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert job_counts(res.stdout)["train"] == 8
    blocks = res.stdout.split("\nrule ")
    trains = [b for b in blocks if b.startswith("train:")]
    assert len(trains) == 8
    for block in trains:
        resources = re.search(r"resources: (.*)", block)[1]
        assert "slurm_partition=gpu" in resources and "gpu=1" in resources, resources


@pytest.mark.slow
def test_paper_cpu_with_kinpets_recipe_retrains_only(work):
    """config/paper_cpu_kinpet.yaml after paper_cpu.yaml: the eight ablations train with
    kinpet's recipe (the demo's choices, no refinement), and the organ fit and Table 1's
    test domain stay the published ones, so the comparison differs by the recipe alone."""
    paper = load_configfile(work / "config/paper_cpu.yaml")
    overlay = load_configfile(work / "config/paper_cpu_kinpet.yaml")
    assert overlay["training"]["recipe"] == "kinpet"
    assert overlay["fit"]["organ_method"] == "curve_fit_paper"
    assert overlay["evaluation"]["test_domain"] == "paper"
    demo = load_configfile(work / "config/config.yaml")["training"]
    for key, value in overlay["training"].items():
        if key not in ("recipe", "refine_steps"):
            assert demo[key] == value, key  # the demo's kinpet choices, restated
    given = {**paper["training"], **overlay["training"]}
    fields = TrainSettings.__dataclass_fields__
    given = {k: v for k, v in given.items() if k in fields}
    underneath = {k: v for k, v in demo.items() if k in fields and k not in given}
    # As workflow/rules/common.smk layers them (the recipe is named in a --configfile).
    settings = settings_from_config(given, underneath, convolution="space_time", pooling="3d",
                                    activation="multi_clamp")  # fmt: skip
    assert (settings.recipe, settings.sampling, settings.mask_auc) == ("kinpet", "average", "mid")
    assert settings.projection and settings.straight_through and settings.epochs == 10
    res = snakemake("-n", "--forceall", "--cores", "2", "--configfile", "config/paper_cpu.yaml",
                    "config/paper_cpu_kinpet.yaml", cwd=work)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = job_counts(res.stdout)
    assert jobs["train"] == 8 and jobs["predict"] == 8 and jobs["table1"] == 1


@pytest.mark.slow
def test_paper_cpu_config_plans_all_eight_ablations(work):
    config = yaml.safe_load((work / "config/paper_cpu.yaml").read_text())
    assert config["training"]["recipe"] == "paper" and len(config["training"]["run"]) == 8
    res = snakemake("-n", "--forceall", "--cores", "2", "--configfile", "config/paper_cpu.yaml",
                    cwd=work)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = job_counts(res.stdout)
    assert jobs["train"] == 8 and jobs["predict"] == 8 and jobs["table1"] == 1
    for rule in ("figure2", "figure3", "figure4", "runtime_table", "truth_recovery"):
        assert jobs[rule] == 1, rule
