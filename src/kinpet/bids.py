"""Reading PET-BIDS datasets: one subject's dynamic PET, its sidecar, blood recording and
label map, validated, with errors that name the file (README: "Your own data")."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction, units_to_kbq_per_ml
from kinpet.io import NEGATIVE_TOLERANCE, KinpetInputError, _naming_corrupt_file, read_label_table
from kinpet.readers import read_json

# Voxel-to-world affines of the PET and the label map may differ by float32 rounding (mm).
_AFFINE_TOLERANCE_MM = 1e-3

PET_REQUIRED_FIELDS = ("FrameTimesStart", "FrameDuration", "Units")


def bids_paths(root, subject: str, blood_recording: str = "idif") -> dict[str, Path]:
    """The files of one subject in a PET-BIDS dataset (see the README's layout).

    Parameters
    ----------
    root : path-like
        The dataset folder (holding ``sub-XX/`` and ``derivatives/``).
    subject : str
        Subject folder name with its prefix, e.g. ``"sub-01"``.
    blood_recording : str
        The ``<label>`` of ``sub-XX_recording-<label>_blood.tsv``.
    """
    root = Path(root)
    pet = root / subject / "pet"
    labels = root / "derivatives" / "labels" / subject
    return {
        "pet": pet / f"{subject}_pet.nii.gz",
        "pet_json": pet / f"{subject}_pet.json",
        "blood": pet / f"{subject}_recording-{blood_recording}_blood.tsv",
        "dseg": labels / f"{subject}_dseg.nii.gz",
        "dseg_tsv": labels / f"{subject}_dseg.tsv",
    }


@dataclass(eq=False)
class PetStudy:
    """One subject's dynamic PET study, read and validated by :func:`read_pet_bids`.

    Attributes
    ----------
    subject : str
    pet_path : Path
    image : nibabel.Nifti1Image
        The 4-D image as stored (native orientation, stored units); use :meth:`frame`.
    affine : ndarray, shape (4, 4)
        Voxel-to-world (RAS+, mm) affine of the image and of the labels.
    frames : FrameSchedule
        Times in seconds after the injection (the sidecar's times minus InjectionStart).
    units : str
        The sidecar's Units.
    unit_factor : float
        Factor from ``units`` to kBq/ml.
    input_function : InputFunction or None
        In kBq/ml; from the blood recording or the aorta (None if not asked for).
    labels : ndarray, shape (x, y, z), int
        Label map on the PET grid (native orientation).
    label_names : dict
        Label name -> value, from ``_dseg.tsv``.
    sidecar : dict
        The whole ``_pet.json``.
    """

    subject: str
    pet_path: Path
    image: nib.Nifti1Image
    affine: np.ndarray
    frames: FrameSchedule
    units: str
    unit_factor: float
    input_function: InputFunction | None
    labels: np.ndarray
    label_names: dict
    sidecar: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the 4-D image ``(x, y, z, t)``."""
        return tuple(self.image.shape)

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as a float32 array ``[x, y, z]`` in kBq/ml (native orientation).

        Frames are read one at a time, so that whole-body images need not fit in memory;
        read them in order (gzip files are read forward).
        """
        with _naming_corrupt_file(self.pet_path, f"reading frame {index}"):
            data = np.asarray(self.image.dataobj[..., index], dtype=np.float32)
        return data * np.float32(self.unit_factor)

    def iter_frames(self):
        """All frames in order, as :meth:`frame` gives them."""
        for index in range(len(self.frames)):
            yield self.frame(index)


def _load_nifti(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise KinpetInputError(f"{path}: file not found")
    try:
        # keep_file_open: frames read in order do not decompress the file from the start.
        return nib.load(path, keep_file_open=True)
    except Exception as err:  # noqa: BLE001 - nibabel raises many error types
        raise KinpetInputError(f"{path}: cannot read as NIfTI ({err})") from None


def read_labels(
    dseg_path, tsv_path, required=(), reasons=None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a label map and its names; check that every value is named.

    Parameters
    ----------
    dseg_path, tsv_path : path-like
        ``_dseg.nii.gz`` (integer labels) and ``_dseg.tsv`` (index, name).
    required : sequence of str
        Label names that must be in the table and have voxels.
    reasons : dict, optional
        Label name -> text that ends the error when it is missing (why it is needed).

    Returns
    -------
    labels : ndarray (x, y, z) int32
    affine : ndarray (4, 4)
    names : dict name -> index
    """
    dseg_path = Path(dseg_path)
    names = read_label_table(tsv_path)
    image = _load_nifti(dseg_path)
    if len(image.shape) != 3:
        raise KinpetInputError(f"{dseg_path}: a label map must be 3-D, got shape {image.shape}")
    with _naming_corrupt_file(dseg_path):
        data = np.asarray(image.dataobj)
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise KinpetInputError(f"{dseg_path}: label values must be integers")
    labels = data.astype(np.int32)
    unnamed = sorted(set(np.unique(labels).tolist()) - set(names.values()))
    if unnamed:
        raise KinpetInputError(
            f"{dseg_path}: label value(s) {', '.join(map(str, unnamed))} are not listed in "
            f"{Path(tsv_path).name}"
        )
    reasons = reasons or {}
    for name in required:
        why = reasons.get(name, "")
        if name not in names:
            raise KinpetInputError(
                f"{tsv_path}: no label named {name!r} (labels: {', '.join(names)}){why}"
            )
        if not np.any(labels == names[name]):
            raise KinpetInputError(
                f"{dseg_path}: label {name!r} ({names[name]}) has no voxels{why}"
            )
    return labels, image.affine, names


def read_pet_bids(
    root,
    subject: str,
    input_function: str | None = "blood",
    blood_recording: str = "idif",
    blood_column: str = "whole_blood",
    required_labels=("lungs", "bladder"),
    negative_tolerance: float = NEGATIVE_TOLERANCE,
    label_reasons=None,
) -> PetStudy:
    """Read and validate one subject of a PET-BIDS dataset.

    Parameters
    ----------
    root : path-like
        Dataset folder (layout in the README, section "Your own PET-BIDS data").
    subject : str
        e.g. ``"sub-01"``.
    input_function : {"blood", "aorta", None}
        ``"blood"``: the blood recording ``sub-XX_recording-<blood_recording>_blood.tsv``;
        ``"aorta"``: the mean of the aorta label per frame at frame mid-times (the paper's
        image-derived input); None: no input function.
    blood_recording : str
        Label of the blood recording.
    blood_column : {"whole_blood", "plasma"}
        Which curve of the recording.
    required_labels : sequence of str
        Label names that must exist with voxels (``"aorta"`` is added for an
        image-derived input).
    negative_tolerance : float
        Reject the image when its minimum is below ``-negative_tolerance`` times its
        maximum; smaller negative values are kept.
    label_reasons : dict, optional
        Label name -> why it is required, to end the error when it is missing
        (:func:`kinpet.preprocessing.slice_range_labels`).

    Returns
    -------
    PetStudy

    Raises
    ------
    KinpetInputError
        Naming the file and the problem: a missing file or sidecar field, unknown units,
        a frame count that differs between the image and the sidecar, NaN, infinite or
        strongly negative image values, a label map on another grid, unnamed or missing
        labels, an input function that does not cover the scan.
    """
    if input_function not in ("blood", "aorta", None):
        raise ValueError(f"input_function must be 'blood', 'aorta' or None, not {input_function!r}")
    paths = bids_paths(root, subject, blood_recording)
    for key in ("pet", "pet_json", "dseg", "dseg_tsv") + (
        ("blood",) if input_function == "blood" else ()
    ):
        if not paths[key].exists():
            raise KinpetInputError(f"{paths[key]}: file not found")

    # Sidecar: frames and units.
    sidecar = read_json(paths["pet_json"])
    missing = [k for k in PET_REQUIRED_FIELDS if k not in sidecar]
    if missing:
        raise KinpetInputError(
            f"{paths['pet_json']}: missing PET-BIDS field(s) {', '.join(missing)}"
        )
    decay_corrected = sidecar.get("ImageDecayCorrected", True)
    if not isinstance(decay_corrected, bool):
        # A string "false" is truthy: read as given it would pass as decay corrected.
        raise KinpetInputError(
            f"{paths['pet_json']}: ImageDecayCorrected must be a JSON boolean (true or "
            f"false), not {decay_corrected!r}"
        )
    if decay_corrected is False:
        raise KinpetInputError(
            f"{paths['pet_json']}: ImageDecayCorrected is false; the kinetic model needs "
            "decay-corrected images"
        )
    # PET-BIDS times count from TimeZero; the kinetic model counts from the injection.
    injection_s = sidecar.get("InjectionStart", 0.0)
    if not isinstance(injection_s, int | float) or not np.isfinite(injection_s):
        raise KinpetInputError(f"{paths['pet_json']}: InjectionStart must be a number (s)")
    try:
        frames = FrameSchedule.from_bids_json(paths["pet_json"])
        if injection_s != 0:
            frames = FrameSchedule(
                frames.starts_s - injection_s, frames.durations_s, source=frames.source
            )
        unit_factor = units_to_kbq_per_ml(str(sidecar["Units"]), source=str(paths["pet_json"]))
    except ValueError as err:
        raise KinpetInputError(str(err)) from None

    # Image: 4-D, one volume per frame.
    image = _load_nifti(paths["pet"])
    if len(image.shape) != 4:
        raise KinpetInputError(
            f"{paths['pet']}: expected a 4-D image (x, y, z, frames), got shape {image.shape}"
        )
    if image.shape[3] != len(frames):
        raise KinpetInputError(
            f"{paths['pet']}: the image has {image.shape[3]} frames but "
            f"{paths['pet_json'].name} lists {len(frames)}"
        )

    # Labels on the same grid.
    required = tuple(required_labels) + (("aorta",) if input_function == "aorta" else ())
    labels, label_affine, names = read_labels(
        paths["dseg"], paths["dseg_tsv"], required, label_reasons
    )
    if labels.shape != image.shape[:3]:
        raise KinpetInputError(
            f"{paths['dseg']}: label map shape {labels.shape} differs from the PET grid "
            f"{image.shape[:3]} of {paths['pet'].name}"
        )
    if not np.allclose(label_affine, image.affine, rtol=0, atol=_AFFINE_TOLERANCE_MM):
        raise KinpetInputError(
            f"{paths['dseg']}: label map affine differs from the PET affine of "
            f"{paths['pet'].name} (the labels must be on the PET grid)\n"
            f"labels:\n{np.round(label_affine, 4)}\nPET:\n{np.round(image.affine, 4)}"
        )

    # The blood recording before the image pass: small files fail fast.
    blood = None
    if input_function == "blood":
        try:
            blood = InputFunction.from_blood_tsv(paths["blood"], column=blood_column)
            if injection_s != 0:
                blood = InputFunction(blood.times_s - injection_s, blood.values, blood.source)
            blood.check_covers(frames, strict=True)
        except ValueError as err:
            raise KinpetInputError(str(err)) from None

    study = PetStudy(
        subject=subject,
        pet_path=paths["pet"],
        image=image,
        affine=np.asarray(image.affine, dtype=np.float64),
        frames=frames,
        units=str(sidecar["Units"]),
        unit_factor=unit_factor,
        input_function=blood,
        labels=labels,
        label_names=names,
        sidecar=sidecar,
    )

    # One pass over the frames: value checks and, if asked, the aorta curve.
    aorta = labels == names["aorta"] if input_function == "aorta" else None
    low, high, aorta_means = np.inf, -np.inf, []
    for index, frame in enumerate(study.iter_frames()):
        if not np.all(np.isfinite(frame)):
            kind = "NaN" if np.isnan(frame).any() else "infinite"
            raise KinpetInputError(f"{paths['pet']}: frame {index} contains {kind} values")
        low, high = min(low, float(frame.min())), max(high, float(frame.max()))
        if aorta is not None:
            aorta_means.append(float(np.mean(frame[aorta], dtype=np.float64)))
    if high <= 0:
        raise KinpetInputError(f"{paths['pet']}: the image has no positive values")
    if low < -negative_tolerance * high:
        raise KinpetInputError(
            f"{paths['pet']}: negative values down to {low:.4g} kBq/ml, more than "
            f"{negative_tolerance:.0%} of the maximum {high:.4g} kBq/ml (wrong scale or offset?)"
        )

    if input_function == "aorta":
        try:
            study.input_function = InputFunction(
                frames.mids_s, aorta_means, source=f"{paths['pet']} (mean of the aorta label)"
            )
            study.input_function.check_not_zero()
        except ValueError as err:
            raise KinpetInputError(str(err)) from None
    return study
