"""kinpet.readers: the pipeline's intermediates read with errors that name the file, and a
workflow script that stops on bad input with one line in its log."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from kinpet.io import KinpetInputError, write_label_table, write_nifti
from kinpet.readers import (
    read_json,
    read_nifti_header,
    read_npz,
    read_table,
    read_volume,
    report_error,
)

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.diag([2.5, 2.5, 2.5, 1.0])  # 2.5-mm voxels
AFFINE[:3, 3] = (-30.0, -20.0, 5.0)


def truncate(path, keep=0.5):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.fixture
def volume_3d(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((12, 10, 8), dtype=np.float32)
    path = tmp_path / "map.nii.gz"
    write_nifti(path, data, AFFINE)
    return path, data


@pytest.fixture
def volume_4d(tmp_path):
    rng = np.random.default_rng(1)
    data = (100 * rng.random((12, 10, 8, 5))).astype(np.float32)
    path = tmp_path / "pet.nii.gz"
    write_nifti(path, data, AFFINE)
    return path, data


# -- good files: the same data as the bare calls ---------------------------------------------


def test_read_volume_equals_nibabel(volume_3d, volume_4d):
    for path, data in (volume_3d, volume_4d):
        bare = np.asarray(nib.load(path).dataobj)
        got = read_volume(path)
        assert got.dtype == bare.dtype
        np.testing.assert_array_equal(got, bare)
        np.testing.assert_array_equal(got, data)
    path, data = volume_4d
    got = read_volume(path, np.float64, slab=np.s_[:, :, 2:5, :], ndim=4)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, data[:, :, 2:5, :])
    np.testing.assert_array_equal(read_volume(path, slab=np.s_[:, 3, :, :]), data[:, 3])


def test_labels_keep_their_integer_type(tmp_path):
    labels = np.zeros((6, 5, 4), dtype=np.int16)
    labels[1:3, 1:3, 1:3] = 2
    write_nifti(tmp_path / "dseg.nii.gz", labels, AFFINE, dtype=np.int16)
    got = read_volume(tmp_path / "dseg.nii.gz", ndim=3)
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, labels)


def test_read_nifti_header(volume_4d):
    path, data = volume_4d
    grid = read_nifti_header(path)
    image = nib.load(path)
    assert grid.shape == data.shape
    np.testing.assert_array_equal(grid.affine, image.affine)
    assert grid.affine.dtype == np.float64
    assert grid.zooms[:3] == (2.5, 2.5, 2.5)


def test_read_npz_equals_numpy(tmp_path):
    arrays = {"z": np.arange(4), "crop": np.array([3, 5]), "tacs": np.ones((2, 3), np.float32)}
    np.savez_compressed(tmp_path / "a.npz", **arrays)
    got = read_npz(tmp_path / "a.npz")
    assert set(got) == set(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(got[key], value)
        assert got[key].dtype == value.dtype
    assert list(read_npz(tmp_path / "a.npz", keys=("z",))) == ["z"]


def test_read_table_and_json_equal_pandas_and_json(tmp_path):
    table = pd.DataFrame({"organ": ["liver", "lungs"], "K1": [0.8, 0.1]})
    table.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    table.to_csv(tmp_path / "t.csv", index=False)
    pd.testing.assert_frame_equal(read_table(tmp_path / "t.tsv", ["organ", "K1"]), table)
    pd.testing.assert_frame_equal(read_table(tmp_path / "t.csv", ["K1"], sep=","), table)
    meta = {"FrameTimesStart": [0, 10], "Units": "kBq/mL"}
    (tmp_path / "m.json").write_text(json.dumps(meta))
    assert read_json(tmp_path / "m.json") == meta


# -- bad files: KinpetInputError naming the file and the problem -------------------------------


def _raises(call, path, *words):
    with pytest.raises(KinpetInputError) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for word in words:
        assert word in message, message
    return message


def test_truncated_and_broken_nifti(volume_3d, tmp_path):
    path, _ = volume_3d
    truncate(path)
    _raises(lambda: read_volume(path), path, "truncated or corrupt", "EOFError")
    # The header is whole: the grid is readable, only the data are not.
    assert read_nifti_header(path).shape == (12, 10, 8)

    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    _raises(lambda: read_volume(empty), empty, "empty file")
    stub = tmp_path / "stub.nii.gz"
    stub.write_bytes(path.read_bytes()[:60])  # not even a whole header
    _raises(lambda: read_nifti_header(stub), stub, "cannot read as NIfTI")
    missing = tmp_path / "nope.nii.gz"
    _raises(lambda: read_volume(missing), missing, "file not found")


def test_wrong_dimensions(volume_4d):
    path, _ = volume_4d
    _raises(lambda: read_volume(path, ndim=3), path, "expected a 3-D image", "(12, 10, 8, 5)")


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.97])
def test_empty_and_truncated_npz(tmp_path, keep):
    path = tmp_path / "chunk.npz"
    np.savez_compressed(path, voxels=np.array(7), params=np.ones((50, 4)))
    truncate(path, keep)
    problem = "empty file" if keep == 0 else "truncated or corrupt"
    _raises(lambda: read_npz(path), path, problem)


def test_npz_missing_array_and_pickles(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, z=np.arange(3))
    _raises(lambda: read_npz(path, keys=("z", "crop")), path, "missing array(s) crop", "z")
    pickled = tmp_path / "p.npz"
    np.savez(pickled, obj=np.array([{"a": 1}], dtype=object))
    _raises(lambda: read_npz(pickled), pickled, "truncated or corrupt", "pickle")


def test_malformed_and_incomplete_tables(tmp_path):
    missing = tmp_path / "fits.tsv"
    missing.write_text("organ\tK1\nliver\t0.8\n")
    _raises(
        lambda: read_table(missing, ["organ", "method", "K1", "k2"]),
        missing,
        "missing column(s) method, k2",
        "columns: organ, K1",
    )
    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("z\tcs\n0\t0.9\n1\t0.8\t7\t9\n")
    _raises(lambda: read_table(ragged), ragged, "cannot read as TSV")
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    _raises(lambda: read_table(empty, ["z"]), empty, "empty file")
    _raises(lambda: read_table(tmp_path / "no.tsv"), tmp_path / "no.tsv", "file not found")


@pytest.mark.parametrize(
    "content, problem",
    [
        (b'{"FrameTimesStart": [0, 10', "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
    ],
)
def test_bad_json(tmp_path, content, problem):
    path = tmp_path / "sub-01_pet.json"
    path.write_bytes(content)
    _raises(lambda: read_json(path), path, problem)


def test_report_error_only_for_named_errors(capsys):
    assert report_error(KinpetInputError("a.nii.gz: truncated"))
    assert capsys.readouterr().err == "ERROR: a.nii.gz: truncated\n"
    assert not report_error(ValueError("a bug, keep its traceback"))
    assert capsys.readouterr().err == ""


# -- one workflow script, end to end, as Snakemake's script directive runs it ---------------

# Runs a workflow script in a Python process of its own, as Snakemake's script: directive
# does, with a stand-in for the snakemake object (inputs, outputs, params, log).
DRIVER = """
import json, runpy, sys
from types import SimpleNamespace

class Files(list):
    def __init__(self, named):
        super().__init__(named.values())
        self.__dict__.update(named)
    def keys(self):
        return self.__dict__.keys()

spec = json.loads(sys.argv[2])
snakemake = SimpleNamespace(
    input=Files(spec["input"]),
    output=Files(spec["output"]),
    params=SimpleNamespace(**spec["params"]),
    log=[spec["log"]],
    threads=1,
    wildcards=SimpleNamespace(**spec.get("wildcards", {})),
)
runpy.run_path(sys.argv[1], init_globals={"snakemake": snakemake}, run_name="__main__")
"""


def run_script(name, spec, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    script = ROOT / "workflow" / "scripts" / f"{name}.py"
    return subprocess.run(
        [sys.executable, "-c", DRIVER, str(script), json.dumps(spec)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def figure4_inputs(tmp_path):
    """Labels, their table and two K1 maps on a small grid: figure4.py's inputs."""
    labels = np.zeros((16, 14, 10), dtype=np.int16)
    labels[2:14, 2:12, 1:9] = 1  # body
    labels[4:8, 4:10, 2:6] = 2  # liver
    labels[9:12, 4:9, 4:8] = 3  # lungs
    rng = np.random.default_rng(2)
    k1 = np.where(labels > 0, 0.5 + 0.1 * rng.random(labels.shape), np.nan).astype(np.float32)
    write_nifti(tmp_path / "dseg.nii.gz", labels, AFFINE, dtype=np.int16)
    write_label_table(tmp_path / "dseg.tsv", {0: "background", 1: "body", 2: "liver", 3: "lungs"})
    write_nifti(tmp_path / "network_K1.nii.gz", k1, AFFINE)
    write_nifti(tmp_path / "fit_K1.nii.gz", 1.05 * k1, AFFINE)
    return {
        "input": {
            "labels": "dseg.nii.gz",
            "labels_tsv": "dseg.tsv",
            "network": "network_K1.nii.gz",
            "fit": "fit_K1.nii.gz",
        },
        "output": {"png": "out/figure4.png", "pdf": "out/figure4.pdf"},
        "params": {
            "organs": ["liver", "lungs"],
            "method": "fast",
            "ablation": "4.1",
            "subject": "sub-01",
        },
        "log": "figure4.log",
    }


def test_a_script_stops_on_a_corrupt_input_with_one_line(figure4_inputs, tmp_path):
    (tmp_path / "out").mkdir()
    # The good inputs make the figure: the stand-in is what the script needs.
    res = run_script("figure4", figure4_inputs, tmp_path)
    assert res.returncode == 0, res.stderr + (tmp_path / "figure4.log").read_text()
    assert (tmp_path / "out/figure4.png").stat().st_size > 0
    for name in ("figure4.png", "figure4.pdf"):
        (tmp_path / "out" / name).unlink()

    truncate(tmp_path / "network_K1.nii.gz")
    res = run_script("figure4", figure4_inputs, tmp_path)
    assert res.returncode == 1
    log = (tmp_path / "figure4.log").read_text()
    assert "Traceback" not in log and "Traceback" not in res.stderr
    last = log.strip().splitlines()[-1]
    assert last.startswith("ERROR: network_K1.nii.gz: truncated or corrupt file"), log
    assert "EOFError" in last
    assert list((tmp_path / "out").iterdir()) == []  # no output, not even a temporary


def test_a_script_keeps_the_traceback_of_a_bug(figure4_inputs, tmp_path):
    """An error that is no input error (here a config value of the wrong type) is a bug to
    report: its traceback stays in the log."""
    (tmp_path / "out").mkdir()
    figure4_inputs["params"]["organs"] = 7
    res = run_script("figure4", figure4_inputs, tmp_path)
    assert res.returncode == 1
    assert "Traceback" in (tmp_path / "figure4.log").read_text()


def test_an_error_of_another_kinpet_module_is_one_line_too(figure4_inputs, tmp_path):
    (tmp_path / "out").mkdir()
    figure4_inputs["params"]["organs"] = ["liver", "spleen"]
    res = run_script("figure4", figure4_inputs, tmp_path)
    assert res.returncode == 1
    log = (tmp_path / "figure4.log").read_text()
    assert "Traceback" not in log
    assert log.strip().splitlines()[-1].startswith("ERROR: dseg.tsv: no label named 'spleen'")


def test_organ_values_that_do_not_parse(tmp_path):
    from kinpet.io import read_organ_values

    header = "organ\tK1\tk2\tk3\tVb\n"
    text = tmp_path / "text.tsv"
    text.write_text(header + "liver\t0.8\tabc\t0.01\t0.02\n")
    _raises(lambda: read_organ_values(text), text, "finite numbers")
    ragged = tmp_path / "ragged.tsv"
    ragged.write_text(header + "liver\t0.8\t0.1\t0.01\t0.02\nlungs\t0.1\t0.1\t0.01\t0.02\t9\n")
    _raises(lambda: read_organ_values(ragged), ragged, "cannot read as TSV")


def test_fit_slabs_names_a_truncated_image_in_one_line(tmp_path):
    rng = np.random.default_rng(1)
    write_nifti(tmp_path / "pet.nii.gz", rng.random((6, 5, 4, 7), dtype=np.float32), AFFINE)
    spec = {"input": {"pet": "pet.nii.gz"}, "output": {"slabs": "slabs.npy"},
            "params": {}, "log": "fit_slabs.log"}  # fmt: skip
    res = run_script("fit_slabs", spec, tmp_path)
    assert res.returncode == 0, res.stderr + (tmp_path / "fit_slabs.log").read_text()
    assert np.load(tmp_path / "slabs.npy").shape == (4, 6, 5, 7)
    (tmp_path / "slabs.npy").unlink()
    truncate(tmp_path / "pet.nii.gz")
    res = run_script("fit_slabs", spec, tmp_path)
    log = (tmp_path / "fit_slabs.log").read_text()
    assert res.returncode == 1 and "Traceback" not in log
    assert log.strip().splitlines()[-1].startswith("ERROR: pet.nii.gz: truncated or corrupt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit_slabs.log", "pet.nii.gz"]


def test_fit_chunk_names_a_truncated_slab_file_in_one_line(tmp_path):
    from kinpet.frames import FrameSchedule
    from kinpet.inputfunction import InputFunction
    from kinpet.io import write_blood_tsv
    from kinpet.voxelfit import write_slabs

    frames = FrameSchedule.paper()
    labels = np.ones((6, 5, 4), dtype=np.int16)
    write_nifti(tmp_path / "labels.nii.gz", labels, AFFINE, dtype=np.int16)
    write_label_table(tmp_path / "labels.tsv", {0: "background", 1: "body"})
    (tmp_path / "pet.json").write_text(json.dumps(frames.to_bids()))
    write_blood_tsv(tmp_path / "blood.tsv", InputFunction.feng(peak_kbq_per_ml=200.0))
    write_slabs(np.ones((6, 5, 4, len(frames)), np.float32), tmp_path / "slabs.npy")
    truncate(tmp_path / "slabs.npy", 0.6)  # the chunk's slices 2-3 are past the end
    spec = {
        "input": {"slabs": "slabs.npy", "labels": "labels.nii.gz", "labels_tsv": "labels.tsv",
                  "blood": "blood.tsv", "pet_json": "pet.json"},
        "output": {"maps": "out/chunk-1.npz", "fit_time": "out/chunk-1.tsv"},
        "params": {"chunks": 2, "slices": "all", "weights": "none", "sampling": "average"},
        "wildcards": {"method": "fast", "chunk": "1"},
        "log": "fit_chunk.log",
    }  # fmt: skip
    (tmp_path / "out").mkdir()
    res = run_script("fit_chunk", spec, tmp_path)
    log = (tmp_path / "fit_chunk.log").read_text()
    assert res.returncode == 1 and "Traceback" not in log + res.stderr, log
    assert log.strip().splitlines()[-1].startswith("ERROR: slabs.npy: truncated or corrupt")
    assert list((tmp_path / "out").iterdir()) == []


def test_predict_stops_on_an_all_zero_input_with_one_line(tmp_path):
    """An input function that is zero everywhere (a blood column of zeros): predict.py
    names the file in one line and writes no map, rather than maps of nothing."""
    import torch

    from kinpet.checkpoints import save_checkpoint
    from kinpet.frames import FrameSchedule
    from kinpet.inputfunction import InputFunction
    from kinpet.io import write_blood_tsv
    from kinpet.settings import TrainSettings
    from kinpet.training import build_model

    frames = FrameSchedule.paper()
    settings = TrainSettings()
    model = build_model(settings)  # untrained: the script stops before it predicts
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    save_checkpoint(tmp_path / "best.pt", model, optimizer, schedule, torch.Generator(), 0,
                    {"val_loss": 1.0, "epoch": 1}, settings)  # fmt: skip
    rng = np.random.default_rng(3)
    write_nifti(tmp_path / "pet.nii.gz", rng.random((8, 8, 4, len(frames)), np.float32), AFFINE)
    write_nifti(tmp_path / "labels.nii.gz", np.ones((8, 8, 4), np.int16), AFFINE, np.int16)
    (tmp_path / "pet.json").write_text(json.dumps(frames.to_bids()))
    zero = InputFunction(frames.mids_s, np.zeros(len(frames)))
    write_blood_tsv(tmp_path / "input_blood.tsv", zero)
    np.savez(tmp_path / "slices.npz", z=np.arange(4), crop=np.zeros(2, int))
    maps = [f"out/sub-01_desc-{name}_kinpar.nii.gz" for name in ("K1", "k2", "k3", "Vb", "Ki")]
    spec = {
        "input": {"checkpoint": "best.pt", "pet": "pet.nii.gz", "labels": "labels.nii.gz",
                  "blood": "input_blood.tsv", "pet_json": "pet.json", "slices": "slices.npz"},
        "output": {"maps": maps, "metrics": "out/slice_metrics.tsv"},
        "params": {"refine_steps": 0, "refine_learning_rate": None, "crop": [8, 8]},
        "log": "predict.log",
    }  # fmt: skip
    (tmp_path / "out").mkdir()
    res = run_script("predict", spec, tmp_path)
    log = (tmp_path / "predict.log").read_text()
    assert res.returncode == 1, res.stderr + log
    assert "Traceback" not in log + res.stderr, log
    last = log.strip().splitlines()[-1]
    assert last.startswith("ERROR: input_blood.tsv: the input function is zero everywhere"), log
    assert list((tmp_path / "out").iterdir()) == []


def test_binary_sidecars_are_named(tmp_path):
    from kinpet.frames import FrameSchedule, FrameScheduleError
    from kinpet.inputfunction import InputFunction, InputFunctionError

    pet_json = tmp_path / "sub-01_pet.json"
    pet_json.write_bytes(b"\xff\xfe\x00\x01binary")
    with pytest.raises(FrameScheduleError, match="sub-01_pet.json: not UTF-8 text"):
        FrameSchedule.from_bids_json(pet_json)
    blood = tmp_path / "sub-01_blood.tsv"
    blood.write_text("time\twhole_blood_radioactivity\n0\t0\n10\t5\n")
    blood.with_suffix(".json").write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    with pytest.raises(InputFunctionError, match="sub-01_blood.json: not UTF-8 text"):
        InputFunction.from_blood_tsv(blood)
    blood.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(InputFunctionError, match="sub-01_blood.tsv: cannot read as TSV"):
        InputFunction.from_blood_tsv(blood)
