"""The Snakemake pipeline: dry run, lint and a tiny end-to-end run into a temporary folder."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from bids_synthetic import FRAMES, NAMES, write_subject
from scipy.ndimage import binary_erosion

from kinpet.fitting import frame_weights
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import read_organ_values, read_slices
from kinpet.kinetics import PARAMETER_NAMES, KineticModel, irreversible_2tc
from kinpet.projection import project
from kinpet.training import training_lock

# Every test here runs Snakemake (dry runs included).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def snakemake(*args, cwd):
    return subprocess.run([SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True)


def copy_workflow(work):
    for name in ("Snakefile", "workflow", "config", "envs", "src", "tests/config"):
        src = ROOT / name
        dst = work / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    return work


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A copy of the workflow files, so that runs never touch the checkout's results/.

    A small synthetic PET-BIDS dataset sits in results/bids, where the phantom writes its
    subjects (the default config's subjects sub-01..sub-04): sub-02 is stored in another
    orientation (RAS) and sub-03 in Bq/mL, to check that neither changes the result.
    """
    work = copy_workflow(tmp_path_factory.mktemp("pipeline"))
    bids = work / "results" / "bids"
    write_subject(bids, "sub-01")
    write_subject(bids, "sub-02", axcodes=("R", "A", "S"))
    write_subject(bids, "sub-03", units="Bq/mL", blood_units="Bq/mL", scale=1.5)
    write_subject(bids, "sub-04")
    return work


@pytest.fixture(scope="module")
def synthetic_run(workdir):
    """The synthetic PET-BIDS dataset through the data path (tests/config/synthetic.yaml),
    run once; each test that reads its outputs asks for it, so every test runs alone."""
    res = snakemake("--cores", "2", "--configfile", "tests/config/synthetic.yaml", cwd=workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    return workdir


# `all` holds everything: phantom, preprocessing, training, prediction and the curve fits.
TINY_TARGETS = ("all",)


def whole_run(work, configfile):
    """The whole pipeline (`all`) in ``work`` with one config file; the tree on success."""
    res = snakemake(*TINY_TARGETS, "--cores", "2", "--configfile", configfile, cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    return work


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole pipeline on the tiny config (four tiny phantom subjects), run once."""
    return whole_run(copy_workflow(tmp_path_factory.mktemp("tiny")), "tests/config/tiny.yaml")


def test_dry_run_of_default_config(workdir):
    # --forceall: the plan of a fresh run, whatever other tests have built in workdir.
    res = snakemake("-n", "--forceall", "--cores", "1", cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert "organ_curves" in res.stdout
    for subject in ("sub-01", "sub-02", "sub-03", "sub-04"):
        assert f"results/slices/{subject}.npz" in res.stdout


def test_invalid_config_is_rejected(workdir):
    res = snakemake("-n", "--cores", "1", "--config", "sampling=start", cwd=workdir)
    assert res.returncode != 0
    assert "sampling" in res.stderr + res.stdout


def test_synthetic_dataset_end_to_end_run(synthetic_run):
    workdir = synthetic_run
    curves = pd.read_csv(workdir / "results/model/organ_curves.tsv", sep="\t")
    organs = read_organ_values(workdir / "config/organ_values.tsv")
    inp = InputFunction.feng(peak_kbq_per_ml=200.0, delay_s=12.0)
    liver = organs[organs.organ == "liver"][list(PARAMETER_NAMES)].to_numpy()[0]
    expected = irreversible_2tc(liver, inp, FrameSchedule.paper())
    got = curves[(curves.organ == "liver") & (curves.sampling == "average")]
    np.testing.assert_allclose(got["activity_kbq_per_ml"], expected, rtol=1e-6)
    png = workdir / "results/figures/sampling_modes.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (workdir / "results/figures/sampling_modes.pdf").read_bytes()[:4] == b"%PDF"


def test_tiny_training_and_prediction(tiny_run):
    """After the tiny run: one trained ablation and the test subject's parametric maps."""
    log = pd.read_csv(tiny_run / "results/training/4.1/log.csv")
    assert list(log.epoch) == [1, 2] and log.val_loss.notna().all()
    assert (tiny_run / "results/training/4.1/best.pt").exists()
    train_log = (tiny_run / "logs/train/4.1.log").read_text()
    assert "device: cpu" in train_log and "multi_clamp with projection" in train_log
    # No monitor asked for: its table is a header only. The refinement ran before predict.
    assert (tiny_run / "results/training/4.1/monitor.csv").read_text() == "epoch\n"
    predict_log = (tiny_run / "logs/predict/4.1/sub-04.log").read_text()
    assert "refinement step 2/2" in predict_log and "refinement: " in predict_log
    pet = nib.load(tiny_run / "results/preprocessed/sub-04/pet_2p5mm.nii.gz")
    labels = np.asarray(
        nib.load(tiny_run / "results/preprocessed/sub-04/labels_2p5mm.nii.gz").dataobj
    )
    out = tiny_run / "results/prediction/4.1/sub-04"
    maps = {}
    for name in ("K1", "k2", "k3", "Vb", "Ki"):
        img = nib.load(out / f"sub-04_desc-{name}_kinpar.nii.gz")
        assert img.shape == pet.shape[:3]
        np.testing.assert_array_equal(img.affine, pet.affine)
        maps[name] = np.asarray(img.dataobj)
    body = labels > 0
    assert np.isnan(maps["K1"][~body]).all() and np.isfinite(maps["K1"][body]).all()
    # multi_clamp bounds hold, and Ki is K1 k3 / (k2 + k3) voxel by voxel.
    assert np.nanmin(maps["K1"]) >= 0.01 - 1e-6 and np.nanmax(maps["K1"]) <= 2 + 1e-6
    assert np.nanmin(maps["Vb"]) >= 0 and np.nanmax(maps["Vb"]) <= 1 + 1e-6
    ki = maps["K1"] * maps["k3"] / (maps["k2"] + maps["k3"])
    np.testing.assert_allclose(maps["Ki"][body], ki[body], rtol=1e-5)
    # projection (the demo's recipe): K1, Vb and the k2/k3 split are each voxel's bounded
    # least-squares solution at the map's own beta under the loss's frame weights (the
    # demo's blend: the mean of equal and duration x decay weights), recomputed in kBq/ml.
    pre = tiny_run / "results/preprocessed/sub-04"
    frames = FrameSchedule.from_bids_json(pre / "pet.json")
    model = KineticModel(InputFunction.from_blood_tsv(pre / "input_blood.tsv"), frames)
    weights = torch.from_numpy(0.5 * (frame_weights(frames, "duration_decay") + 1.0))
    beta = torch.from_numpy((maps["k2"] + maps["k3"])[body].astype(np.float64))
    curves = torch.from_numpy(np.asarray(pet.dataobj, dtype=np.float64)[body])
    again = project(beta, curves, model, weights)
    stored = torch.from_numpy(np.stack([maps[n][body] for n in PARAMETER_NAMES], -1)).double()
    close = np.ones(len(stored), dtype=bool)
    for i in range(len(PARAMETER_NAMES)):
        close &= np.isclose(stored[:, i].numpy(), again[:, i].numpy(), rtol=2e-3, atol=2e-4)
    # Where two faces of the bounded solve nearly tie, beta's float32 rounding in the
    # stored maps can pick the other face: the parameters then differ, the fit does not.
    assert close.mean() > 0.999, close.mean()

    def cost(params):
        return ((model(params) - curves) ** 2 * weights).mean(-1)

    np.testing.assert_allclose(cost(stored)[~close], cost(again)[~close], rtol=1e-3)
    metrics = pd.read_csv(out / "slice_metrics.tsv", sep="\t")
    assert list(metrics.z) == list(range(pet.shape[2]))
    fitted = metrics[metrics.pixels > 0]
    assert len(fitted) > 0 and fitted.cs.between(-1, 1).all() and (fitted.mae >= 0).all()


def test_synthetic_preprocessing_outputs(synthetic_run):
    """After the synthetic run: the 2.5-mm volumes, the slices and their metadata."""
    workdir = synthetic_run
    pre = workdir / "results" / "preprocessed" / "sub-01"
    pet = nib.load(pre / "pet_2p5mm.nii.gz")
    labels = nib.load(pre / "labels_2p5mm.nii.gz")
    assert pet.get_data_dtype() == np.float32 and labels.get_data_dtype() == np.int16
    np.testing.assert_allclose(np.diag(pet.affine)[:3], [-2.5, -2.5, 2.5])
    np.testing.assert_array_equal(pet.affine, labels.affine)
    assert pet.shape == (*labels.shape, len(FRAMES))
    table = pd.read_csv(pre / "labels.tsv", sep="\t")
    assert list(table["name"]) == NAMES and list(table["index"]) == list(range(len(NAMES)))
    sidecar = FrameSchedule.from_bids_json(pre / "pet.json")
    assert sidecar == FRAMES
    blood = InputFunction.from_blood_tsv(pre / "input_blood.tsv")
    source = InputFunction.from_blood_tsv(
        workdir / "results/bids/sub-01/pet/sub-01_recording-idif_blood.tsv"
    )
    np.testing.assert_allclose(blood.values, source.values, rtol=1e-9)

    data = read_slices(workdir / "results" / "slices" / "sub-01.npz")
    vol, lab = np.asarray(pet.dataobj), np.asarray(labels.dataobj)
    # The slice range, recomputed from the label map: 10 mm (4 slices) above the top of
    # the lungs, 5 mm (2 slices) below the bottom of the bladder.
    lungs_z = np.flatnonzero((lab == NAMES.index("lungs")).any(axis=(0, 1)))
    bladder_z = np.flatnonzero((lab == NAMES.index("bladder")).any(axis=(0, 1)))
    np.testing.assert_array_equal(data["z"], np.arange(bladder_z.min() - 2, lungs_z.max() + 5))
    x0, y0 = data["crop"]
    assert data["tacs"].shape == (data["z"].size, len(FRAMES), 40, 48)
    assert data["tacs"].dtype == np.float32 and data["labels"].dtype == np.int16
    expected = vol[x0 : x0 + 48, y0 : y0 + 40][:, :, data["z"]].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(data["tacs"], expected)
    np.testing.assert_array_equal(
        data["labels"], lab[x0 : x0 + 48, y0 : y0 + 40][:, :, data["z"]].transpose(2, 1, 0)
    )
    # The crop is centred on the body: equal margins (within a voxel) on both sides.
    body_x = np.flatnonzero((lab[:, :, data["z"]] > 0).any(axis=(1, 2)))
    assert abs((body_x.min() - x0) - (x0 + 47 - body_x.max())) <= 1
    assert data["subject"] == "sub-01"
    np.testing.assert_array_equal(data["frame_start_s"], FRAMES.starts_s)
    np.testing.assert_array_equal(data["frame_duration_s"], FRAMES.durations_s)

    # Same anatomy stored in RAS orientation, or in Bq/mL with 1.5 times the activity:
    # the same slices.
    ras = read_slices(workdir / "results" / "slices" / "sub-02.npz")
    np.testing.assert_array_equal(ras["z"], data["z"])
    np.testing.assert_array_equal(ras["crop"], data["crop"])
    np.testing.assert_allclose(ras["tacs"], data["tacs"], rtol=1e-5, atol=1e-3)
    scaled = read_slices(workdir / "results" / "slices" / "sub-03.npz")
    np.testing.assert_allclose(scaled["tacs"], 1.5 * data["tacs"], rtol=1e-4, atol=1e-3)


def test_bad_input_stops_the_pipeline_with_the_file_named(tmp_path):
    work = copy_workflow(tmp_path / "work")
    bids = work / "results" / "bids"
    paths = write_subject(bids, "sub-01")["paths"]
    meta = json.loads(paths["pet_json"].read_text())
    del meta["Units"]
    paths["pet_json"].write_text(json.dumps(meta))
    config = yaml.safe_load((work / "tests/config/synthetic.yaml").read_text())
    config["data"]["split"] = {"train": ["sub-01"]}
    (work / "bad.yaml").write_text(yaml.safe_dump(config))
    res = snakemake(
        "results/slices/sub-01.npz", "--cores", "1", "--configfile", "bad.yaml", cwd=work
    )
    assert res.returncode != 0
    log = (work / "logs/resample/sub-01.log").read_text()
    assert "ERROR: results/bids/sub-01/pet/sub-01_pet.json: missing PET-BIDS field(s) Units" in log
    assert "Traceback" not in log
    assert not (work / "results/preprocessed/sub-01").exists() or not any(
        (work / "results/preprocessed/sub-01").iterdir()
    )


def test_a_phantom_too_large_for_memory_is_refused_before_anything_is_deleted(tmp_path):
    """A voxel size too fine for the memory stops Snakemake at parse time with the check's
    one line: no job is planned, and the outputs of the previous run are still there (in
    the simulate job the check came after Snakemake had deleted them)."""
    work = copy_workflow(tmp_path / "work")
    # Stand-ins for a previous run's dataset and results, newer than their inputs.
    previous = [
        "results/bids/sub-01/pet/sub-01_pet.nii.gz",
        "results/bids/sub-01/pet/sub-01_pet.json",
        "results/bids/sub-01/pet/sub-01_recording-idif_blood.tsv",
        "results/bids/sub-01/pet/sub-01_recording-idif_blood.json",
        "results/bids/derivatives/labels/sub-01/sub-01_dseg.nii.gz",
        "results/bids/derivatives/labels/sub-01/sub-01_dseg.tsv",
        *(
            f"results/bids/derivatives/truth/sub-01/sub-01_desc-{name}_truth.nii.gz"
            for name in (*PARAMETER_NAMES, "Ki")
        ),
        "results/bids/derivatives/truth/sub-01/sub-01_organs.tsv",
        "results/preprocessed/sub-01/pet_2p5mm.nii.gz",
    ]
    for name in previous:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(f"previous run: {name}")
    # The paper's body at 0.25 mm: about 376 GiB, more than any test machine has.
    (work / "fine.yaml").write_text(
        yaml.safe_dump({"phantom": {"size": "paper", "voxel_mm": 0.25}})
    )
    config = ("--configfile", "tests/config/tiny.yaml", "fine.yaml")
    expected = (
        "config phantom.voxel_mm 0.25 mm: simulating each of the 4 subjects (paper body) "
        "on a 1600 x 1160 x 3600 grid (6681.6 million voxels) needs about"
    )
    target = "results/bids/sub-01/pet/sub-01_pet.nii.gz"
    for run in (("-n",), ("--forcerun", "simulate")):
        res = snakemake(target, *run, "--cores", "1", *config, cwd=work)
        output = res.stdout + res.stderr
        assert res.returncode != 0, output[-2000:]
        assert expected in output and "GiB available: use a larger voxel size" in output
        assert "rule simulate" not in output, output[-2000:]
    for name in previous:
        assert (work / name).read_text() == f"previous run: {name}", name
    assert not (work / "logs/simulate").exists()


def test_a_subject_in_two_roles_is_rejected(workdir):
    config = {"data": {"split": {"train": ["sub-01"], "validation": ["sub-01"], "test": []}}}
    (workdir / "twice.yaml").write_text(yaml.safe_dump(config))
    res = snakemake("-n", "--cores", "1", "--configfile", "twice.yaml", cwd=workdir)
    assert res.returncode != 0
    assert "a subject appears twice" in res.stderr + res.stdout


def test_a_users_split_replaces_the_default_one_whole(workdir):
    """Config files merge into config/config.yaml key by key, but not the split: leaving
    out validation must not bring in the default's sub-03."""
    config = {"data": {"split": {"train": ["sub-01", "sub-02"], "test": ["sub-04"]}}}
    (workdir / "no_validation.yaml").write_text(yaml.safe_dump(config))
    res = snakemake(
        "-n", "--forceall", "--cores", "1", "--configfile", "no_validation.yaml", cwd=workdir
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "results/slices/sub-01.npz" in res.stdout
    assert "results/slices/sub-03.npz" not in res.stdout


@pytest.mark.parametrize(
    "typo, word", [({"fitt": {"chunks": 2}}, "fitt"), ({"training": {"epoch": 50}}, "epoch")]
)
def test_a_misspelt_config_key_stops_the_run(workdir, typo, word):
    (workdir / "typo.yaml").write_text(yaml.safe_dump(typo))
    res = snakemake("-n", "--cores", "1", "--configfile", "typo.yaml", cwd=workdir)
    assert res.returncode != 0
    output = res.stderr + res.stdout
    lines = [x for x in output.splitlines() if x.startswith("config (")]
    assert lines, output[-3000:]
    assert "typo.yaml" in lines[0] and f"'{word}' was unexpected" in lines[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({}, "config model (reversible_2tc): training.projection: true needs model: "),
        (
            {"training": {"projection": False}, "fit": {"organ_method": "curve_fit_paper"}},
            "config fit.organ_method (curve_fit_paper, or training.recipe: paper): not "
            "available for model reversible_2tc, which is fitted with fast, curve_fit",
        ),
    ],
)
def test_what_another_model_cannot_do_stops_the_run_at_once(workdir, extra, message):
    (workdir / "reversible.yaml").write_text(yaml.safe_dump({"model": "reversible_2tc", **extra}))
    res = snakemake("-n", "--cores", "1", "--configfile", "reversible.yaml", cwd=workdir)
    assert res.returncode != 0
    assert message in res.stderr + res.stdout


@pytest.fixture(scope="module")
def tiny_reversible_run(tmp_path_factory):
    """The whole pipeline on tests/config/tiny_reversible.yaml (model: reversible_2tc)."""
    work = copy_workflow(tmp_path_factory.mktemp("tiny_reversible"))
    return whole_run(work, "tests/config/tiny_reversible.yaml")


def test_tiny_reversible_model_end_to_end(tiny_reversible_run):
    """The reversible model through fits, training, prediction, figures and tables."""
    from kinpet.models import get_model, map_names, parameter_map_names
    from kinpet.training import load_model

    work = tiny_reversible_run
    model = get_model("reversible_2tc")
    names = parameter_map_names(model)  # K1, k2, k3, k4, Vb, VT, VS
    log = pd.read_csv(work / "results/training/4.1/log.csv")
    assert log.train_loss.iloc[-1] < log.train_loss.iloc[0]
    net, settings = load_model(work / "results/training/4.1/best.pt", "cpu")
    assert settings.model == "reversible_2tc" and net.n_outputs == 5
    assert "reversible_2tc" in (work / "logs/train/4.1.log").read_text()
    labels = _tiny_labels(work)[0]
    body = labels > 0
    out = work / "results/prediction/4.1/sub-04"
    for i, name in enumerate(names):
        values = _map(out / f"sub-04_desc-{name}_kinpar.nii.gz")[body]
        if i < len(model.parameters):  # within the registry's bounds
            assert np.isfinite(values).all(), name
            assert values.min() >= model.lower[i] - 1e-6 and values.max() <= model.upper[i] + 1e-6
        else:  # VT and VS: infinite where k4 reaches its bound 0
            assert np.isfinite(values).any(), name
    assert not list(out.glob("*desc-Ki_*"))  # Ki is not defined for the reversible model
    organs = pd.read_csv(work / "results/fit/organ/sub-04.tsv", sep="\t")
    assert list(organs.columns) == ["organ", "method", *map_names(model)]
    for method in ("fast", "curve_fit"):
        for name in map_names(model):
            assert (work / f"results/fit/{method}/sub-04/sub-04_desc-{name}_kinpar.nii.gz").exists()
    # Figures and tables name the model's parameters; the truth is compared where it can be.
    values = pd.read_csv(work / "results/tables/organ_values.csv")
    assert set(values.parameter) == set(names)
    assert not values[(values.method == "reference") & values.parameter.isin(["k4", "VT"])].size
    note = (
        "Model reversible_2tc: compared with the truth (the phantom's irreversible two-tissue "
        "model) on K1, k2, k3, Vb; k4, VT, VS have no reference value; Ki is not defined for "
        "reversible_2tc."
    )
    organ_md = (work / "results/tables/organ_values.md").read_text()
    assert "| liver | k4 |" in organ_md and note in organ_md
    recovery = pd.read_csv(work / "results/tables/truth_recovery.csv")
    assert list(dict.fromkeys(recovery.parameter)) == ["K1", "k2", "k3", "Vb"]
    assert note in (work / "results/tables/truth_recovery.md").read_text()
    assert note in (work / "results/tables/smoothness.md").read_text()
    table1 = pd.read_csv(work / "results/tables/table1.csv", dtype={"ablation": str})
    assert list(table1.model) == ["reversible_2tc"]
    listed = "reversible_2tc, the reversible two-tissue model with Vb (K1, k2, k3, k4, Vb)"
    assert listed in (work / "results/tables/table1.md").read_text()
    assert "Kinetic model: reversible_2tc" in (work / "results/tables/runtime.md").read_text()
    for name in ("figure2", "figure3", "figure4", "truth_recovery", "smoothness"):
        png = work / f"results/figures/{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_tiny_phantom_through_the_pipeline(tiny_run):
    """The phantom's subjects, its dataset files and its figure."""
    bids = tiny_run / "results/bids"
    assert (bids / "dataset_description.json").exists()
    for sid in ("sub-01", "sub-02", "sub-03", "sub-04"):
        assert (bids / sid / "pet" / f"{sid}_pet.nii.gz").stat().st_size > 100_000
        assert (bids / "derivatives/truth" / sid / f"{sid}_desc-Ki_truth.nii.gz").exists()
    png = tiny_run / "results/figures/phantom_coronal.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_curve_fits(tiny_run):
    """Organ fits, and voxel maps gathered from chunks: fast everywhere in the body, the
    reference only on the slice of Fig. 4 (reference_slices: figure4)."""
    organs = pd.read_csv(tiny_run / "results/fit/organ/sub-04.tsv", sep="\t")
    assert set(organs.method) == {"fast", "curve_fit"}
    assert {"liver", "lungs", "kidneys", "spleen"} <= set(organs.organ)
    both = organs.pivot(index="organ", columns="method", values="Ki")
    np.testing.assert_allclose(both["fast"], both["curve_fit"], rtol=0.05, atol=2e-4)
    labels = np.asarray(
        nib.load(tiny_run / "results/preprocessed/sub-04/labels_2p5mm.nii.gz").dataobj
    )
    names = pd.read_csv(tiny_run / "results/preprocessed/sub-04/labels.tsv", sep="\t")
    index = dict(zip(names.name, names["index"], strict=True))
    # The slice of Fig. 4: most of liver, spleen and kidneys (all three, then most voxels).
    best = max(
        range(labels.shape[2]),
        key=lambda z: (
            sum((labels[:, :, z] == index[o]).any() for o in ("liver", "spleen", "kidneys")),
            sum((labels[:, :, z] == index[o]).sum() for o in ("liver", "spleen", "kidneys")),
        ),
    )
    body = labels > 0
    out = tiny_run / "results/fit"
    fast = np.asarray(nib.load(out / "fast/sub-04/sub-04_desc-K1_kinpar.nii.gz").dataobj)
    ref = np.asarray(nib.load(out / "curve_fit/sub-04/sub-04_desc-K1_kinpar.nii.gz").dataobj)
    assert np.isfinite(fast[body]).all() and np.isnan(fast[~body]).all()
    others = np.ones(labels.shape[2], bool)
    others[best] = False
    assert np.isfinite(ref[:, :, best][body[:, :, best]]).all()
    assert np.isnan(ref[:, :, others]).all()
    # Where both fitted, they agree on most voxels (same model, same data).
    both_fit = body[:, :, best]
    close = np.isclose(fast[:, :, best][both_fit], ref[:, :, best][both_fit], rtol=0.05, atol=0.01)
    assert close.mean() > 0.8
    for method in ("fast", "curve_fit"):
        for chunk in range(3):
            bench = tiny_run / f"results/benchmarks/fit_chunk/{method}/sub-04/chunk-{chunk}.tsv"
            assert "s" in pd.read_csv(bench, sep="\t").columns


def _map(path):
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def _tiny_labels(work):
    pre = work / "results/preprocessed/sub-04"
    table = pd.read_csv(pre / "labels.tsv", sep="\t")
    return _map(pre / "labels_2p5mm.nii.gz").astype(int), dict(
        zip(table.name, table["index"], strict=True)
    )


def test_tiny_table1_recomputed(tiny_run):
    """Table 1 from the slice metrics of the test subject's lungs-to-bladder slices."""
    table = pd.read_csv(tiny_run / "results/tables/table1.csv", dtype={"ablation": str})
    assert list(table.ablation) == ["4.1"]
    metrics = pd.read_csv(tiny_run / "results/prediction/4.1/sub-04/slice_metrics.tsv", sep="\t")
    with np.load(tiny_run / "results/slices/sub-04.npz") as data:
        z = data["z"]
    rows = metrics[metrics.z.isin(z) & (metrics.pixels > 0)]
    row = table.iloc[0]
    assert row.slices == len(rows) == 12
    np.testing.assert_allclose(
        [row.cs_mean, row.cs_sd, row.mae_mean, row.mae_sd],
        [rows.cs.mean(), rows.cs.std(ddof=1), rows.mae.mean(), rows.mae.std(ddof=1)],
        rtol=1e-12,
    )
    md = (tiny_run / "results/tables/table1.md").read_text()
    assert "| 4.1 | space + time | 3D | Multi-clamp |" in md
    assert f"**{row.cs_mean:.2f} ± {row.cs_sd:.2f}**" in md
    assert (row.recipe, row.sampling, row.test_domain) == ("kinpet", "average", "kinpet")
    assert "| kinpet, average |" in md and "Test domain kinpet" in md


def test_the_paper_recipe_chooses_the_published_organ_fit_and_test_domain(tiny_run, tmp_path):
    """With only ``training: recipe: paper`` added, the organ fit of Fig. 2 is the
    published curve fit, and Table 1 reads the published test domain (the crop, the
    activity mask alone) and says "paper, paper". Run on a copy of the tiny tree, the
    two rules forced (mtime triggers only, so the kinpet-trained maps are reused: the
    wiring is checked here, not the paper recipe's training)."""
    work = tmp_path / "paper"
    shutil.copytree(tiny_run, work, symlinks=True)
    (work / "paper.yaml").write_text("training:\n  recipe: paper\n")
    targets = ("results/fit/organ/sub-04.tsv", "results/tables/table1.csv")
    res = snakemake(
        *targets,
        "--cores",
        "2",
        "--rerun-triggers",
        "mtime",
        "--forcerun",
        "organ_fit",
        "table1",
        "--configfile",
        "tests/config/tiny.yaml",
        "paper.yaml",
        cwd=work,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(
        ln.split()[1].rstrip(":")
        for ln in res.stderr.splitlines()
        if ln.startswith(("rule ", "localrule "))
    )
    assert jobs == ["organ_fit", "table1"], res.stderr[-2000:]
    organs = pd.read_csv(work / "results/fit/organ/sub-04.tsv", sep="\t")
    before = pd.read_csv(tiny_run / "results/fit/organ/sub-04.tsv", sep="\t")
    assert set(organs.method) == {"curve_fit_paper", "fast"}
    assert set(before.method) == {"curve_fit", "fast"}
    fast = [t[t.method == "fast"].reset_index(drop=True) for t in (organs, before)]
    pd.testing.assert_frame_equal(fast[0], fast[1])  # the fast rows do not change

    table = pd.read_csv(work / "results/tables/table1.csv", dtype={"ablation": str}).iloc[0]
    assert (table.recipe, table.sampling, table.test_domain) == ("paper", "paper", "paper")
    metrics = pd.read_csv(work / "results/prediction/4.1/sub-04/slice_metrics.tsv", sep="\t")
    with np.load(work / "results/slices/sub-04.npz") as data:
        z = data["z"]
    rows = metrics[metrics.z.isin(z) & (metrics.paper_pixels > 0)]
    np.testing.assert_allclose(
        [table.cs_mean, table.mae_mean], [rows.paper_cs.mean(), rows.paper_mae.mean()], rtol=1e-12
    )
    md = (work / "results/tables/table1.md").read_text()
    assert "| paper, paper |" in md and "Test domain paper" in md


def test_tiny_figure2_values_recomputed(tiny_run):
    """Fig. 2's numbers: network and truth maps averaged in the organ masks, organ fits."""
    values = pd.read_csv(tiny_run / "results/tables/organ_values.csv")
    values = values.set_index(["method", "organ", "parameter"])["mean"]
    labels, index = _tiny_labels(tiny_run)
    fits = pd.read_csv(tiny_run / "results/fit/organ/sub-04.tsv", sep="\t")
    for organ in ("lungs", "liver", "kidneys", "spleen"):
        mask = labels == index[organ]
        for name in ("K1", "k2", "k3", "Vb", "Ki"):
            net = _map(tiny_run / f"results/prediction/4.1/sub-04/sub-04_desc-{name}_kinpar.nii.gz")
            truth = _map(
                tiny_run / f"results/evaluation/truth/sub-04/sub-04_desc-{name}_truth.nii.gz"
            )
            assert values[("network", organ, name)] == pytest.approx(np.nanmean(net[mask]))
            assert values[("reference", organ, name)] == pytest.approx(truth[mask].mean())
            for method in ("curve_fit", "fast"):
                fit = fits[(fits.organ == organ) & (fits.method == method)][name].iloc[0]
                assert values[(method, organ, name)] == pytest.approx(fit, rel=1e-5)
    # The resampled truth lies on the 2.5-mm grid and keeps the organ's level.
    pet = nib.load(tiny_run / "results/preprocessed/sub-04/pet_2p5mm.nii.gz")
    truth = nib.load(tiny_run / "results/evaluation/truth/sub-04/sub-04_desc-K1_truth.nii.gz")
    np.testing.assert_array_equal(truth.affine, pet.affine)
    native = _map(tiny_run / "results/bids/derivatives/truth/sub-04/sub-04_desc-K1_truth.nii.gz")
    native_labels = _map(tiny_run / "results/bids/derivatives/labels/sub-04/sub-04_dseg.nii.gz")
    liver = binary_erosion(labels == index["liver"])
    assert np.asarray(truth.dataobj)[liver].mean() == pytest.approx(
        native[native_labels == index["liver"]].mean(), rel=0.05
    )
    assert "| liver | K1 |" in (tiny_run / "results/tables/organ_values.md").read_text()


def test_tiny_truth_recovery_recomputed(tiny_run):
    """Bias, RMSE and within-organ CV from the maps, on organ masks eroded by one voxel."""
    pooled = pd.read_csv(tiny_run / "results/tables/truth_recovery.csv")
    pooled = pooled.set_index(["organ", "parameter", "method"])
    smooth = pd.read_csv(tiny_run / "results/tables/smoothness.csv")
    smooth = smooth.set_index(["organ", "parameter", "method"])["cv"]
    labels, index = _tiny_labels(tiny_run)
    maps = {
        "network": "results/prediction/4.1/sub-04/sub-04_desc-{}_kinpar.nii.gz",
        "fast": "results/fit/fast/sub-04/sub-04_desc-{}_kinpar.nii.gz",
        "curve_fit": "results/fit/curve_fit/sub-04/sub-04_desc-{}_kinpar.nii.gz",
    }
    # curve_fit covers one slice: check it in the organ with the most eroded voxels there.
    ref_k1 = np.isfinite(_map(tiny_run / maps["curve_fit"].format("K1")))
    ref_organ = max(
        ("liver", "spleen", "kidneys"),
        key=lambda o: (binary_erosion(labels == index[o]) & ref_k1).sum(),
    )
    cases = [("liver", "K1", "network"), ("kidneys", "Ki", "fast"), (ref_organ, "K1", "curve_fit")]
    for organ, name, method in cases:
        mask = binary_erosion(labels == index[organ])
        est = _map(tiny_run / maps[method].format(name))[mask]
        true = _map(tiny_run / f"results/evaluation/truth/sub-04/sub-04_desc-{name}_truth.nii.gz")
        true = true[mask]
        ok = np.isfinite(est) & np.isfinite(true)
        diff = est[ok] - true[ok]
        row = pooled.loc[(organ, name, method)]
        assert row.voxels == ok.sum() > 0
        assert row.bias == pytest.approx(diff.mean())
        assert row.rmse == pytest.approx(np.sqrt(np.mean(diff**2)))
        assert row.bias_pct == pytest.approx(100 * diff.mean() / true[ok].mean())
        assert smooth[(organ, name, method)] == pytest.approx(est[ok].std() / est[ok].mean())
    md = (tiny_run / "results/tables/truth_recovery.md").read_text()
    assert "| liver | K1 |" in md and "network bias %" in md


def test_tiny_runtime_table_recomputed(tiny_run):
    """Seconds per voxel, slice and body from the benchmarks and the chunks' voxel counts."""
    table = pd.read_csv(tiny_run / "results/tables/runtime.csv").set_index("method")
    labels, _ = _tiny_labels(tiny_run)
    body = labels > 0
    bench = tiny_run / "results/benchmarks"
    network_s = pd.read_csv(bench / "predict/4.1/sub-04.tsv", sep="\t")["s"].iloc[0]
    assert table.loc["network", "s_per_voxel"] == pytest.approx(network_s / body.sum())
    assert table.loc["network", "s_per_slice"] == pytest.approx(network_s / labels.shape[2])
    assert table.loc["network", "s_per_body"] == pytest.approx(network_s)
    per_body = {}
    for method in ("fast", "curve_fit"):
        seconds = sum(
            pd.read_csv(bench / f"fit_chunk/{method}/sub-04/chunk-{c}.tsv", sep="\t")["s"].iloc[0]
            for c in range(3)
        )
        fitted, fit_s = 0, 0.0
        for c in range(3):
            with np.load(tiny_run / f"results/fit/{method}/sub-04/chunk-{c}.npz") as data:
                voxels = int(data["voxels"])
                assert "fit_seconds" not in data  # the maps' file holds no wall time
            fitted += voxels
            fit_time = pd.read_csv(bench / f"fit_time/{method}/sub-04/chunk-{c}.tsv", sep="\t")
            assert int(fit_time["voxels"].iloc[0]) == voxels
            fit_s += fit_time["fit_s"].iloc[0]
        assert table.loc[method, "fit_s_per_voxel"] == pytest.approx(fit_s / fitted)
        assert table.loc[method, "job_over_fit"] == pytest.approx(seconds / fit_s)
        per_voxel = seconds / fitted
        per_slice = per_voxel * body.sum() / body.any(axis=(0, 1)).sum()
        per_body[method] = per_voxel * body.sum()
        assert table.loc[method, "s_per_voxel"] == pytest.approx(per_voxel)
        assert table.loc[method, "s_per_slice"] == pytest.approx(per_slice)
        assert table.loc[method, "s_per_body"] == pytest.approx(per_body[method])
    ref = _map(tiny_run / "results/fit/curve_fit/sub-04/sub-04_desc-K1_kinpar.nii.gz")
    covered = np.isfinite(ref).any(axis=(0, 1))
    assert covered.sum() == 1  # reference_slices: figure4
    assert table.loc["curve_fit", "voxels_timed"] == body[:, :, covered].sum()
    assert table.loc["network", "speedup"] == pytest.approx(per_body["curve_fit"] / network_s)
    assert (table["threads"] == 2).all()
    assert "speed-up vs curve fit" in (tiny_run / "results/tables/runtime.md").read_text()


def test_tiny_figures_are_images(tiny_run):
    figures = tiny_run / "results/figures"
    for name in ("figure2", "figure3", "figure4", "truth_recovery", "smoothness"):
        image = matplotlib.image.imread(figures / f"{name}.png")
        assert image.ndim == 3 and min(image.shape[:2]) > 200 and image.std() > 0, name
        assert (figures / f"{name}.pdf").read_bytes()[:4] == b"%PDF", name


def test_tiny_figure3_organ_table(tiny_run):
    """Fig. 3a's organ summary: each organ's slices from the label map, and the mean CS of
    the network and of the fast fit over them, equal to the per-slice table's mean."""
    table = pd.read_csv(tiny_run / "results/tables/figure3_organ_cs.csv")
    assert list(table.columns) == ["organ", "z0", "z1", "slices", "network", "fast"]
    assert {"liver", "kidneys", "lungs"} <= set(table.organ)
    assert ((table.slices <= table.z1 - table.z0 + 1) & (table.slices > 0)).all()
    metrics = pd.read_csv(tiny_run / "results/prediction/4.1/sub-04/slice_metrics.tsv", sep="\t")
    liver = table.set_index("organ").loc["liver"]
    inside = metrics[metrics.z.between(liver.z0, liver.z1) & (metrics.pixels > 0)]
    assert liver.network == pytest.approx(inside.cs.mean(), abs=1e-4)  # 4 decimals written
    # A fit of each voxel's own curve scores close to the data's noise ceiling, > 0.5
    assert ((table.fast > 0.5) & (table.fast <= 1)).all()


def test_tiny_report(tiny_run):
    """`snakemake --report` collects every figure and table into one HTML file."""
    res = snakemake(
        "--report", "results/report.html", "--configfile", "tests/config/tiny.yaml", cwd=tiny_run
    )
    assert res.returncode == 0, res.stderr[-3000:]
    html = (tiny_run / "results/report.html").read_text()
    assert len(html) > 100_000
    for name in (
        "figure2.png",
        "figure3.png",
        "figure4.png",
        "table1.csv",
        "runtime.csv",
        "organ_values.csv",
        "truth_recovery.png",
        "smoothness.csv",
        "figure3_organ_cs.csv",
    ):
        assert name in html, name


def test_user_data_asks_for_the_paper_figures_but_no_truth(workdir):
    """With a user's PET-BIDS data there is no truth: no truth recovery, and Fig. 2 takes
    its reference values from the configured table."""
    config = yaml.safe_load((workdir / "tests/config/synthetic.yaml").read_text())
    config["data"]["split"] = {"train": ["sub-01"], "validation": ["sub-02"], "test": ["sub-04"]}
    config["training"] = {"run": ["4.1"], "best": "4.1"}
    config["evaluation"] = {"reference_values": "config/organ_values.tsv"}
    (workdir / "user.yaml").write_text(yaml.safe_dump(config))
    res = snakemake("-n", "--cores", "1", "--configfile", "user.yaml", cwd=workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    for rule in ("table1", "figure2", "figure3", "figure4", "runtime_table"):
        assert f"rule {rule}:" in res.stdout, rule
    assert "truth_recovery" not in res.stdout and "resample_truth" not in res.stdout
    assert "config/organ_values.tsv" in res.stdout


def planned_jobs(stdout):
    """(rule, wildcards) of every job in a dry run's output."""
    jobs, rule, wildcards = [], None, ""
    for line in stdout.splitlines():
        if line.startswith(("rule ", "localrule ")):
            if rule is not None:
                jobs.append((rule, wildcards))
            rule, wildcards = line.split()[1].rstrip(":"), ""
        elif rule is not None and line.strip().startswith("wildcards:"):
            wildcards = line.split(":", 1)[1].strip()
    if rule is not None:
        jobs.append((rule, wildcards))
    return jobs


def test_adding_a_subject_plans_only_its_jobs_and_the_aggregations(tiny_run):
    """Rules take only the params they read: a fifth phantom subject, added to the test
    split, re-simulates none of the first four and retrains nothing."""
    config = yaml.safe_load((tiny_run / "tests/config/tiny.yaml").read_text())
    config["phantom"]["subjects"] = 5
    config["data"]["split"]["test"] = ["sub-04", "sub-05"]
    (tiny_run / "plus_one.yaml").write_text(yaml.safe_dump(config))
    res = snakemake(
        *TINY_TARGETS, "-n", "--cores", "2", "--configfile", "plus_one.yaml", cwd=tiny_run
    )
    assert res.returncode == 0, res.stderr[-2000:]
    jobs = planned_jobs(res.stdout)
    per_subject = {(rule, w) for rule, w in jobs if w}
    # Every job with wildcards is the new subject's (another test may have removed a chunk
    # of sub-04's fast fit; that chunk and its gather are the only exception).
    other = {(r, w) for r, w in per_subject if "sub-05" not in w}
    assert other <= {
        ("fit_chunk", "method=fast, subject=sub-04, chunk=1"),
        ("gather_fit", "method=fast, subject=sub-04"),
    }, other
    new = {rule for rule, w in per_subject if "sub-05" in w}
    assert {
        "simulate",
        "resample",
        "slices",
        "predict",
        "organ_fit",
        "fit_slabs",
        "fit_chunk",
        "gather_fit",
        "resample_truth",
    } <= new, new
    assert "train" not in {rule for rule, _ in jobs}
    aggregations = {rule for rule, w in jobs if not w}
    assert aggregations <= {
        "all",
        "table1",
        "figure2",
        "runtime_table",
        "truth_recovery",
        "phantom_dataset",
    }, aggregations


def test_deleting_one_chunk_recomputes_only_that_chunk(tiny_run):
    """A lost chunk (e.g. a failed cluster job, so the maps were never gathered): the
    re-run plans that chunk and the gather, nothing else."""
    out = tiny_run / "results/fit/fast/sub-04"
    (out / "chunk-1.npz").unlink()
    for gathered in out.glob("*_kinpar.nii.gz"):
        gathered.unlink()
    res = snakemake(
        *TINY_TARGETS, "-n", "--cores", "2", "--configfile", "tests/config/tiny.yaml", cwd=tiny_run
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    jobs = sorted(
        ln.split()[1].rstrip(":") for ln in lines if ln.startswith(("rule ", "localrule "))
    )
    # Only the chunk and the gather, and the tables and figures that read the fast fit.
    evaluation = {"runtime_table", "truth_recovery", "figure3"}  # Fig. 3a: the fit's CS
    assert [j for j in jobs if j != "all" and j not in evaluation] == [
        "fit_chunk",
        "gather_fit",
    ], res.stdout[-2000:]
    assert "results/fit/fast/sub-04/chunk-1.npz" in res.stdout
    assert "chunk-0.npz (" not in res.stdout and "chunk-2.npz (" not in res.stdout


def test_killed_training_resumes_where_it_stopped(tiny_run, tmp_path):
    """Kill Snakemake and its train job after an epoch; the rerun resumes from the state
    folder (Snakemake deleted the job's outputs) and ends with the weights of an
    uninterrupted run (the tiny run's, trained under the same config). While another
    process holds the folder's lock, train stops at once with one line naming the folder
    and the holder's pid."""
    work = copy_workflow(tmp_path)
    # The tiny run's inputs of training, without its training: only train runs here.
    shutil.copytree(
        tiny_run / "results",
        work / "results",
        ignore=shutil.ignore_patterns("training", "training_state", "prediction"),
    )
    epochs = yaml.safe_load((work / "tests/config/tiny.yaml").read_text())["training"]["epochs"]
    run = ("--cores", "2", "--configfile", "tests/config/tiny.yaml")
    target = "results/training/4.1/best.pt"
    state = work / "results/training_state/4.1"
    job = subprocess.Popen(
        [SNAKEMAKE, target, *run],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not (state / "last.pt").exists() and job.poll() is None:
        assert time.monotonic() < deadline, "no training state after 10 min"
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    time.sleep(1)  # the killed trainer's lock goes with it
    done = pd.read_csv(state / "log.csv").epoch.tolist()
    assert 1 <= len(done) < epochs, f"not killed mid-run: {done}"
    assert not (work / "results/training/4.1/log.csv").exists()

    assert snakemake("--unlock", *run, cwd=work).returncode == 0
    res = snakemake(target, *run, "--rerun-incomplete", cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    log = (work / "logs/train/4.1.log").read_text()
    assert f"resumed from epoch {done[-1]} of {epochs}" in log, log
    assert pd.read_csv(work / "results/training/4.1/log.csv").epoch.tolist() == list(
        range(1, epochs + 1)
    )
    assert not state.exists()
    resumed = {
        n: torch.load(work / f"results/training/4.1/{n}", weights_only=True)["model"]
        for n in ("best.pt", "last.pt")
    }

    with training_lock(state):
        res = snakemake(target, *run, "--forcerun", "train", cwd=work)
    assert res.returncode != 0
    log = (work / "logs/train/4.1.log").read_text()
    assert (
        f"ERROR: results/training_state/4.1: another training holds train.lock "
        f"(pid {os.getpid()})" in log
    ), log

    for name, weights in resumed.items():
        straight = torch.load(tiny_run / f"results/training/4.1/{name}", weights_only=True)
        assert straight["model"].keys() == weights.keys()
        assert all(torch.equal(straight["model"][k], weights[k]) for k in weights), name


def test_fit_image_equals_the_pipelines_fast_maps(tiny_run, tmp_path, capsys):
    """`kinpet fit-image` on the tiny run's preprocessed test subject (its label map, the
    same fit settings) gives the pipeline's fast-fit maps, voxel for voxel, although it
    reads and fits the image in other slabs (3 slices here) than the fit_chunk jobs do."""
    from kinpet.cli import main

    # Another test deletes a chunk and the gathered maps of this tree: make them again
    # (nothing to do when they are there).
    fast = [f"results/fit/fast/sub-04/sub-04_desc-{n}_kinpar.nii.gz" for n in ("K1", "Ki")]
    res = snakemake(*fast, "--cores", "2", "--configfile", "tests/config/tiny.yaml", cwd=tiny_run)
    assert res.returncode == 0, res.stderr[-2000:]
    pre = tiny_run / "results/preprocessed/sub-04"
    out = tmp_path / "maps"
    args = ["fit-image", "--pet", str(pre / "pet_2p5mm.nii.gz"),
            "--pet-json", str(pre / "pet.json"), "--blood-tsv", str(pre / "input_blood.tsv"),
            "--labels", str(pre / "labels_2p5mm.nii.gz"), "--out-dir", str(out),
            "--prefix", "sub-04", "--memory-mb", "0.5"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "slab 1/" in err and "voxels" in err
    meta = json.loads((out / "sub-04_model-irreversible2tc_mimap.json").read_text())
    assert meta["Method"] == "fast" and meta["Units"]["Ki"] == "ml/cm3/min"
    for name in ("K1", "k2", "k3", "Vb", "Ki"):
        ours = _map(out / f"sub-04_model-irreversible2tc_meas-{name}_mimap.nii.gz")
        pipeline = _map(tiny_run / f"results/fit/fast/sub-04/sub-04_desc-{name}_kinpar.nii.gz")
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(pipeline))
        np.testing.assert_allclose(ours, pipeline, rtol=1e-6, equal_nan=True, err_msg=name)


@pytest.fixture(scope="module")
def totalseg_run(tmp_path_factory):
    """The whole pipeline on TotalSegmentator's example segmentation
    (tests/config/totalseg.yaml: three subjects of one real anatomy), run once."""
    work = copy_workflow(tmp_path_factory.mktemp("totalseg"))
    example = "tests/data/totalsegmentator_example"
    shutil.copytree(ROOT / example, work / example)
    return whole_run(work, "tests/config/totalseg.yaml")


def test_totalsegmentator_example_through_the_pipeline(totalseg_run):
    """simulate -> resample -> slices -> train -> predict -> fits -> figures on a label
    map: the subjects share the anatomy, whose organs keep the label map's volumes; the
    slices run from the kidneys to the lungs (preprocess.slice_range: no bladder there)."""
    from kinpet.labelmap import read_label_anatomy

    work = totalseg_run
    example = work / "tests/data/totalsegmentator_example"
    anatomy = read_label_anatomy(
        example / "example_seg.nii.gz", 2.5, work / "config/totalsegmentator_classes.tsv",
        example / "example_ct_sm.nii.gz",
    )  # fmt: skip
    bids = work / "results/bids"
    names = pd.read_csv(bids / "derivatives/labels/sub-01/sub-01_dseg.tsv", sep="\t")
    index = dict(zip(names["name"], names["index"], strict=True))
    for sid in ("sub-01", "sub-02", "sub-03"):
        dseg = nib.load(bids / f"derivatives/labels/{sid}/{sid}_dseg.nii.gz")
        labels = np.asarray(dseg.dataobj)
        np.testing.assert_array_equal(labels, anatomy.labels_zyx.transpose(2, 1, 0))
        sidecar = json.loads((bids / sid / "pet" / f"{sid}_pet.json").read_text())
        assert sidecar["PhantomAnatomy"] == "example_seg.nii.gz"
    for organ, rel in (("liver", 0.05), ("spleen", 0.05), ("kidneys", 0.05), ("aorta", 0.1)):
        ml = (labels == index[organ]).sum() * 2.5**3 / 1000
        assert ml == pytest.approx(anatomy.volumes_ml[organ], rel=rel), organ
    # The slices: from the lowest kidney slice to the highest lung slice at 4 mm.
    pre = nib.load(work / "results/preprocessed/sub-03/labels_2p5mm.nii.gz")
    coarse = np.asarray(pre.dataobj)
    table = pd.read_csv(work / "results/preprocessed/sub-03/labels.tsv", sep="\t")
    coarse_index = dict(zip(table["name"], table["index"], strict=True))
    kidney_z = np.flatnonzero((coarse == coarse_index["kidneys"]).any(axis=(0, 1)))
    lung_z = np.flatnonzero((coarse == coarse_index["lungs"]).any(axis=(0, 1)))
    data = read_slices(work / "results/slices/sub-03.npz")
    assert data["z"].min() == kidney_z.min() and data["z"].max() == lung_z.max()
    assert len(data["z"]) == 8 and data["tacs"].shape[2:] == (64, 96)
    # Training, prediction, the fast fit and the tables and figures.
    log = pd.read_csv(work / "results/training/5.1/log.csv")
    assert list(log.epoch) == [1, 2]
    ki = _map(work / "results/prediction/5.1/sub-03/sub-03_desc-Ki_kinpar.nii.gz")
    assert ki.shape == coarse.shape and np.isfinite(ki[coarse > 0]).any()
    organs = pd.read_csv(work / "results/fit/organ/sub-03.tsv", sep="\t")
    assert {"liver", "kidneys", "spleen", "lungs"} <= set(organs["organ"])
    recovery = pd.read_csv(work / "results/tables/truth_recovery.csv")
    assert {"liver", "kidneys", "spleen", "lungs"} <= set(recovery["organ"])
    for name in ("phantom_coronal", "figure2", "figure3", "figure4", "truth_recovery"):
        png = work / f"results/figures/{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
