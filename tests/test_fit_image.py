"""`kinpet fit-image` (kinpet.fitimage, kinpet.cli_fit_image) on a small synthetic image."""

import json

import nibabel as nib
import numpy as np
import pytest

from kinpet.cli import main
from kinpet.fitimage import slab_bounds, slab_slices
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import write_blood_tsv, write_nifti
from kinpet.kinetics import irreversible_2tc

FRAMES = FrameSchedule.paper()
INPUT = InputFunction.feng(peak_kbq_per_ml=250.0, delay_s=5.0, end_s=FRAMES.end_s)
# Two regions, each with its own kinetics and input delay (s).
REGIONS = {1: ([0.8, 0.9, 0.05, 0.05], 3.0), 2: ([0.3, 0.4, 0.1, 0.04], 12.0)}


@pytest.fixture
def study(tmp_path):
    """A noise-free 6 x 5 x 4 image (label 1 left, 2 right, 0 on the last row), its
    sidecar, blood recording and label map; their paths."""
    labels = np.zeros((6, 5, 4), dtype=np.int16)
    labels[:3, :4] = 1
    labels[3:, :4] = 2
    pet = np.zeros((*labels.shape, len(FRAMES)), dtype=np.float32)
    for label, (params, delay) in REGIONS.items():
        pet[labels == label] = irreversible_2tc(np.array(params), INPUT.delayed(delay), FRAMES)
    paths = {
        "pet": tmp_path / "sub-01_pet.nii.gz",
        "labels": tmp_path / "sub-01_dseg.nii.gz",
        "blood": tmp_path / "sub-01_blood.tsv",
    }
    write_nifti(paths["pet"], pet, np.eye(4))
    write_nifti(paths["labels"], labels, np.eye(4))
    (tmp_path / "sub-01_pet.json").write_text(json.dumps(FRAMES.to_bids()))
    write_blood_tsv(paths["blood"], INPUT)
    return paths, labels


def args_for(paths, out, *extra):
    return ["fit-image", "--pet", str(paths["pet"]), "--blood-tsv", str(paths["blood"]),
            "--labels", str(paths["labels"]), "--out-dir", str(out), *extra]  # fmt: skip


def read_map(out, name):
    return np.asarray(
        nib.load(out / f"sub-01_model-irreversible2tc_meas-{name}_mimap.nii.gz").dataobj
    )


def test_one_delay_per_region_is_fitted_and_held_for_its_voxels(study, tmp_path, capsys):
    paths, labels = study
    out = tmp_path / "maps"
    assert main(args_for(paths, out, "--fit-delay", "0", "20", "--memory-mb", "0.01")) == 0
    assert "slab 4/4" in capsys.readouterr().err  # one slice per slab at this budget
    delay, k1 = read_map(out, "delay"), read_map(out, "K1")
    for label, (params, d) in REGIONS.items():
        np.testing.assert_allclose(delay[labels == label], d, atol=0.1)
        np.testing.assert_allclose(k1[labels == label], params[0], rtol=1e-3)
    assert np.isnan(k1[labels == 0]).all() and np.isnan(delay[labels == 0]).all()
    meta = json.loads((out / "sub-01_model-irreversible2tc_mimap.json").read_text())
    assert set(meta["InputDelay"]["PerRegion_s"]) == {"1", "2"} and meta["Units"]["delay"] == "s"
    # Without the delay the same voxels are fitted worse (the SSE map).
    plain = tmp_path / "plain"
    assert main(args_for(paths, plain)) == 0
    inside = labels > 0
    assert (read_map(plain, "SSE")[inside] > 100 * read_map(out, "SSE")[inside] + 1e-3).all()


def test_bad_input_names_the_file_and_writes_nothing(study, tmp_path, capsys):
    paths, labels = study
    out = tmp_path / "maps"
    short = tmp_path / "short_pet.json"
    short.write_text(json.dumps(FrameSchedule.paper().to_bids() | {"FrameDuration": [10.0] * 62}))
    code = main(args_for(paths, out, "--pet-json", str(short)))
    err = capsys.readouterr().err
    assert code == 2 and "short_pet.json" in err and "Traceback" not in err
    write_nifti(tmp_path / "small.nii.gz", labels[:4], np.eye(4))
    code = main([*args_for(paths, out)[:5], "--mask", str(tmp_path / "small.nii.gz"),
                 "--out-dir", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "small.nii.gz: shape (4, 5, 4) is not the image's grid (6, 5, 4)" in err
    write_nifti(tmp_path / "empty.nii.gz", 0 * labels, np.eye(4))
    code = main([*args_for(paths, out)[:5], "--mask", str(tmp_path / "empty.nii.gz"),
                 "--out-dir", str(out)])  # fmt: skip
    assert code == 2 and "no voxel > 0" in capsys.readouterr().err
    assert not out.exists()


def test_slabs_fit_the_memory_budget():
    # 100 x 100 x 40 slices of 62 frames: 2.37 MB per slice.
    assert slab_slices((100, 100, 40, 62), 512) == 40
    assert slab_slices((100, 100, 40, 62), 10) == 4
    assert slab_slices((100, 100, 40, 62), 0.1) == 1
    assert slab_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_other_models_write_their_own_maps(tmp_path, capsys):
    """--model reversible_2tc and one_tc: maps named after the model with its own
    parameters and macro-parameters, the noise-free truth recovered voxel by voxel."""
    from kinpet.kinetics import tacs
    from kinpet.models import get_model, map_names

    truth = {
        "reversible_2tc": {1: [0.8, 0.9, 0.1, 0.03, 0.05], 2: [0.3, 0.4, 0.1, 0.01, 0.04]},
        "one_tc": {1: [0.8, 0.9, 0.05], 2: [0.3, 0.4, 0.04]},
    }
    labels = np.zeros((3, 2, 2), dtype=np.int16)
    labels[:2] = 1
    labels[2, 0] = 2
    write_nifti(tmp_path / "sub-01_dseg.nii.gz", labels, np.eye(4))
    (tmp_path / "sub-01_pet.json").write_text(json.dumps(FRAMES.to_bids()))
    write_blood_tsv(tmp_path / "sub-01_blood.tsv", INPUT)
    for model, regions in truth.items():
        pet = np.zeros((*labels.shape, len(FRAMES)), dtype=np.float32)
        for label, params in regions.items():
            pet[labels == label] = tacs(model, np.array(params), INPUT, FRAMES)
        write_nifti(tmp_path / "sub-01_pet.nii.gz", pet, np.eye(4))
        out = tmp_path / model
        names = {"pet": "pet.nii.gz", "blood": "blood.tsv", "labels": "dseg.nii.gz"}
        paths = {k: tmp_path / f"sub-01_{v}" for k, v in names.items()}
        assert main(args_for(paths, out, "--model", model)) == 0, capsys.readouterr().err
        label = model.replace("_", "")
        meta = json.loads((out / f"sub-01_model-{label}_mimap.json").read_text())
        assert meta["ModelName"] == model
        spec = get_model(model)
        assert list(meta["Files"]) == list(map_names(spec))
        for i, name in enumerate(spec.parameters):
            values = np.asarray(nib.load(out / meta["Files"][name]).dataobj)
            for region, params in regions.items():
                np.testing.assert_allclose(values[labels == region], params[i], rtol=2e-3,
                                           atol=1e-4, err_msg=f"{model} {name}")  # fmt: skip
            assert np.isnan(values[labels == 0]).all()
    # The reversible model with one delay per region: each region's delay, and its voxels
    # fitted with it.
    delays = {1: 3.0, 2: 7.5}
    pet = np.zeros((*labels.shape, len(FRAMES)), dtype=np.float32)
    for label, params in truth["reversible_2tc"].items():
        pet[labels == label] = tacs(
            "reversible_2tc", np.array(params), INPUT, FRAMES, delay_s=delays[label]
        )
    write_nifti(tmp_path / "sub-01_pet.nii.gz", pet, np.eye(4))
    out = tmp_path / "delayed"
    args = args_for(paths, out, "--model", "reversible_2tc", "--fit-delay", "0", "9")
    assert main(args) == 0, capsys.readouterr().err
    meta = json.loads((out / "sub-01_model-reversible2tc_mimap.json").read_text())
    delay_map = np.asarray(nib.load(out / meta["Files"]["delay"]).dataobj)
    k1_map = np.asarray(nib.load(out / meta["Files"]["K1"]).dataobj)
    for label, params in truth["reversible_2tc"].items():
        np.testing.assert_allclose(delay_map[labels == label], delays[label], atol=0.1)
        np.testing.assert_allclose(k1_map[labels == label], params[0], rtol=2e-3)
