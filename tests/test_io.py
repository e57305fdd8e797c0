"""Reading PET-BIDS datasets (kinpet.bids.read_pet_bids): good data and every bad input."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from bids_synthetic import FRAMES, NAMES, write_subject

from kinpet.atomic import remove_stale_temporaries, temporary_path
from kinpet.bids import bids_paths, read_pet_bids
from kinpet.figures import save_figure
from kinpet.inputfunction import InputFunction
from kinpet.io import (
    KinpetInputError,
    NiftiFrameWriter,
    atomic_path,
    nifti_header,
    read_slices,
    write_blood_tsv,
    write_json,
    write_nifti,
    write_nifti_zyx,
    write_slices,
    write_tsv,
)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids")
    truth = write_subject(root)
    return root, truth


@pytest.fixture
def dataset(template, tmp_path):
    """A fresh copy of the good dataset that a test may break."""
    root, truth = template
    copy = tmp_path / "bids"
    shutil.copytree(root, copy)
    return copy, bids_paths(copy, "sub-01"), truth


def edit_json(path, **changes):
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def replace_image(path, data, affine=None):
    image = nib.load(path)
    nib.save(nib.Nifti1Image(data, image.affine if affine is None else affine), path)


def test_reads_the_study(dataset):
    root, paths, truth = dataset
    study = read_pet_bids(root, "sub-01")
    assert study.shape == (*truth["labels"].shape, len(FRAMES))
    assert study.frames == FRAMES
    np.testing.assert_array_equal(study.labels, truth["labels"])
    assert study.label_names == {name: i for i, name in enumerate(NAMES)}
    np.testing.assert_allclose(study.frame(3), truth["pet"][..., 3], rtol=1e-6)
    np.testing.assert_allclose(study.input_function.values, truth["input"].values, rtol=1e-9)
    np.testing.assert_array_equal(study.affine, truth["affine"])


def test_converts_units_to_kbq_per_ml(tmp_path):
    truth = write_subject(tmp_path, units="Bq/mL", blood_units="Bq/mL")
    study = read_pet_bids(tmp_path, "sub-01")
    assert study.unit_factor == 1e-3
    np.testing.assert_allclose(study.frame(5), truth["pet"][..., 5], rtol=1e-6)
    np.testing.assert_allclose(study.input_function.values, truth["input"].values, rtol=1e-9)


def test_image_derived_input_from_the_aorta(dataset):
    root, _, truth = dataset
    study = read_pet_bids(root, "sub-01", input_function="aorta")
    np.testing.assert_array_equal(study.input_function.times_s, FRAMES.mids_s)
    aorta = truth["labels"] == NAMES.index("aorta")
    expected = truth["pet"][aorta].mean(axis=0, dtype=np.float64)
    np.testing.assert_allclose(study.input_function.values, expected, rtol=1e-6)


def test_labels_go_by_name_not_number(dataset):
    root, paths, truth = dataset
    # Renumber: lungs 3 -> 30, bladder 11 -> 31.
    labels = truth["labels"].copy()
    labels[labels == 3], labels[labels == 11] = 30, 31
    replace_image(paths["dseg"], labels)
    table = pd.read_csv(paths["dseg_tsv"], sep="\t")
    table.loc[table.name == "lungs", "index"] = 30
    table.loc[table.name == "bladder", "index"] = 31
    table.to_csv(paths["dseg_tsv"], sep="\t", index=False)
    study = read_pet_bids(root, "sub-01")
    assert study.label_names["lungs"] == 30 and study.label_names["bladder"] == 31


def check_error(root, match, **kwargs):
    with pytest.raises(KinpetInputError, match=match) as info:
        read_pet_bids(root, "sub-01", **kwargs)
    return str(info.value)


@pytest.mark.parametrize("key", ["pet", "pet_json", "dseg", "dseg_tsv", "blood"])
def test_missing_file_names_the_expected_path(dataset, key):
    root, paths, _ = dataset
    paths[key].unlink()
    check_error(root, f"{paths[key]}: file not found")


def test_blood_file_not_needed_for_an_image_derived_input(dataset):
    root, paths, _ = dataset
    paths["blood"].unlink()
    assert read_pet_bids(root, "sub-01", input_function="aorta").input_function is not None


def test_frame_count_differs_between_image_and_sidecar(dataset):
    root, paths, _ = dataset
    edit_json(paths["pet_json"], **FRAMES_MINUS_ONE)
    msg = check_error(root, "the image has 6 frames but sub-01_pet.json lists 5")
    assert str(paths["pet"]) in msg


FRAMES_MINUS_ONE = {
    "FrameTimesStart": list(FRAMES.starts_s[1:]),
    "FrameDuration": list(FRAMES.durations_s[1:]),
}


@pytest.mark.parametrize("field", ["FrameTimesStart", "FrameDuration", "Units"])
def test_missing_sidecar_field(dataset, field):
    root, paths, _ = dataset
    edit_json(paths["pet_json"], **{field: None})
    check_error(root, f"{paths['pet_json']}: missing PET-BIDS field\\(s\\) {field}")


def test_bad_frame_times(dataset):
    root, paths, _ = dataset
    edit_json(paths["pet_json"], FrameDuration=[10, 20, 30, 60, -120, 300])
    check_error(root, f"{paths['pet_json']}: frame 4 has duration -120")


def test_unknown_pet_units(dataset):
    root, paths, _ = dataset
    edit_json(paths["pet_json"], Units="SUV")
    check_error(root, f"{paths['pet_json']}: unknown units 'SUV'")


def test_unknown_blood_units(dataset):
    root, paths, _ = dataset
    sidecar = paths["blood"].with_suffix(".json")
    edit_json(sidecar, whole_blood_radioactivity={"Units": "counts"})
    check_error(root, f"{sidecar}: unknown units 'counts'")


def test_image_not_decay_corrected(dataset):
    root, paths, _ = dataset
    edit_json(paths["pet_json"], ImageDecayCorrected=False)
    check_error(root, f"{paths['pet_json']}: ImageDecayCorrected is false")


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "infinite")])
def test_nan_or_infinite_image(dataset, bad, word):
    root, paths, truth = dataset
    data = truth["pet"].copy()
    data[5, 6, 7, 2] = bad
    replace_image(paths["pet"], data)
    check_error(root, f"{paths['pet']}: frame 2 contains {word} values")


def test_negative_image_is_rejected(dataset):
    root, paths, truth = dataset
    data = truth["pet"].copy()
    data[5, 6, 7, 4] = -0.1 * data.max()
    replace_image(paths["pet"], data)
    check_error(root, f"{paths['pet']}: negative values down to")


def test_small_negative_noise_is_kept(dataset):
    root, paths, truth = dataset
    data = truth["pet"].copy()
    data[5, 6, 7, 4] = -0.01 * data.max()
    replace_image(paths["pet"], data)
    study = read_pet_bids(root, "sub-01")
    assert study.frame(4)[5, 6, 7] == pytest.approx(-0.01 * data.max(), rel=1e-6)


def test_image_must_be_4d(dataset):
    root, paths, truth = dataset
    replace_image(paths["pet"], truth["pet"][..., 0])
    check_error(root, f"{paths['pet']}: expected a 4-D image")


def test_label_grid_shape_differs(dataset):
    root, paths, truth = dataset
    replace_image(paths["dseg"], truth["labels"][:, :, :-1])
    msg = check_error(root, f"{paths['dseg']}: label map shape .* differs from the PET grid")
    assert "sub-01_pet.nii.gz" in msg


def test_label_grid_affine_differs(dataset):
    root, paths, truth = dataset
    shifted = truth["affine"].copy()
    shifted[2, 3] += 2.0  # 2 mm along z
    replace_image(paths["dseg"], truth["labels"], shifted)
    check_error(root, f"{paths['dseg']}: label map affine differs from the PET affine")


def test_label_affine_within_rounding_is_accepted(dataset):
    root, paths, truth = dataset
    rounded = truth["affine"].copy()
    rounded[2, 3] += 5e-4  # float32 rounding of an 800-mm offset is ~5e-5 mm
    replace_image(paths["dseg"], truth["labels"], rounded)
    assert read_pet_bids(root, "sub-01").labels.shape == truth["labels"].shape


def test_unnamed_label_values(dataset):
    root, paths, truth = dataset
    labels = truth["labels"].copy()
    labels[0, 0, 0] = 77
    replace_image(paths["dseg"], labels)
    check_error(root, f"{paths['dseg']}: label value\\(s\\) 77 are not listed in sub-01_dseg.tsv")


@pytest.mark.parametrize(
    "name, kwargs", [("lungs", {}), ("bladder", {}), ("aorta", {"input_function": "aorta"})]
)
def test_missing_label_name(dataset, name, kwargs):
    root, paths, _ = dataset
    table = pd.read_csv(paths["dseg_tsv"], sep="\t")
    table.loc[table.name == name, "name"] = "something_else"
    table.to_csv(paths["dseg_tsv"], sep="\t", index=False)
    check_error(root, f"{paths['dseg_tsv']}: no label named '{name}'", **kwargs)


def test_label_without_voxels(dataset):
    root, paths, truth = dataset
    labels = truth["labels"].copy()
    labels[labels == NAMES.index("aorta")] = NAMES.index("body")
    replace_image(paths["dseg"], labels)
    check_error(
        root, f"{paths['dseg']}: label 'aorta' \\(8\\) has no voxels", input_function="aorta"
    )


def test_a_scan_without_a_bladder_names_the_slice_range_override(dataset):
    """The pipeline's resample step reads the labels its slice range needs: without a
    bladder the message names preprocess.slice_range; a chosen range needs only its organs."""
    from kinpet.preprocessing import slice_range_labels

    root, paths, truth = dataset
    labels = truth["labels"].copy()
    labels[labels == NAMES.index("bladder")] = NAMES.index("body")
    replace_image(paths["dseg"], labels)
    needs = slice_range_labels()
    message = check_error(
        root,
        "label 'bladder' \\(11\\) has no voxels; ",
        required_labels=tuple(needs),
        label_reasons=needs,
    )
    assert message.endswith(
        "set preprocess.slice_range: [lo, hi] (z in mm, or two organ names) for a scan without it"
    )
    needs = slice_range_labels(("liver", 250.0))
    assert needs == {"liver": " (preprocess.slice_range)"}
    study = read_pet_bids(root, "sub-01", required_labels=tuple(needs), label_reasons=needs)
    assert not (study.labels == NAMES.index("bladder")).any()


def test_blood_input_must_cover_the_scan(dataset):
    root, paths, _ = dataset
    table = pd.read_csv(paths["blood"], sep="\t")
    table[table.time <= 200].to_csv(paths["blood"], sep="\t", index=False)  # scan ends 540 s
    check_error(root, f"{paths['blood']}: the input function ends at .* but the scan ends at 540")


def test_blood_column_must_exist(dataset):
    root, _, _ = dataset
    check_error(root, "no column 'plasma_radioactivity'", blood_column="plasma")


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "image.nii.gz"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == target.parent
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert list(target.parent.iterdir()) == []
    write_nifti(target, np.ones((2, 3, 4), dtype=np.int16), np.diag([-2.5, -2.5, 2.5, 1]))
    image = nib.load(target)
    assert image.get_data_dtype() == np.int16 and image.shape == (2, 3, 4)
    assert [p.name for p in target.parent.iterdir()] == ["image.nii.gz"]


def test_slices_file_round_trip(tmp_path):
    path = tmp_path / "sub-01.npz"
    arrays = {
        "tacs": np.ones((2, 3, 4, 5), np.float32),
        "labels": np.zeros((2, 4, 5), np.int16),
        "z": np.array([7, 8]),
        "crop": np.array([-1, 2]),
        "frame_start_s": np.array([0.0, 10, 20]),
        "frame_duration_s": np.array([10.0, 10, 10]),
        "subject": np.array("sub-01"),
    }
    write_slices(path, **arrays)
    back = read_slices(path)
    assert back["subject"] == "sub-01"
    np.testing.assert_array_equal(back["crop"], [-1, 2])
    write_slices(path, tacs=arrays["tacs"])
    with pytest.raises(KinpetInputError, match="missing array"):
        read_slices(path)


def test_times_count_from_the_injection(dataset):
    """Frames and blood samples 30 s after TimeZero with InjectionStart = 30 s: the study's
    times are the same as when the injection is at TimeZero."""
    root, paths, truth = dataset
    edit_json(
        paths["pet_json"],
        FrameTimesStart=[float(s) + 30 for s in FRAMES.starts_s],
        InjectionStart=30,
    )
    table = pd.read_csv(paths["blood"], sep="\t")
    table["time"] += 30
    table.to_csv(paths["blood"], sep="\t", index=False)
    study = read_pet_bids(root, "sub-01")
    assert study.frames == FRAMES
    np.testing.assert_allclose(study.input_function.times_s, truth["input"].times_s, atol=1e-9)
    edit_json(paths["pet_json"], InjectionStart="soon")
    check_error(root, f"{paths['pet_json']}: InjectionStart must be a number")


def truncate(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


@pytest.mark.parametrize("key", ["pet", "dseg"])
def test_truncated_image_names_the_file(dataset, key):
    root, paths, _ = dataset
    truncate(paths[key])
    with pytest.raises(KinpetInputError) as err:
        read_pet_bids(root, "sub-01")
    message = str(err.value)
    assert message.startswith(f"{paths[key]}: truncated or corrupt file") and "EOFError" in message


def test_truncated_or_corrupt_slices_file_names_the_file(tmp_path):
    path = tmp_path / "sub-01.npz"
    write_slices(path, tacs=np.random.default_rng(0).random((2, 3, 40, 50)), z=np.arange(2))
    good = path.read_bytes()
    truncate(path)
    with pytest.raises(KinpetInputError, match=r"sub-01\.npz: truncated or corrupt file"):
        read_slices(path)
    damaged = bytearray(good)
    damaged[100:400] = bytes(300)
    path.write_bytes(bytes(damaged))
    with pytest.raises(KinpetInputError, match=r"sub-01\.npz: truncated or corrupt file"):
        read_slices(path)


@pytest.mark.parametrize("value", ["false", "true", 0, None])
def test_image_decay_corrected_must_be_a_boolean(dataset, value):
    root, paths, _ = dataset
    meta = json.loads(paths["pet_json"].read_text())
    meta["ImageDecayCorrected"] = value
    paths["pet_json"].write_text(json.dumps(meta))
    check_error(
        root,
        f"{paths['pet_json']}: ImageDecayCorrected must be a JSON boolean .*not {value!r}",
    )


def test_frame_times_in_minutes_are_refused(dataset):
    root, paths, _ = dataset
    edit_json(
        paths["pet_json"],
        FrameTimesStart=list(FRAMES.starts_s / 60),
        FrameDuration=list(FRAMES.durations_s / 60),
    )
    check_error(root, f"{paths['pet_json']}: the 6 frames end at 9 s, too short")


def test_blood_recording_zero_everywhere_is_refused(dataset):
    root, paths, _ = dataset
    table = pd.read_csv(paths["blood"], sep="\t")
    table["whole_blood_radioactivity"] = 0.0
    table.to_csv(paths["blood"], sep="\t", index=False)
    check_error(root, f"{paths['blood']}: the input function is zero everywhere")


def test_image_derived_input_zero_everywhere_is_refused(dataset):
    root, paths, truth = dataset
    pet = truth["pet"].copy()
    pet[truth["labels"] == NAMES.index("aorta")] = 0.0
    replace_image(paths["pet"], pet)
    check_error(
        root,
        f"{paths['pet']} \\(mean of the aorta label\\): the input function is zero everywhere",
        input_function="aorta",
    )


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o666 & ~0o027
    os.umask(previous)


def test_outputs_get_the_mode_of_a_plain_open(tmp_path, umask_027):
    """Every writer's output is 0666 minus the umask (here 0640), as open() makes it; the
    mkstemp of atomic_path made 0600 whatever the umask (the group could not read)."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    write_nifti(tmp_path / "a.nii.gz", np.ones((2, 3, 4), np.float32), affine)
    write_nifti_zyx(tmp_path / "b.nii.gz", np.ones((4, 3, 2), np.float32), affine)
    header = nifti_header((2, 3, 4, 1), affine, np.float32)
    with NiftiFrameWriter(tmp_path / "c.nii.gz", header) as writer:
        writer.write(np.ones((4, 3, 2), np.float32))
    write_json(tmp_path / "d.json", {"a": 1})
    write_slices(tmp_path / "e.npz", tacs=np.ones(3))
    write_tsv(tmp_path / "f.tsv", pd.DataFrame({"a": [1]}))
    write_blood_tsv(tmp_path / "g_blood.tsv", InputFunction([0.0, 60.0], [0.0, 1.0]))
    with atomic_path(tmp_path / "h.md") as tmp:
        tmp.write_text("table\n")
    save_figure(plt.figure(), tmp_path / "i.pdf")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert stat.S_IMODE(plain.stat().st_mode) == umask_027
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in tmp_path.iterdir()}
    assert set(modes.values()) == {oct(umask_027)}, modes
    assert len(modes) == 11


def test_temporaries_name_their_writer_and_keep_the_suffix(tmp_path):
    tmp = temporary_path(tmp_path / "sub-01_pet.nii.gz", pid=123)
    assert tmp.name == f".sub-01_pet.kinpet-tmp-{socket.gethostname()}-123.nii.gz"
    assert temporary_path(tmp_path / "labels.tsv", pid=7).name.endswith("-7.tsv")


KILLED_WRITER = """
import sys, time
import numpy as np
from kinpet.io import NiftiFrameWriter, nifti_header
header = nifti_header((8, 8, 8, 3), np.eye(4), np.float32)
writer = NiftiFrameWriter(sys.argv[1], header)
writer.write(np.ones((8, 8, 8), np.float32))
print("one frame written", flush=True)
time.sleep(120)
"""


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    """SIGKILL in the middle of a streamed NIfTI leaves its temporary; the next write of
    the same file removes it (its pid is dead). Temporaries of live processes, of other
    hosts and of other files stay."""
    target = tmp_path / "sub-01_pet.nii.gz"
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline().strip() == "one frame written"
    writer.kill()
    writer.wait()
    left = temporary_path(target, pid=writer.pid)
    assert left.exists() and not target.exists()
    live = temporary_path(target, pid=os.getppid())
    other_host = target.with_name(f".sub-01_pet.kinpet-tmp-elsewhere-{writer.pid}.nii.gz")
    other_file = temporary_path(tmp_path / "sub-01_pet.json", pid=writer.pid)
    for path in (live, other_host, other_file):
        path.write_bytes(b"partial")
    header = nifti_header((8, 8, 8, 1), np.eye(4), np.float32)
    with NiftiFrameWriter(target, header) as again:
        again.write(np.ones((8, 8, 8), np.float32))
    assert not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, live.name, other_host.name, other_file.name]
    )
    assert remove_stale_temporaries(tmp_path / "sub-01_pet.json") == [other_file]


WRITE_NIFTI = """
import sys
import numpy as np
from kinpet.io import write_nifti, write_nifti_zyx
data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
write_nifti(sys.argv[1], data, np.diag([2.5, 2.5, 2.5, 1.0]))
write_nifti_zyx(sys.argv[2], data, np.diag([2.5, 2.5, 2.5, 1.0]))
"""


def test_nifti_bytes_do_not_depend_on_the_writer_or_its_temporary(tmp_path):
    """Two writes of the same NIfTI, by two processes (two temporary names), give the same
    bytes: the gzip header holds no file name and no time."""
    outputs = []
    for run in ("a", "b"):
        paths = [tmp_path / run / "sub-01_desc-K1_kinpar.nii.gz", tmp_path / run / "zyx.nii.gz"]
        paths[0].parent.mkdir()
        subprocess.run(
            [sys.executable, "-c", WRITE_NIFTI, *map(str, paths)], check=True, cwd=tmp_path
        )
        outputs.append([p.read_bytes() for p in paths])
    assert outputs[0] == outputs[1]
    for data in outputs[0]:
        assert data[:2] == b"\x1f\x8b" and data[3] & 0x08 == 0  # FNAME flag unset
        assert data[4:8] == b"\0\0\0\0"  # mtime 0
