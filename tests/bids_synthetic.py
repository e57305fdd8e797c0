"""A small synthetic PET-BIDS dataset for the tests: geometric organs, model activity.

The organs are ellipsoids and cylinders in millimetres around the image centre, painted
on a canonical LPS grid (x towards the left, y posterior, z towards the head), then
written in any orientation. Each organ's activity is the exact frame-averaged model
curve of its parameters (kinpet.kinetics), so the aorta (Vb = 1) holds exactly the frame
averages of the input function: an independent reference for the image-derived input.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import irreversible_2tc

NAMES = (
    "background body bones lungs heart liver kidneys spleen aorta heart_blood gallbladder "
    "bladder tumour"
).split()

# K1, k2, k3, Vb per painted label (docs/phantom.md; bladder: accumulating).
PARAMS = {
    "body": (0.08, 0.5, 0.03, 0.03),
    "bones": (0.11, 0.64, 0.025, 0.003),
    "lungs": (0.23, 1.5, 0.012, 0.09),
    "heart": (0.6, 1.2, 0.1, 0.05),
    "liver": (0.65, 0.68, 0.0035, 0.01),
    "kidneys": (0.79, 0.67, 0.008, 0.08),
    "spleen": (1.5, 2.7, 0.007, 0.04),
    "aorta": (0.0, 1.0, 0.0, 1.0),  # Vb = 1: the frame averages of the input
    "bladder": (0.3, 0.05, 0.5, 0.0),
}

FRAMES = FrameSchedule.from_durations([10, 20, 30, 60, 120, 300])


def input_function(end_s: float = FRAMES.end_s) -> InputFunction:
    return InputFunction.feng(peak_kbq_per_ml=200.0, delay_s=8.0, end_s=end_s)


def phantom_labels(shape, voxel_mm: float) -> np.ndarray:
    """Label map [x, y, z] on a canonical LPS grid (phantom indices, see NAMES)."""
    extent = np.asarray(shape) * voxel_mm
    axes = [(np.arange(n) - (n - 1) / 2) * voxel_mm for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    lx, ly, lz = extent
    labels = np.zeros(shape, dtype=np.int16)

    def ellipsoid(cx, cy, cz, rx, ry, rz):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1

    def paint(name, mask):
        labels[mask] = NAMES.index(name)

    body = ((x / (0.44 * lx)) ** 2 + (y / (0.42 * ly)) ** 2 <= 1) & (np.abs(z) <= 0.45 * lz)
    paint("body", body)
    paint("bones", ((x**2 + (y - 0.28 * ly) ** 2) <= (0.07 * ly) ** 2) & body)
    for side in (-1, 1):
        paint("lungs", ellipsoid(side * 0.2 * lx, 0, 0.25 * lz, 0.13 * lx, 0.25 * ly, 0.13 * lz))
        paint(
            "kidneys",
            ellipsoid(side * 0.2 * lx, 0.2 * ly, -0.05 * lz, 0.06 * lx, 0.1 * ly, 0.06 * lz),
        )
    paint("heart", ellipsoid(0.05 * lx, -0.1 * ly, 0.16 * lz, 0.1 * lx, 0.15 * ly, 0.06 * lz))
    paint("liver", ellipsoid(-0.18 * lx, 0, 0.04 * lz, 0.16 * lx, 0.25 * ly, 0.08 * lz))
    paint("spleen", ellipsoid(0.22 * lx, 0.1 * ly, 0.05 * lz, 0.07 * lx, 0.1 * ly, 0.05 * lz))
    aorta = ((x - 0.04 * lx) ** 2 + (y - 0.12 * ly) ** 2 <= (0.07 * ly) ** 2) & (
        np.abs(z + 0.02 * lz) <= 0.2 * lz
    )
    paint("aorta", aorta)
    paint("bladder", ellipsoid(0, -0.1 * ly, -0.33 * lz, 0.1 * lx, 0.15 * ly, 0.05 * lz))
    return labels


def phantom_activity(labels: np.ndarray, frames=FRAMES, inp=None) -> np.ndarray:
    """Activity [x, y, z, t] in kBq/ml: each organ's model curve, 0 in the background."""
    inp = inp or input_function(frames.end_s)
    pet = np.zeros((*labels.shape, len(frames)), dtype=np.float32)
    for name, params in PARAMS.items():
        pet[labels == NAMES.index(name)] = irreversible_2tc(np.array(params), inp, frames)
    return pet


def lps_affine(shape, voxel_mm: float, origin_lps=(0.0, 0.0, 0.0)) -> np.ndarray:
    """RAS+ affine of a canonical LPS grid whose centre sits at ``origin_lps`` (mm)."""
    affine = np.diag([-voxel_mm, -voxel_mm, voxel_mm, 1.0])
    centre = (np.asarray(shape) - 1) / 2 * voxel_mm
    affine[:3, 3] = np.diag([-1, -1, 1]) @ (np.asarray(origin_lps) - centre)
    return affine


def reorient(data: np.ndarray, affine: np.ndarray, axcodes):
    """Data and affine of the same image stored in another orientation (world unchanged)."""
    image = nib.Nifti1Image(data, affine)
    target = nib.orientations.axcodes2ornt(axcodes)
    transform = nib.orientations.ornt_transform(nib.io_orientation(affine), target)
    out = image.as_reoriented(transform)
    return np.asarray(out.dataobj), out.affine


def write_subject(
    root,
    subject: str = "sub-01",
    shape=(40, 32, 72),
    voxel_mm: float = 4.0,
    axcodes=("L", "P", "S"),
    units: str = "kBq/mL",
    frames: FrameSchedule = FRAMES,
    blood_units: str = "kBq/mL",
    scale: float = 1.0,
) -> dict:
    """Write one synthetic subject in the dataset layout; return its arrays (LPS, kBq/ml).

    ``scale`` multiplies the activity (a per-subject variation).
    """
    root = Path(root)
    from kinpet.bids import bids_paths
    from kinpet.inputfunction import units_to_kbq_per_ml

    paths = bids_paths(root, subject)
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    labels = phantom_labels(shape, voxel_mm)
    inp = input_function(frames.end_s)
    pet = phantom_activity(labels, frames, inp) * np.float32(scale)
    affine = lps_affine(shape, voxel_mm, origin_lps=(3.0, -7.0, 800.0))

    stored = (pet / np.float32(units_to_kbq_per_ml(units))).astype(np.float32)
    pet_out, out_affine = reorient(stored, affine, axcodes)
    lab_out, _ = reorient(labels, affine, axcodes)
    nib.save(nib.Nifti1Image(pet_out, out_affine), paths["pet"])
    nib.save(nib.Nifti1Image(lab_out.astype(np.int16), out_affine), paths["dseg"])
    sidecar = {
        **frames.to_bids(),
        "Units": units,
        "TracerName": "FDG",
        "ImageDecayCorrected": True,
        "ImageDecayCorrectionTime": 0,
    }
    paths["pet_json"].write_text(json.dumps(sidecar, indent=2))
    pd.DataFrame({"index": range(len(NAMES)), "name": NAMES}).to_csv(
        paths["dseg_tsv"], sep="\t", index=False
    )
    blood_factor = units_to_kbq_per_ml(blood_units)
    pd.DataFrame(
        {
            "time": inp.times_s,
            "whole_blood_radioactivity": inp.values * scale / blood_factor,
        }
    ).to_csv(paths["blood"], sep="\t", index=False)
    paths["blood"].with_suffix(".json").write_text(
        json.dumps(
            {
                "WholeBloodAvail": True,
                "PlasmaAvail": False,
                "time": {"Units": "s"},
                "whole_blood_radioactivity": {"Units": blood_units},
            }
        )
    )
    return {
        "pet": pet,
        "labels": labels,
        "affine": affine,
        "input": InputFunction(inp.times_s, inp.values * scale),
        "paths": paths,
    }
