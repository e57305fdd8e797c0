"""The Snakemake pipeline: dry run, lint and a tiny end-to-end run into a temporary folder."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import read_organ_values
from kinpet.kinetics import PARAMETER_NAMES, irreversible_2tc

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def snakemake(*args, cwd):
    return subprocess.run([SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A copy of the workflow files, so that runs never touch the checkout's results/."""
    work = tmp_path_factory.mktemp("pipeline")
    for name in ("Snakefile", "workflow", "config", "envs", "src", "tests/config"):
        src = ROOT / name
        dst = work / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    return work


def test_dry_run_of_default_config(workdir):
    res = snakemake("-n", "--cores", "1", cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert "organ_curves" in res.stdout


def test_invalid_config_is_rejected(workdir):
    res = snakemake("-n", "--cores", "1", "--config", "sampling=start", cwd=workdir)
    assert res.returncode != 0
    assert "sampling" in res.stderr + res.stdout


def test_tiny_end_to_end_run(workdir):
    res = snakemake("--cores", "2", "--configfile", "tests/config/tiny.yaml", cwd=workdir)
    assert res.returncode == 0, res.stderr[-3000:]
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
    # The phantom: two tiny subjects as PET-BIDS and its figure.
    bids = workdir / "results/bids"
    assert (bids / "dataset_description.json").exists()
    for sid in ("sub-01", "sub-02"):
        assert (bids / sid / "pet" / f"{sid}_pet.nii.gz").stat().st_size > 100_000
        assert (bids / "derivatives/truth" / sid / f"{sid}_desc-Ki_truth.nii.gz").exists()
    png = workdir / "results/figures/phantom_coronal.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
