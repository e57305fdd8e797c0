"""The digital phantom: exact organ curves, noise level, anatomy, PET-BIDS files, determinism.

All simulations use the ``tiny`` size (about 120,000 voxels), which keeps the module to a
few seconds per simulation.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from kinpet import anatomy, phantom, resources, simulation
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import read_organ_values
from kinpet.kinetics import irreversible_2tc

ROOT = Path(__file__).resolve().parents[1]
ORGANS = read_organ_values(ROOT / "config/organ_values.tsv")
SEED = 3
TISSUES = ("body", "bones", "lungs", "heart", "liver", "kidneys", "spleen", "tumour")


def simulate(root, subject="sub-01", seed=SEED, fwhm_mm=0.0, noise_cov=0.0):
    sub = phantom.make_subject(subject, seed=seed, size="tiny", organ_values=ORGANS)
    simulation.simulate_subject(sub, root, fwhm_mm=fwhm_mm, noise_cov=noise_cov, log=lambda m: None)
    return Path(root)


def files(root, sid="sub-01"):
    pet = root / sid / "pet"
    labels = root / "derivatives/labels" / sid
    truth = root / "derivatives/truth" / sid
    return {
        "pet": pet / f"{sid}_pet.nii.gz",
        "json": pet / f"{sid}_pet.json",
        "blood": pet / f"{sid}_recording-idif_blood.tsv",
        "dseg": labels / f"{sid}_dseg.nii.gz",
        "dseg_tsv": labels / f"{sid}_dseg.tsv",
        **{name: truth / f"{sid}_desc-{name}_truth.nii.gz" for name in simulation.TRUTH_NAMES},
    }


def load(path):
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """No blur, no noise: every voxel is the exact model of its true parameters."""
    return simulate(tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """The same subject with noise and no blur (the noise-free image is ``clean``)."""
    return simulate(tmp_path_factory.mktemp("noisy"), noise_cov=0.10)


# -- anatomy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["tiny", "demo"])
def test_label_map_contains_the_papers_seven_organs(size):
    sub = phantom.make_subject("sub-01", seed=SEED, size=size, organ_values=ORGANS)
    labels = sub.labels()
    counts = np.bincount(labels.ravel(), minlength=len(anatomy.LABELS))
    for organ in (*anatomy.PAPER_ORGANS, "heart_blood", "bladder", "tumour", "gallbladder"):
        # Enough voxels to place a region of interest in each organ, even the tiny body.
        assert counts[anatomy.LABEL_INDEX[organ]] >= 30, (size, organ, counts)
    # The body fills the middle of the field of view but does not touch its sides.
    assert labels[:, :, 0].max() == 0 and labels[:, :, -1].max() == 0
    assert labels[:, 0, :].max() == 0 and labels[:, -1, :].max() == 0


def test_subjects_differ_and_the_same_subject_repeats():
    a = phantom.make_subject("sub-01", seed=SEED, size="tiny", organ_values=ORGANS)
    b = phantom.make_subject("sub-02", seed=SEED, size="tiny", organ_values=ORGANS)
    again = phantom.make_subject("sub-01", seed=SEED, size="tiny", organ_values=ORGANS)
    assert np.array_equal(a.labels(), again.labels())
    liver = anatomy.LABEL_INDEX["liver"]
    assert (a.labels() == liver).sum() != (b.labels() == liver).sum()
    assert a.input_peak_kbq_per_ml != b.input_peak_kbq_per_ml
    assert not np.allclose(a.organ_params["liver"], b.organ_params["liver"])


def test_paper_size_body_has_adult_dimensions():
    sub = phantom.make_subject("sub-01", seed=SEED, size="paper", organ_values=ORGANS)
    # Only a few slices: the full label map has 25 million voxels.
    grid = sub.grid
    z_chest = int(np.searchsorted(grid.axis(2), 700.0))
    chest = sub.labels((z_chest, z_chest + 1))[0]
    width = np.ptp(np.flatnonzero(chest.any(axis=0))) * grid.voxel_mm
    depth = np.ptp(np.flatnonzero(chest.any(axis=1))) * grid.voxel_mm
    assert 300 < width < 390 and 210 < depth < 280
    assert grid.shape[2] * grid.voxel_mm >= 880


# -- image formation -------------------------------------------------------------------------------


def test_noise_free_organ_curves_equal_the_kinetic_model(clean):
    f = files(clean)
    pet, labels = load(f["pet"]), load(f["dseg"])
    truth = np.stack([load(f[name]) for name in ("K1", "k2", "k3", "Vb")], axis=-1)
    frames = FrameSchedule.from_bids_json(f["json"])
    inp = InputFunction.from_blood_tsv(f["blood"])
    rng = np.random.default_rng(0)
    for organ in TISSUES:
        where = np.argwhere(labels == anatomy.LABEL_INDEX[organ])
        assert len(where) > 0, organ
        pick = where[rng.choice(len(where), size=min(40, len(where)), replace=False)]
        params = truth[tuple(pick.T)].astype(np.float64)
        assert np.all(params[:, 0] > 0), organ
        expected = irreversible_2tc(params, inp, frames)
        got = pet[tuple(pick.T)]
        # float32 images: rounding is 6e-8 of the value; atol covers frames before the bolus.
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=organ)
        # Smooth variation inside the organ: voxels do not all share one parameter set.
        assert np.ptp(params[:, 0]) > 0, organ


def _frame_average(fn, frames, step_s=0.01):
    """Frame averages of fn(t) by the trapezoid rule on a fine grid (independent check)."""
    out = []
    for s, d in zip(frames.starts_s, frames.durations_s, strict=True):
        t = np.linspace(s, s + d, int(round(d / step_s)) + 1)
        out.append(np.trapezoid(fn(t), t) / d)
    return np.array(out)


def test_blood_pools_are_the_input_and_the_bladder_fills(clean):
    f = files(clean)
    pet, labels = load(f["pet"]), load(f["dseg"])
    frames = FrameSchedule.from_bids_json(f["json"])
    inp = InputFunction.from_blood_tsv(f["blood"])
    blood_average = _frame_average(inp, frames)
    for organ in anatomy.BLOOD_LABELS:
        curves = pet[labels == anatomy.LABEL_INDEX[organ]]
        assert len(curves) > 0
        np.testing.assert_allclose(
            curves, np.broadcast_to(blood_average, curves.shape), rtol=1e-5, atol=1e-5
        )
        vb = load(f["Vb"])[labels == anatomy.LABEL_INDEX[organ]]
        assert np.all(vb == 1)
    # Bladder: clearance x integral of the input (kBq/ml), frame-averaged.
    clearance = json.loads(f["json"].read_text())["PhantomBladderClearance"]
    t_fine = np.arange(0.0, frames.end_s + 0.005, 0.01)
    a_fine = inp(t_fine)
    cum = np.concatenate([[0.0], np.cumsum((a_fine[1:] + a_fine[:-1]) / 2 * 0.01)]) / 60.0
    bladder = _frame_average(lambda t: clearance * np.interp(t, t_fine, cum), frames)
    curves = pet[labels == anatomy.LABEL_INDEX["bladder"]]
    np.testing.assert_allclose(curves, np.broadcast_to(bladder, curves.shape), rtol=1e-4)
    assert np.all(np.diff(bladder) > 0)


def test_noise_level_matches_the_target(clean, noisy):
    fc, fn = files(clean), files(noisy)
    meta = json.loads(fn["json"].read_text())
    frames = FrameSchedule.from_bids_json(fn["json"])
    labels = load(fn["dseg"])
    liver = labels == anatomy.LABEL_INDEX["liver"]
    exact, image = load(fc["pet"]), load(fn["pet"])
    a = meta["PhantomNoiseScaleA"]
    # The last frame (the reference: 300 s), a 30-s frame and a 120-s frame.
    for frame in (len(frames) - 1, 40, 55):
        c, y = exact[liver][:, frame].astype(np.float64), image[liver][:, frame]
        lam = np.log(2) / 109.771
        ts, dt = frames.starts_min[frame], frames.durations_min[frame]
        # Mean decay factor over the frame, by quadrature (not the closed form).
        t = np.linspace(ts, ts + dt, 2001)
        d = np.trapezoid(np.exp(-lam * t), t) / dt
        variance = a * c / (d * dt)
        ratio = np.mean((y - c) ** 2) / np.mean(variance)
        # Relative standard error of a variance estimate from n Gaussian samples: sqrt(2/n).
        tol = 5 * np.sqrt(2 / c.size)
        assert abs(ratio - 1) < tol, (frame, ratio, tol, c.size)
        assert abs(np.mean(y - c)) < 5 * np.sqrt(np.mean(variance) / c.size), frame
    last = len(frames) - 1
    c, y = exact[liver][:, last], image[liver][:, last]
    cov = np.sqrt(np.mean((y.astype(np.float64) - c) ** 2)) / np.mean(c)
    assert abs(cov - 0.10) < 0.10 * 5 * np.sqrt(1 / (2 * c.size)), cov
    assert image.min() >= 0
    # Outside the body there is no activity and no noise.
    assert np.all(image[labels == 0] == 0)


def test_noise_target_holds_after_the_psf(tmp_path):
    # With blur, the target CoV refers to the blurred liver (the image the noise is added to).
    exact = load(files(simulate(tmp_path / "c", fwhm_mm=4.0))["pet"])[..., -1]
    f = files(simulate(tmp_path / "n", fwhm_mm=4.0, noise_cov=0.10))
    liver = load(f["dseg"]) == anatomy.LABEL_INDEX["liver"]
    c, y = exact[liver].astype(np.float64), load(f["pet"])[..., -1][liver]
    cov = np.sqrt(np.mean((y - c) ** 2)) / np.mean(c)
    assert abs(cov - 0.10) < 0.10 * 5 * np.sqrt(1 / (2 * c.size)), cov


def test_blur_has_the_configured_fwhm():
    image = np.zeros((41, 41, 41), dtype=np.float32)
    image[20, 20, 20] = 1.0
    out = simulation.blur(image, fwhm_mm=4.0, voxel_mm=1.6)
    profile = out[20, 20, :].astype(np.float64)
    x = (np.arange(41) - 20) * 1.6
    sigma = np.sqrt(np.sum(profile * x**2) / profile.sum())
    assert abs(sigma * 2 * np.sqrt(2 * np.log(2)) - 4.0) < 0.05
    assert abs(out.sum() - 1) < 1e-5
    assert simulation.blur(image, 0.0, 1.6) is image


def test_decay_factors_average_the_decay_over_each_frame():
    frames = FrameSchedule.paper()
    lam = np.log(2) / 109.771
    expected = [
        np.mean(np.exp(-lam * np.linspace(s, e, 100001)))
        for s, e in zip(frames.starts_min, frames.ends_min, strict=True)
    ]
    np.testing.assert_allclose(simulation.decay_factors(frames), expected, rtol=1e-8)


# -- files -----------------------------------------------------------------------------------------


def test_pet_bids_files(clean):
    f = files(clean)
    img = nib.load(f["pet"])
    assert img.get_data_dtype() == np.float32 and img.ndim == 4 and img.shape[3] == 62
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    np.testing.assert_allclose(img.header.get_zooms()[:3], 1.6)
    meta = json.loads(f["json"].read_text())
    assert meta["FrameTimesStart"] == FrameSchedule.paper().to_bids()["FrameTimesStart"]
    for key, value in {
        "Units": "kBq/mL",
        "TracerName": "FDG",
        "TracerRadionuclide": "F18",
        "ImageDecayCorrected": True,
        "ImageDecayCorrectionTime": 0,
        "TimeZero": "00:00:00",
        "InjectionStart": 0,
        "ScanStart": 0,
    }.items():
        assert meta[key] == value, key
    dseg = nib.load(f["dseg"])
    assert dseg.get_data_dtype() == np.int16 and dseg.shape == img.shape[:3]
    np.testing.assert_array_equal(dseg.affine, img.affine)
    table = pd.read_csv(f["dseg_tsv"], sep="\t")
    assert list(table.columns) == ["index", "name"]
    assert dict(zip(table["index"], table["name"], strict=True)) == anatomy.LABELS
    blood = pd.read_csv(f["blood"], sep="\t")
    assert list(blood.columns) == ["time", "whole_blood_radioactivity"]
    assert 200 <= blood["whole_blood_radioactivity"].max() <= 300
    ki = load(f["Ki"])
    k1, k2, k3 = (load(f[n]).astype(np.float64) for n in ("K1", "k2", "k3"))
    tissue = k1 > 0
    expected_ki = k1[tissue] * k3[tissue] / (k2[tissue] + k3[tissue])
    np.testing.assert_allclose(ki[tissue], expected_ki, rtol=1e-6)
    assert np.all(np.isfinite(ki)) and np.all(ki[~tissue] == 0)
    # Parameters stay inside the paper's bounds (so fitting can recover them); the maps are
    # float32, so the bounds are too.
    low, high = np.float32(0.01), np.float32(2.0)
    assert k1[tissue].max() <= high and k2[tissue].min() >= low and k3[tissue].min() >= low
    # The organ table says what its means are, and in which units.
    table = f["K1"].parent / f["K1"].name.replace("desc-K1_truth.nii.gz", "organs.json")
    sidecar = json.loads(table.read_text())
    assert sidecar["K1"]["Units"] == "mL/cm3/min" and "clip" in sidecar["k3"]["Description"]


def test_same_seed_gives_identical_bytes(tmp_path):
    first = simulate(tmp_path / "a", fwhm_mm=4.0, noise_cov=0.1)
    second = simulate(tmp_path / "b", fwhm_mm=4.0, noise_cov=0.1)
    names = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(names) >= 15
    assert names == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other = simulate(tmp_path / "c", seed=SEED + 1, fwhm_mm=4.0, noise_cov=0.1)
    pet = files(first)["pet"].relative_to(first)
    assert (first / pet).read_bytes() != (other / pet).read_bytes()


def test_built_in_values_equal_the_config_table():
    a = phantom.make_subject("sub-01", seed=SEED, size="tiny", organ_values=ORGANS)
    b = phantom.make_subject("sub-01", seed=SEED, size="tiny")
    assert a.organ_params.keys() == b.organ_params.keys()
    for name in a.organ_params:
        np.testing.assert_array_equal(a.organ_params[name], b.organ_params[name])


def test_command_line_simulates_a_dataset(tmp_path, capsys):
    from kinpet.cli import main

    args = ["simulate", "--out", str(tmp_path), "--subjects", "sub-02", "--size", "tiny"]
    assert main([*args, "--noise-cov", "0"]) == 0
    description = json.loads((tmp_path / "dataset_description.json").read_text())
    assert description["DatasetType"] == "raw" and "BIDSVersion" in description
    assert nib.load(files(tmp_path, "sub-02")["pet"]).shape[3] == 62
    assert "sub-02: done" in capsys.readouterr().err


def test_a_grid_too_large_for_memory_is_refused_before_anything_is_written(tmp_path):
    """The paper's body at 0.1 mm (a hundred billion voxels) stops with one line naming
    the setting, the grid, the estimate and the memory, before any file or folder exists
    (numpy's "Unable to allocate" came after the outputs were deleted)."""
    subject = phantom.make_subject("sub-01", size="paper", voxel_mm=0.1)
    root = tmp_path / "bids"
    with pytest.raises(simulation.PhantomResourceError) as err:
        simulation.simulate_subject(subject, root)
    message = str(err.value)
    gib = simulation.simulation_needs(subject.grid.shape, 62)["memory"] / 2**30
    available = simulation.available_memory() / 2**30
    assert message == (
        f"voxel_mm 0.1 mm: simulating sub-01 (paper body) on a 4000 x 2900 x 9000 grid "
        f"(104400.0 million voxels) needs about {gib:.2f} GiB of memory, more than the "
        f"{available:.2f} GiB available: use a larger voxel size"
    )
    assert not root.exists()


def test_resource_check_names_the_config_value_and_the_scratch_disk(tmp_path, monkeypatch):
    subject = phantom.make_subject("sub-02", size="demo", voxel_mm=0.25)
    needs = simulation.simulation_needs(subject.grid.shape, 62)
    setting = "config phantom.voxel_mm"
    with pytest.raises(
        simulation.PhantomResourceError,
        match=r"^config phantom.voxel_mm 0.25 mm: "
        r"simulating sub-02 \(demo body\) on a 640 x 472 x 1000 grid .* GiB of "
        r"memory, more than the 4.00 GiB available",
    ):
        simulation.check_simulation_resources(subject, 62, tmp_path, setting, memory=4 * 2**30)
    free = type("Usage", (), {"free": needs["disk"] - 1})
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda path: free)
    scratch = f"GiB of scratch space in {tmp_path}"
    with pytest.raises(simulation.PhantomResourceError, match=scratch):
        simulation.check_simulation_resources(subject, 62, tmp_path / "bids", setting, memory=2**50)
    simulation.check_simulation_resources(
        phantom.make_subject("sub-02", size="tiny"), 62, tmp_path, setting, memory=2**50
    )


def test_the_snakefiles_check_is_the_jobs(tmp_path):
    """The Snakefile checks the config (kinpet.resources, numpy-free) before it plans; the
    simulate job checks its subject: one estimate, one message, one notion of memory."""
    subject = phantom.make_subject("sub-03", size="demo", voxel_mm=0.25)
    errors = []
    for check in (
        lambda: simulation.check_simulation_resources(subject, 62, tmp_path, memory=2**33),
        lambda: resources.check_phantom_resources(
            "demo", 0.25, 62, tmp_path, "sub-03", memory=2**33
        ),
    ):
        with pytest.raises(resources.PhantomResourceError) as err:
            check()
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "8.00 GiB available" in errors[0]
    assert resources.grid_shape(anatomy.SIZES["demo"].fov_mm, 0.25) == subject.grid.shape
    # A job's fixed mem_mb caps what the Snakefile takes as available (SLURM's cgroup does
    # the same inside the job).
    assert resources.available_memory(mem_mb=1000) == min(resources.available_memory(), 1000 << 20)
    assert resources.frame_count("paper") == len(FrameSchedule.paper()) == 62
    sidecar = tmp_path / "sub-01_pet.json"
    sidecar.write_text(json.dumps(FrameSchedule.from_durations([60.0] * 5).to_bids()))
    assert resources.frame_count(sidecar) == 5
    assert resources.frame_count(tmp_path / "missing_pet.json") is None  # the job names it


def test_deformed_organs_are_less_geometric_and_the_rest_stays():
    """phantom.deform_mm moves the surfaces of the liver, spleen and kidneys by a smooth
    seeded field: their volumes stay within 15 %, every other voxel and every random draw
    of the subject stay as they were, and 0 is the geometric phantom."""
    plain = phantom.make_subject("sub-02", seed=SEED, size="demo")
    bent = phantom.make_subject("sub-02", seed=SEED, size="demo", deform_mm=2.0)
    again = phantom.make_subject("sub-02", seed=SEED, size="demo", deform_mm=2.0)
    assert plain.input_peak_kbq_per_ml == bent.input_peak_kbq_per_ml
    for name in plain.organ_params:
        np.testing.assert_array_equal(plain.organ_params[name], bent.organ_params[name])
    a, b = plain.labels(), bent.labels()
    np.testing.assert_array_equal(b, again.labels())
    index = anatomy.LABEL_INDEX
    moved = [index[n] for n in ("liver", "spleen", "kidneys", "gallbladder", "tumour")]
    elsewhere = ~np.isin(a, moved) & ~np.isin(b, moved)
    np.testing.assert_array_equal(a[elsewhere], b[elsewhere])
    for organ in ("liver", "spleen", "kidneys"):
        before, after = (a == index[organ]), (b == index[organ])
        assert after.sum() == pytest.approx(before.sum(), rel=0.15), organ
        # Not the same shape: at least 5 % of the organ's voxels changed.
        assert (before ^ after).sum() > 0.05 * before.sum(), organ
    zero = phantom.make_subject("sub-02", seed=SEED, size="demo", deform_mm=0.0)
    np.testing.assert_array_equal(zero.labels(), a)


def test_command_line_deforms_the_organs(tmp_path):
    from kinpet.cli import main

    args = ["simulate", "--out", str(tmp_path), "--subjects", "sub-02", "--size", "tiny"]
    assert main([*args, "--noise-cov", "0", "--fwhm", "0", "--deform-mm", "1.5"]) == 0
    expected = phantom.make_subject("sub-02", seed=1, size="tiny", deform_mm=1.5).labels()
    np.testing.assert_array_equal(load(files(tmp_path, "sub-02")["dseg"]), expected.T)
    plain = phantom.make_subject("sub-02", seed=1, size="tiny").labels()
    assert not np.array_equal(expected, plain)
