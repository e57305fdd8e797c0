"""The phantom's image formation and its PET-BIDS files (docs/phantom.md).

Per subject (:func:`simulate_subject`):

1. the exact frame-averaged model (:mod:`kinpet.kinetics`) of every body voxel's
   parameters (:mod:`kinpet.phantom`), evaluated slab by slab along z, into a temporary
   float32 file ordered [t, z, y, x];
2. frame by frame: Gaussian PSF blur, then Gaussian noise with variance a C / (d dt)
   (d the mean decay factor of the frame, dt its length in minutes), with ``a`` set so that
   the coefficient of variation of the liver in the blurred reference frame (the last
   frame, 300 s in the paper's schedule) equals ``noise_cov``; negative values are clipped
   to 0 (see :func:`add_noise`).

Memory and scratch disk are checked before anything is written
(:func:`check_simulation_resources`).
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.ndimage import gaussian_filter

from kinpet.anatomy import LABEL_INDEX, LABELS
from kinpet.constants import F18_LAMBDA_PER_MIN, FWHM_TO_SIGMA
from kinpet.frames import FrameSchedule
from kinpet.kinetics import PARAMETER_NAMES, KineticModel, ki
from kinpet.motion import Breathing, breathing_profile, cardiac_blur, frame_average, heart_mask
from kinpet.organinput import INPUT_COLUMNS, INPUT_DESCRIPTIONS, organ_input_function
from kinpet.phantom import ARTERIAL, Subject, make_subject, subject_ids

# Re-exported ("as"): callers of the simulation find the resource check here too.
from kinpet.resources import SLAB_VOXELS, check_phantom_resources
from kinpet.resources import PhantomResourceError as PhantomResourceError
from kinpet.resources import available_memory as available_memory
from kinpet.resources import simulation_needs as simulation_needs

TRUTH_NAMES = (*PARAMETER_NAMES, "Ki")
# gzip level of the 4D image: noisy float32 barely compresses beyond level 1, which is
# several times faster than the default 9.
_GZIP_LEVEL = 1


# What each voxel's input was (kinpet.organinput), written beside the parameter truth.
INPUT_TRUTH_NAMES = ("delay", "dispersion", "arterialfraction", "portaltransit")


def write_input_truth(truth_dir: Path, sid: str, seen_inputs: np.ndarray, affine) -> None:
    """The maps of what input each voxel saw (``desc-delay_truth`` and the rest)."""
    from kinpet import io

    for name, column, values in zip(INPUT_TRUTH_NAMES, INPUT_COLUMNS, seen_inputs, strict=True):
        path = truth_dir / f"{sid}_desc-{name}_truth.nii.gz"
        io.write_nifti_zyx(path, values, affine)
        description = dict(INPUT_DESCRIPTIONS[column])
        description["Description"] += " 0 outside the body; blood sees the aortic input."
        io.write_json(
            path.with_name(path.name.replace(".nii.gz", ".json")),
            {**description, "Parameter": column},
        )


# -- noise ----------------------------------------------------------------------------------------


def decay_factors(frames: FrameSchedule) -> np.ndarray:
    """Mean F-18 decay factor over each frame, d = e^{-l ts} (1 - e^{-l dt}) / (l dt)."""
    lam = F18_LAMBDA_PER_MIN
    dt = frames.durations_min
    return np.exp(-lam * frames.starts_min) * -np.expm1(-lam * dt) / (lam * dt)


def noise_scale(noise_cov: float, reference_value: float, frames: FrameSchedule, frame: int):
    """The ``a`` of Var = a C / (d dt) that gives ``noise_cov`` at ``reference_value``.

    Parameters
    ----------
    noise_cov : float
        Target coefficient of variation (e.g. 0.10).
    reference_value : float
        Mean activity (kBq/ml) of the reference region (the liver) in the reference frame.
    frames : FrameSchedule
    frame : int
        Index of the reference frame.

    Returns
    -------
    float, in kBq/ml min.
    """
    d_dt = decay_factors(frames)[frame] * frames.durations_min[frame]
    return noise_cov**2 * reference_value * d_dt


def noise_variance(image: np.ndarray, a: float, frames: FrameSchedule, frame: int):
    """Var = a C / (d dt) of one frame's image (kBq/ml)^2; negative C counts as 0."""
    d_dt = decay_factors(frames)[frame] * frames.durations_min[frame]
    return a * np.maximum(image, 0.0) / d_dt


def add_noise(image, a, frames, frame, rng: np.random.Generator) -> np.ndarray:
    """Add Gaussian noise of variance :func:`noise_variance` and clip negatives to 0.

    Reconstructed images do contain negative values, but PET-BIDS readers (and the
    pipeline's) reject them; clipping biases the mean upwards only where the coefficient
    of variation is large (short early frames in low-uptake tissue, the blurred edge of the
    body). Outside the blurred body C = 0, so the background stays exactly 0.
    """
    sd = np.sqrt(noise_variance(image, a, frames, frame)).astype(np.float32)
    noisy = image + sd * rng.standard_normal(image.shape, dtype=np.float32)
    return np.maximum(noisy, 0.0, out=noisy)


def blur(image: np.ndarray, fwhm_mm: float, voxel_mm: float) -> np.ndarray:
    """Isotropic Gaussian PSF of ``fwhm_mm`` (0: none); zero outside the field of view."""
    if fwhm_mm <= 0:
        return image
    return gaussian_filter(image, sigma=fwhm_mm * FWHM_TO_SIGMA / voxel_mm, mode="constant")


# -- simulation ----------------------------------------------------------------------------------


# -- resources ------------------------------------------------------------------------------------


def check_simulation_resources(
    subject: Subject, n_frames: int, root, setting: str = "voxel_mm", memory=None
) -> None:
    """Refuse a simulation that cannot fit, before anything is computed or written.

    :func:`kinpet.resources.check_phantom_resources` on the subject's size and voxel size;
    the Snakefile runs that check too, on the config, before it plans a job.

    Parameters
    ----------
    subject : Subject
    n_frames : int
    root : path-like
        The dataset folder the subject is written to (its file system must hold the
        scratch file).
    setting : str
        How the voxel size is named in the message (``config phantom.voxel_mm``).
    memory : int, optional
        Bytes available (default: :func:`kinpet.resources.available_memory`).

    Raises
    ------
    PhantomResourceError
        Naming the setting and its value, the grid, the estimate and what is available.
    """
    check_phantom_resources(
        subject.size, subject.grid.voxel_mm, n_frames, root, subject.subject_id, setting, memory
    )


def check_noise_reference(subject: Subject, noise_cov: float) -> None:
    """Refuse noise on an anatomy without a liver, where ``noise_cov`` sets the noise level.

    The procedural body always has one; a label map may not.
    """
    from kinpet.io import KinpetInputError

    if noise_cov > 0 and subject.label_map is not None:
        if not (subject.label_map == LABEL_INDEX["liver"]).any():
            raise KinpetInputError(
                f"{subject.anatomy}: the label map has no liver, whose coefficient of "
                "variation in the last frame sets the noise (noise_cov); set noise_cov to 0 "
                "or use a label map with the liver"
            )


def check_motion_anatomy(subject: Subject, motion: Breathing | None) -> None:
    """Refuse motion on a label map that lacks what places it, before the model pass:
    breathing needs the lungs, the liver and the kidneys (:func:`kinpet.motion.
    breathing_profile`), the cardiac blur the heart. The procedural body has them all."""
    from kinpet.io import KinpetInputError

    if motion is None or motion.is_still or subject.label_map is None:
        return
    needed = {
        **(
            {"lungs": "breathing", "liver": "breathing", "kidneys": "breathing"}
            if motion.breathes
            else {}
        ),
        **({"heart": "the cardiac blur"} if motion.cardiac_fwhm_mm > 0 else {}),
    }
    present = set(np.unique(subject.label_map).tolist())
    missing = [name for name in needed if LABEL_INDEX[name] not in present]
    if missing:
        uses = sorted({needed[name] for name in missing})
        raise KinpetInputError(
            f"{subject.anatomy}: the label map has no {', '.join(missing)}, which "
            f"{' and '.join(uses)} (phantom.motion) needs; set its amplitudes or "
            "cardiac_fwhm_mm to 0, or use a label map with them"
        )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def simulate_subject(
    subject: Subject,
    root,
    frames: FrameSchedule | None = None,
    fwhm_mm: float = 4.0,
    noise_cov: float = 0.10,
    log=_log,
    threads: int = 1,
    motion: Breathing | None = None,
) -> dict:
    """Simulate one subject and write its PET-BIDS files under ``root`` (see README).

    Memory stays bounded for any body size: the noise-free model is written slab by slab to
    a temporary [t, z, y, x] float32 file beside the output (about 4 bytes x voxels x
    frames on disk), then every frame is read back, blurred, made noisy and streamed into
    the gzipped NIfTI.

    ``threads`` sets torch's threads for the model while this runs: one per job is fastest
    when jobs run side by side (torch's thread pool spins when cores are busy).

    ``motion`` (:class:`kinpet.motion.Breathing`) moves the thorax and upper abdomen in each
    frame, averaged within the frame, before the blur and the noise; ``None`` or zero
    amplitudes: no motion (the same bytes as without the argument).

    Returns
    -------
    dict
        Summary: shape, voxels, noise scale ``a``, reference value, timings (s).

    Raises
    ------
    PhantomResourceError
        Before anything is written, when the grid would not fit in memory or its scratch
        file on disk (:func:`check_simulation_resources`).
    """
    frames = FrameSchedule.paper() if frames is None else frames
    check_simulation_resources(subject, len(frames), root)
    check_noise_reference(subject, noise_cov)
    check_motion_anatomy(subject, motion)
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        return _simulate_subject(subject, root, frames, fwhm_mm, noise_cov, log, motion)
    finally:
        torch.set_num_threads(previous)


def _simulate_subject(subject, root, frames, fwhm_mm, noise_cov, log, motion=None) -> dict:
    from kinpet import io

    frames = FrameSchedule.paper() if frames is None else frames
    root = Path(root)
    sid = subject.subject_id
    grid = subject.grid
    nx, ny, nz = grid.shape
    nt = len(frames)
    t_start = time.perf_counter()
    pet_dir = root / sid / "pet"
    label_dir = root / "derivatives" / "labels" / sid
    truth_dir = root / "derivatives" / "truth" / sid
    for d in (pet_dir, label_dir, truth_dir):
        d.mkdir(parents=True, exist_ok=True)

    inp = subject.input_function(frames)
    models = {ARTERIAL: KineticModel(inp, frames, sampling="average")}
    reference_frame = nt - 1
    slab = max(1, SLAB_VOXELS // (nx * ny))
    labels = np.zeros((nz, ny, nx), dtype=np.int16)
    truth = np.zeros((5, nz, ny, nx), dtype=np.float32)
    seen_inputs = np.zeros((len(INPUT_TRUTH_NAMES), nz, ny, nx), dtype=np.float32)
    frame_bytes = nx * ny * nz * 4
    log(
        f"{sid}: grid {nx} x {ny} x {nz} voxels of {grid.voxel_mm} mm, {nt} frames, "
        f"input peak {subject.input_peak_kbq_per_ml:.1f} kBq/ml, "
        f"delay {subject.input_delay_s:.1f} s"
    )
    with tempfile.TemporaryFile(dir=pet_dir) as clean:
        # Reserve the whole file so slabs can be written at their offsets.
        clean.truncate(frame_bytes * nt)
        for z0 in range(0, nz, slab):
            z1 = min(nz, z0 + slab)
            lab = subject.labels((z0, z1))
            labels[z0:z1] = lab
            index, params, true_params = subject.voxel_parameters(lab, z0)
            tac = np.zeros((nt, lab.size), dtype=np.float32)
            seen = seen_inputs[:, z0:z1].reshape(len(INPUT_TRUTH_NAMES), -1)
            for organ_input, sel in subject.input_groups(lab.ravel()[index]):
                if organ_input not in models:
                    models[organ_input] = KineticModel(
                        organ_input_function(inp, organ_input), frames, sampling="average"
                    )
                tac[:, index[sel]] = models[organ_input](params[sel]).T
                seen[:, index[sel]] = np.array(astuple(organ_input), dtype=np.float32)[:, None]
            t = truth[:, z0:z1].reshape(5, -1)
            t[:4, index] = true_params.T
            with np.errstate(invalid="ignore", divide="ignore"):
                t[4, index] = ki(true_params)  # 0/0 for blood and bladder: set to 0 below
            for f in range(nt):
                clean.seek(f * frame_bytes + z0 * ny * nx * 4)
                clean.write(tac[f].tobytes())
            log(f"{sid}: model slices {z0}-{z1 - 1} of {nz} ({index.size} body voxels)")
        t_model = time.perf_counter() - t_start
        moving = motion is not None and not motion.is_still
        breathes = moving and motion.breathes
        profile = breathing_profile(labels, grid.axis(2), subject.anatomy) if breathes else None
        heart = heart_mask(labels) if moving and motion.cardiac_fwhm_mm > 0 else None

        def form(image, f):
            """Motion (averaged over the frame: breathing, then the heartbeat), then the PSF."""
            if breathes:
                start = frames.starts_s[f]
                image = frame_average(
                    image, start, start + frames.durations_s[f], motion, profile, grid.voxel_mm
                )
            if heart is not None:
                image = cardiac_blur(image, heart, motion.cardiac_fwhm_mm, grid.voxel_mm)
            return blur(image, fwhm_mm, grid.voxel_mm)

        # Blood voxels have K1 = k2 = k3 = 0 in the truth, so Ki = 0 (not NaN).
        np.nan_to_num(truth[4], copy=False)
        # The reference is the liver's mean in the blurred reference frame: the image the
        # noise is added to, so the liver's CoV there is noise_cov.
        clean.seek(reference_frame * frame_bytes)
        image = np.frombuffer(clean.read(frame_bytes), dtype=np.float32).reshape(nz, ny, nx)
        liver = labels == LABEL_INDEX["liver"]
        image = form(image, reference_frame)
        reference = float(image[liver].astype(np.float64).mean()) if liver.any() else 0.0
        a = noise_scale(noise_cov, reference, frames, reference_frame) if noise_cov > 0 else 0.0
        log(f"{sid}: liver in the reference frame {reference:.3f} kBq/ml, noise a = {a:.5g}")
        header = io.nifti_header(grid.shape + (nt,), grid.affine, np.float32, frames)
        with io.NiftiFrameWriter(pet_dir / f"{sid}_pet.nii.gz", header) as writer:
            for f in range(nt):
                clean.seek(f * frame_bytes)
                image = np.frombuffer(clean.read(frame_bytes), dtype=np.float32)
                image = form(image.reshape(nz, ny, nx), f)
                if a > 0:
                    rng = np.random.default_rng([subject.seed, subject.number, 1, f])
                    image = add_noise(image, a, frames, f, rng)
                writer.write(image)
                if f % 10 == 9 or f == nt - 1:
                    log(f"{sid}: wrote frame {f + 1} of {nt}")
    t_frames = time.perf_counter() - t_start - t_model

    io.write_nifti_zyx(label_dir / f"{sid}_dseg.nii.gz", labels, grid.affine)
    io.write_label_table(label_dir / f"{sid}_dseg.tsv", LABELS)
    truth_notes = (
        "True parameter of the irreversible two-tissue model used to simulate the image. "
        "Aorta and heart blood pools are blood: Vb = 1, K1 = k2 = k3 = Ki = 0. The bladder "
        "is not a 2TC voxel (excreted tracer, C = clearance x integral of the input): all its "
        "values are 0. Background (outside the body) is 0."
    )
    units = dict(zip(TRUTH_NAMES, ("mL/cm3/min", "1/min", "1/min", "1", "mL/cm3/min"), strict=True))
    for i, name in enumerate(TRUTH_NAMES):
        path = truth_dir / f"{sid}_desc-{name}_truth.nii.gz"
        io.write_nifti_zyx(path, truth[i], grid.affine)
        io.write_json(
            path.with_name(path.name.replace(".nii.gz", ".json")),
            {"Description": truth_notes, "Parameter": name, "Units": units[name]},
        )
    write_input_truth(truth_dir, sid, seen_inputs, grid.affine)
    rows = [
        (n, *subject.organ_params[n], *astuple(subject.organ_input(n)))
        for n in sorted(subject.organ_params)
    ]
    table = pd.DataFrame(rows, columns=["organ", *PARAMETER_NAMES, *INPUT_COLUMNS])
    io.write_tsv(truth_dir / f"{sid}_organs.tsv", table)
    # The maps differ from these means: each organ gets a smooth within-organ field and
    # every voxel is clipped to the paper's bounds (liver k3 ~0.003 -> 0.01, for instance).
    described = (
        "This subject's mean of the parameter in the organ, before the within-organ field and "
        "before the per-voxel clip to the paper's bounds that the truth maps (desc-*_truth) "
        "hold; average a truth map over the organ's labels to compare with a fit."
    )
    io.write_json(
        truth_dir / f"{sid}_organs.json",
        {
            "organ": {"Description": "Organ name, as in the label table (dseg.tsv)."},
            **{n: {"Description": described, "Units": units[n]} for n in PARAMETER_NAMES},
            **INPUT_DESCRIPTIONS,
        },
    )
    io.write_blood_tsv(
        pet_dir / f"{sid}_recording-idif_blood.tsv",
        inp,
        description=(
            f"True input function of the kinpet phantom: Feng et al. 1993 model 2, peak "
            f"{subject.input_peak_kbq_per_ml:.3f} kBq/mL, delay {subject.input_delay_s:.3f} s"
        ),
    )
    sidecar = pet_sidecar(frames, subject, fwhm_mm, noise_cov, a, reference_frame, reference)
    if moving:
        sidecar["PhantomRespiratoryMotion"] = {
            "AmplitudeZmm": motion.amplitude_z_mm,
            "AmplitudeYmm": motion.amplitude_y_mm,
            "PeriodSeconds": motion.period_s,
            "PhaseBins": motion.bins,
            "CardiacBlurFWHMmm": motion.cardiac_fwhm_mm,
            "Description": "Rigid-plus-stretch displacement of the thorax and upper abdomen, "
            "averaged within each frame, and the heart's activity spread by a Gaussian "
            "(CardiacBlurFWHMmm, 0: none); labels and truth are at end-exhale (kinpet.motion).",
        }
    io.write_json(pet_dir / f"{sid}_pet.json", sidecar)
    elapsed = time.perf_counter() - t_start
    log(f"{sid}: done in {elapsed:.1f} s (model {t_model:.1f} s, frames {t_frames:.1f} s)")
    return {
        "shape": grid.shape + (nt,),
        "body_voxels": int((labels > 0).sum()),
        "noise_a": a,
        "reference_kbq_per_ml": reference,
        "seconds": elapsed,
    }


def pet_sidecar(frames, subject, fwhm_mm, noise_cov, a, reference_frame, reference) -> dict:
    """The ``_pet.json`` of a phantom subject (PET-BIDS fields and the phantom's settings)."""
    return {
        "Manufacturer": "kinpet digital phantom",
        "Modality": "PT",
        "TracerName": "FDG",
        "TracerRadionuclide": "F18",
        "Units": "kBq/mL",
        "TimeZero": "00:00:00",
        "InjectionStart": 0,
        "ScanStart": 0,
        "ImageDecayCorrected": True,
        "ImageDecayCorrectionTime": 0,
        **frames.to_bids(),
        "ReconFilterType": "Gaussian" if fwhm_mm > 0 else "none",
        "ReconFilterSize": float(fwhm_mm),
        "ImageVoxelSize": [subject.grid.voxel_mm] * 3,
        "PhantomSeed": subject.seed,
        "PhantomSize": subject.size.name,
        "PhantomNoiseModel": (
            "Gaussian, Var = a*C/(d*dt): C the blurred noise-free frame (kBq/mL), dt the "
            "frame duration (min), d the mean F-18 decay factor over the frame; a set so that "
            "the liver's coefficient of variation in the reference frame is PhantomNoiseCoV; "
            "negative values clipped to 0"
        ),
        "PhantomNoiseCoV": float(noise_cov),
        "PhantomNoiseScaleA": float(a),
        "PhantomNoiseReferenceFrame": int(reference_frame),
        "PhantomNoiseReferenceValue": float(reference),
        "PhantomPSFFWHM": float(fwhm_mm),
        "PhantomInputPeak": subject.input_peak_kbq_per_ml,
        "PhantomInputDelay": subject.input_delay_s,
        "PhantomBladderClearance": subject.bladder_clearance_per_min,
        # Only for a label map's anatomy: the procedural phantom's sidecar stays as it was.
        **({} if subject.label_map is None else {"PhantomAnatomy": subject.anatomy}),
    }


def dataset_description() -> dict:
    """``dataset_description.json`` of a phantom dataset."""
    return {
        "Name": "kinpet whole-body dynamic FDG digital phantom",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "kinpet", "Description": "kinpet.phantom"}],
    }


def write_dataset(
    root,
    subjects,
    seed=0,
    size="demo",
    organ_values=None,
    frames=None,
    voxel_mm=1.6,
    fwhm_mm=4.0,
    noise_cov=0.10,
    log=_log,
    threads=1,
    anatomy=None,
    **draw,
) -> list:
    """Simulate several subjects and the dataset-level files (a convenience for the CLI).

    ``anatomy``: a :class:`kinpet.labelmap.LabelAnatomy` every subject shares, or None
    for the procedural body of ``size``.
    """
    from kinpet import io

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    io.write_json(root / "dataset_description.json", dataset_description())
    out = []
    for sid in subject_ids(subjects):
        subject = make_subject(sid, seed, size, organ_values, voxel_mm, anatomy=anatomy, **draw)
        out.append(simulate_subject(subject, root, frames, fwhm_mm, noise_cov, log, threads))
    return out
