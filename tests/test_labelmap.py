"""The phantom's anatomy from a label map (kinpet.labelmap): TotalSegmentator's example case
becomes kinpet's classes on the simulation grid, and bad label maps stop with one line."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from kinpet import anatomy, labelmap, phantom, simulation
from kinpet.io import read_label_table, read_organ_values
from kinpet.motion import Breathing
from kinpet.preprocessing import canonical_grid

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests/data/totalsegmentator_example"
SEG = EXAMPLE / "example_seg.nii.gz"
CT = EXAMPLE / "example_ct_sm.nii.gz"
CLASSES = ROOT / "config/totalsegmentator_classes.tsv"
ORGANS = read_organ_values(ROOT / "config/organ_values.tsv")


def read_example(voxel_mm, ct=CT):
    return labelmap.read_label_anatomy(SEG, voxel_mm, CLASSES, ct)


def write_label_map(path, labels, names=None, voxel_mm=4.0):
    """A small label map, with its table beside it when ``names`` is given; oriented LPS, as
    the simulation grid, so that resampling at its own voxel size changes nothing."""
    affine = np.diag([-voxel_mm, -voxel_mm, voxel_mm, 1.0])
    nib.save(nib.Nifti1Image(labels.astype(np.int16), affine), path)
    if names is not None:
        table = pd.DataFrame({"index": list(names), "name": list(names.values())})
        table.to_csv(labelmap.label_table_beside(path), sep="\t", index=False)
    return path


def box_labels():
    """A 12 x 10 x 8 block: a body label around a liver and one more label."""
    labels = np.zeros((12, 10, 8), dtype=np.int16)
    labels[1:11, 1:9, 1:7] = 1
    labels[2:6, 2:6, 2:5] = 2
    labels[7:10, 3:7, 2:6] = 3
    return labels


def test_the_class_table_covers_totalsegmentator_v2():
    table = pd.read_csv(CLASSES, sep="\t", dtype={"index": "Int64"})
    v2 = pd.read_csv(EXAMPLE / "total_v2_classes.tsv", sep="\t")
    numbered = table.dropna(subset=["index"])
    assert list(numbered["index"]) == list(v2["index"])
    assert list(numbered["name"]) == list(v2["name"])
    classes, names = labelmap.read_class_table(CLASSES)
    assert set(classes.values()) <= set(anatomy.LABEL_INDEX) - {"background"}
    expected = {
        "liver": "liver",
        "spleen": "spleen",
        "kidney_left": "kidneys",
        "kidney_right": "kidneys",
        "aorta": "aorta",
        "lung_upper_lobe_left": "lungs",
        "lung_lower_lobe_right": "lungs",
        "heart": "heart",
        "vertebrae_L1": "bones",
        "hip_left": "bones",
        "femur_right": "bones",
        "urinary_bladder": "bladder",
        "gallbladder": "gallbladder",
        "stomach": "body",
        "pancreas": "body",
        "inferior_vena_cava": "heart_blood",
        "body_trunc": "body",
    }
    assert {n: classes[n] for n in expected} == expected
    assert names[5] == "liver" and names[52] == "aorta"


def test_the_example_becomes_kinpets_classes_with_the_label_maps_volumes():
    """On the 1.6-mm grid (the phantom's default voxel) every organ keeps its volume within
    5 %; the grid covers the label map where it lay, axis-aligned LPS."""
    got = read_example(1.6)
    header = nib.load(SEG)
    shape, affine = canonical_grid(header.shape, header.affine, 1.6)
    assert got.grid.shape == shape and got.labels_zyx.shape == shape[::-1]
    np.testing.assert_allclose(got.grid.affine, affine)
    seg = np.asarray(header.dataobj)
    classes, names = labelmap.read_class_table(CLASSES)
    voxel_ml = 27.0 / 1000
    counts = np.bincount(got.labels_zyx.ravel(), minlength=len(anatomy.LABELS))
    for organ in ("liver", "spleen", "kidneys", "lungs", "bones", "aorta", "gallbladder"):
        values = [i for i, n in names.items() if classes[n] == organ]
        source_ml = np.isin(seg, values).sum() * voxel_ml
        assert got.volumes_ml[organ] == pytest.approx(source_ml)
        simulated_ml = counts[anatomy.LABEL_INDEX[organ]] * 1.6**3 / 1000
        assert simulated_ml == pytest.approx(source_ml, rel=0.05), organ
    # The liver is where the label map has it (world mm, centres within a voxel).
    world = np.argwhere(seg == 5).mean(0) @ header.affine[:3, :3].T + header.affine[:3, 3]
    z, y, x = np.argwhere(got.labels_zyx == anatomy.LABEL_INDEX["liver"]).mean(0)
    simulated = got.grid.affine @ np.array([x, y, z, 1.0])
    np.testing.assert_allclose(simulated[:3], world, atol=1.6)
    # Nothing there is unknown to the class table; the body comes from the CT.
    assert got.unknown == []
    body = counts[anatomy.LABEL_INDEX["body"]] * 1.6**3 / 1000
    assert 3000 < body < 6000  # the abdomen's soft tissue, ml


def test_simulated_labels_and_truth_lie_on_the_simulation_grid(tmp_path):
    """A subject simulated from the example: its labels derivative is the anatomy, the
    truth follows the classes (blood Vb = 1, organs within the paper's bounds), and every
    file shares the grid."""
    got = read_example(4.0)
    sub = phantom.make_subject("sub-02", seed=5, organ_values=ORGANS, voxel_mm=4.0, anatomy=got)
    simulation.simulate_subject(sub, tmp_path, fwhm_mm=0.0, noise_cov=0.1, log=lambda m: None)
    dseg = nib.load(tmp_path / "derivatives/labels/sub-02/sub-02_dseg.nii.gz")
    labels = np.asarray(dseg.dataobj)
    np.testing.assert_array_equal(labels, got.labels_zyx.transpose(2, 1, 0))
    np.testing.assert_allclose(dseg.affine, got.grid.affine)
    table = read_label_table(tmp_path / "derivatives/labels/sub-02/sub-02_dseg.tsv")
    assert table == anatomy.LABEL_INDEX
    pet = nib.load(tmp_path / "sub-02/pet/sub-02_pet.nii.gz")
    assert pet.shape == (*labels.shape, 62)
    np.testing.assert_allclose(pet.affine, got.grid.affine)
    truth = tmp_path / "derivatives/truth/sub-02"
    vb = np.asarray(nib.load(truth / "sub-02_desc-Vb_truth.nii.gz").dataobj)
    k1 = np.asarray(nib.load(truth / "sub-02_desc-K1_truth.nii.gz").dataobj)
    assert (vb[labels == anatomy.LABEL_INDEX["aorta"]] == 1).all()
    assert (k1[labels == 0] == 0).all()
    liver = k1[labels == anatomy.LABEL_INDEX["liver"]]
    assert liver.mean() == pytest.approx(sub.organ_params["liver"][0], rel=0.25)
    sidecar = json.loads((tmp_path / "sub-02/pet/sub-02_pet.json").read_text())
    assert sidecar["PhantomAnatomy"] == "example_seg.nii.gz"
    assert sidecar["PhantomSize"] == "labelmap"
    # The noise is set in the liver, as for the procedural body.
    assert sidecar["PhantomNoiseReferenceValue"] > 0


def test_subjects_share_the_anatomy_and_differ_in_kinetics():
    got = read_example(6.0)
    a = phantom.make_subject("sub-01", seed=1, voxel_mm=6.0, anatomy=got)
    b = phantom.make_subject("sub-02", seed=1, voxel_mm=6.0, anatomy=got)
    np.testing.assert_array_equal(a.labels(), b.labels())
    assert not np.allclose(a.organ_params["liver"], b.organ_params["liver"])
    assert a.input_peak_kbq_per_ml != b.input_peak_kbq_per_ml
    with pytest.raises(ValueError, match="example_seg.nii.gz: read on 6-mm voxels, not the 2"):
        phantom.make_subject("sub-01", voxel_mm=2.0, anatomy=got)
    with pytest.raises(ValueError, match="deform_mm deforms the procedural organs only"):
        phantom.make_subject("sub-01", voxel_mm=6.0, anatomy=got, deform_mm=2.0)


def test_unknown_labels_go_to_the_default_class(tmp_path):
    """A name in neither the class table nor kinpet's labels, and a value the table lacks,
    become soft tissue (``body``); kinpet's own names keep their class."""
    labels = box_labels()
    labels[8, 7, 6] = 9  # a value without a name
    path = write_label_map(tmp_path / "seg.nii.gz", labels, {1: "body", 2: "liver", 3: "wibble"})
    got = labelmap.read_label_anatomy(path, 4.0, CLASSES)
    assert labelmap.DEFAULT_CLASS == "body"
    assert got.unknown == ["wibble", "value 9"]
    out = got.labels_zyx.transpose(2, 1, 0)
    index = anatomy.LABEL_INDEX
    assert (out[labels == 3] == index["body"]).all() and out[8, 7, 6] == index["body"]
    assert (out[labels == 2] == index["liver"]).all() and (out[labels == 0] == 0).all()


def test_a_body_label_is_the_outline_and_names_come_from_the_table_beside():
    labels = box_labels()
    names = {1: "body_trunc", 2: "kidney_left", 3: "liver"}
    out, volumes, unknown = labelmap.anatomy_from_labels(labels, names, {"body_trunc": "body"})
    # kidney_left is in neither this table nor kinpet's labels; liver is kinpet's own name.
    assert unknown == ["kidney_left"]
    assert volumes == {"body": float((labels != 3).sum() - (labels == 0).sum()), "liver": 48.0}
    index = anatomy.LABEL_INDEX
    assert (out[labels == 1] == index["body"]).all() and (out[labels == 0] == 0).all()
    assert (out[labels == 3] == index["liver"]).all()


def test_a_label_map_without_a_body_outline_is_refused(tmp_path):
    with pytest.raises(labelmap.AnatomyError) as err:
        read_example(4.0, ct=None)
    assert str(err.value) == (
        f"{SEG}: no body outline: the label map has no label named body or body_trunc or "
        "body_extremities and no CT was given (phantom.anatomy_ct) to find the body in; the "
        "phantom needs the soft tissue around the organs"
    )


def test_a_label_map_without_a_known_organ_is_refused(tmp_path):
    path = write_label_map(tmp_path / "seg.nii.gz", box_labels(), {1: "body", 2: "foo", 3: "bar"})
    with pytest.raises(labelmap.AnatomyError, match=r"seg.nii.gz: none of its 3 labels \(body, "):
        labelmap.read_label_anatomy(path, 4.0, CLASSES)
    # Numbers read as TotalSegmentator's: stomach (6) and colon (20) are soft tissue.
    classes, names = labelmap.read_class_table(CLASSES)
    labels = box_labels()
    labels[labels == 1], labels[labels == 2], labels[labels == 3] = 0, 6, 20
    with pytest.raises(labelmap.AnatomyError, match=r"\(stomach, colon\) is an organ kinpet"):
        labelmap.anatomy_from_labels(labels, names, classes, body=labels > 0)


def test_a_ct_on_another_grid_is_refused(tmp_path):
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.int16), np.eye(4)), ct)
    with pytest.raises(labelmap.AnatomyError, match="ct.nii.gz: not on the grid of the label map"):
        read_example(4.0, ct=ct)


def test_the_class_table_must_name_kinpets_classes(tmp_path):
    bad = tmp_path / "classes.tsv"
    bad.write_text("index\tname\tclass\n1\tspleen\tspleens\n")
    with pytest.raises(labelmap.AnatomyError, match="classes.tsv: unknown class.* spleens"):
        labelmap.read_class_table(bad)


def test_the_body_of_a_ct_is_filled_and_the_table_left_out():
    ct = np.full((30, 30, 4), -1000.0)
    ct[5:25, 5:22, :] = 40.0  # the body
    ct[10:20, 8:18, :] = -850.0  # the lungs, inside it
    ct[5:25, 25:27, :] = 300.0  # the table under it
    body = labelmap.body_from_ct(ct)
    expected = np.zeros(ct.shape, dtype=bool)
    expected[5:25, 5:22, :] = True
    np.testing.assert_array_equal(body, expected)


def test_no_liver_and_noise_is_refused(tmp_path):
    path = write_label_map(tmp_path / "seg.nii.gz", box_labels(), {1: "body", 2: "spleen"})
    got = labelmap.read_label_anatomy(path, 4.0, CLASSES)
    sub = phantom.make_subject("sub-01", voxel_mm=4.0, anatomy=got)
    with pytest.raises(ValueError, match="seg.nii.gz: the label map has no liver"):
        simulation.simulate_subject(sub, tmp_path / "bids", noise_cov=0.1)


@pytest.mark.parametrize(
    "motion, message",
    [
        ({"cardiac_fwhm_mm": 8.0}, "no heart, which the cardiac blur"),
        ({"amplitude_z_mm": 10.0}, "no lungs, kidneys, which breathing"),
    ],
)
def test_motion_without_what_places_it_is_refused(tmp_path, motion, message):
    path = write_label_map(tmp_path / "seg.nii.gz", box_labels(), {1: "body", 2: "liver"})
    got = labelmap.read_label_anatomy(path, 4.0, CLASSES)
    sub = phantom.make_subject("sub-01", voxel_mm=4.0, anatomy=got)
    with pytest.raises(ValueError, match=f"seg.nii.gz: the label map has {message}"):
        simulation.simulate_subject(
            sub, tmp_path / "bids", noise_cov=0.0, motion=Breathing(**motion)
        )
    assert not (tmp_path / "bids").exists()  # refused before anything is written


def test_command_line_simulates_the_example(tmp_path, capsys):
    from kinpet.cli import main

    args = ["simulate", "--out", str(tmp_path), "--voxel", "6", "--noise-cov", "0"]
    args += ["--anatomy", str(SEG), "--anatomy-ct", str(CT), "--anatomy-classes", str(CLASSES)]
    assert main(args) == 0
    labels = np.asarray(nib.load(tmp_path / "derivatives/labels/sub-01/sub-01_dseg.nii.gz").dataobj)
    assert (labels == anatomy.LABEL_INDEX["spleen"]).sum() > 0
    err = capsys.readouterr().err
    assert "label names are TotalSegmentator v2's" in err and "sub-01: done" in err
    assert main([*args[:-6], "--anatomy", str(SEG), "--anatomy-classes", str(CLASSES)]) == 2
    assert "error: " in capsys.readouterr().err
