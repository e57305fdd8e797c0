"""``kinpet fit-image``: parametric maps of one 4-D NIfTI, its sidecar and a blood TSV."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from kinpet import __version__

BLOOD_COLUMN_HELP = (
    "auto (default: plasma for the tissue and whole blood for the Vb term when the file has "
    "both, else the one it has), whole_blood, plasma or a column name (one curve for both)"
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "fit-image",
        help="fit every voxel of a dynamic PET image (parametric maps, no Snakemake)",
        description=(
            "Fit the irreversible two-tissue model to every voxel of a mask or label map of a "
            "4-D NIfTI (kBq/ml, decay-corrected) with its PET-BIDS _pet.json and a blood TSV; "
            "write one NIfTI per parameter with PET-BIDS derivative names and a JSON sidecar. "
            "The image is read a slab of slices at a time (--memory-mb)."
        ),
    )
    p.add_argument("--pet", required=True, help="4-D NIfTI [X, Y, Z, T] in kBq/ml")
    p.add_argument("--pet-json", help="its _pet.json (default: beside it, same name)")
    p.add_argument("--blood-tsv", required=True, help="PET-BIDS _blood.tsv: the input")
    p.add_argument("--blood-column", default="auto", help=BLOOD_COLUMN_HELP)
    p.add_argument("--blood-units", help="units of the blood column if its sidecar lacks them")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--mask", help="3-D NIfTI: the voxels > 0 are fitted")
    where.add_argument(
        "--labels", help="3-D label map: the voxels > 0 are fitted; each label is a region"
    )
    p.add_argument(
        "--model", choices=("irreversible_2tc", "one_tc", "reversible_2tc"),
        default="irreversible_2tc",
        help="kinetic model (default irreversible_2tc)",
    )  # fmt: skip
    p.add_argument("--method", choices=("fast", "curve_fit"), default="fast")
    p.add_argument("--weights", choices=("none", "duration", "duration_decay"), default="none")
    p.add_argument("--sampling", choices=("average", "mid", "paper"), default="average")
    p.add_argument(
        "--fixed", action="append", default=[], metavar="NAME=VALUE",
        help="hold a parameter of the model (e.g. Vb) at a value; repeatable",
    )  # fmt: skip
    p.add_argument(
        "--fit-delay", nargs=2, type=float, metavar=("LO", "HI"),
        help="fit one input delay (s) per region (each label, or the whole mask) on its mean "
        "curve, then hold it for the region's voxels; writes a delay map",
    )  # fmt: skip
    p.add_argument("--out-dir", required=True, help="folder of the maps (created if missing)")
    p.add_argument("--prefix", help="file name prefix (default: the PET name before _pet)")
    p.add_argument(
        "--memory-mb", type=float, default=512.0, help="size of one slab of the image (MB)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=cmd_fit_image)


def _default_json(pet: Path) -> Path:
    name = pet.name.removesuffix(".gz").removesuffix(".nii")
    return pet.with_name(name + ".json")


def _prefix(pet: Path) -> str:
    name = pet.name.removesuffix(".gz").removesuffix(".nii")
    return name.removesuffix("_pet")


def cmd_fit_image(args) -> None:
    import torch

    from kinpet.cli import _parse_fixed, _say_inputs
    from kinpet.fitimage import fit_image, map_file_names, map_units, region_delays, slab_slices
    from kinpet.frames import FrameSchedule
    from kinpet.inputfunction import InputFunction
    from kinpet.io import KinpetInputError, write_json, write_nifti
    from kinpet.models import bids_label, check_fixed, get_model
    from kinpet.readers import dynamic_slab_reader, read_nifti_header, read_volume

    pet = Path(args.pet)
    pet_json = Path(args.pet_json) if args.pet_json else _default_json(pet)
    regions_path = Path(args.labels or args.mask)
    out_dir = Path(args.out_dir)
    prefix = args.prefix or _prefix(pet)
    fixed = _parse_fixed(args.fixed)
    delay = args.fit_delay is not None
    model = get_model(args.model)
    check_fixed(model, fixed)
    names = map_file_names(prefix, model.name, delay)
    sidecar = out_dir / f"{prefix}_model-{bids_label(model)}_mimap.json"
    inputs = {p.resolve() for p in (pet, pet_json, Path(args.blood_tsv), regions_path)}
    for out in [*(out_dir / n for n in names.values()), sidecar]:
        if out.resolve() in inputs:
            raise KinpetInputError(f"{out}: is an input of this command; it would be overwritten")
    if out_dir.exists() and not out_dir.is_dir():
        raise KinpetInputError(f"{out_dir}: exists and is not a folder")
    if args.threads:
        torch.set_num_threads(args.threads)

    grid = read_nifti_header(pet)
    if len(grid.shape) != 4:
        raise KinpetInputError(f"{pet}: expected a 4-D image [X, Y, Z, T], got {grid.shape}")
    frames = FrameSchedule.from_bids_json(pet_json)
    if len(frames) != grid.shape[3]:
        raise KinpetInputError(
            f"{pet_json}: {len(frames)} frames, but {pet} has {grid.shape[3]} volumes"
        )
    inp, blood, columns = InputFunction.from_blood_tsv_pair(
        args.blood_tsv, column=args.blood_column, units=args.blood_units
    )
    for curve in (inp, blood):
        if curve is not None:
            curve.check_covers(frames, strict=True)
            curve.check_not_zero()
    _say_inputs(args.blood_tsv, columns, "fit-image")
    regions = read_volume(regions_path, ndim=3)
    if regions.shape != grid.shape[:3]:
        raise KinpetInputError(
            f"{regions_path}: shape {regions.shape} is not the image's grid {grid.shape[:3]}"
        )
    if args.mask:
        regions = (regions > 0).astype(np.int32)
    else:
        if not np.allclose(regions, np.round(regions)):
            raise KinpetInputError(f"{regions_path}: a label map must hold whole numbers")
        regions = np.round(regions).astype(np.int32)
    if not (regions > 0).any():
        raise KinpetInputError(f"{regions_path}: no voxel > 0, nothing to fit")

    read_slab = dynamic_slab_reader(pet)
    per_slab = slab_slices(grid.shape, args.memory_mb)
    options = dict(model=model.name, method=args.method, weights=args.weights)
    options["sampling"] = args.sampling
    options.update(fixed=fixed, blood_function=blood)
    if args.method == "curve_fit":
        options["n_jobs"] = max(1, torch.get_num_threads())

    def say(line):
        print(f"kinpet fit-image: {line}", file=sys.stderr, flush=True)

    n_voxels = int((regions > 0).sum())
    say(f"{n_voxels} voxels of {pet.name}, {per_slab} slices per slab, method {args.method}")
    delays = None
    if delay:
        delays = region_delays(read_slab, regions, per_slab, inp, frames, args.fit_delay, **options)
        say(f"input delay per region (s): {delays}")
    maps = fit_image(
        read_slab, regions, inp, frames, per_slab, delays=delays, progress=say, **options
    )
    volumes = {name: maps[..., i] for i, name in enumerate(names) if name != "delay"}
    if delay:
        delay_map = np.full(regions.shape, np.nan, dtype=np.float32)
        for label, d in delays.items():
            delay_map[regions == label] = d
        volumes["delay"] = delay_map
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, volume in volumes.items():
        write_nifti(out_dir / names[name], volume, grid.affine, np.float32)
    meta = {
        "Description": f"Parametric maps of {model.description}",
        "ModelName": model.name,
        "Method": args.method,
        "Sampling": args.sampling,
        "FrameWeights": args.weights,
        "InputFunction": {
            "File": str(args.blood_tsv),
            "Column": columns[0],
            "WholeBloodColumn": columns[1] if len(columns) == 2 else None,
        },
        "FixedParameters": fixed,
        "InputDelay": (
            {
                "Bounds_s": list(args.fit_delay),
                "PerRegion_s": {str(k): v for k, v in delays.items()},
            }
            if delay
            else None
        ),
        "Units": {name: map_units(model.name)[name] for name in volumes},
        "Files": {name: names[name] for name in volumes},
        "SoftwareName": "kinpet",
        "SoftwareVersion": __version__,
    }
    write_json(sidecar, meta)
    say(f"{len(volumes)} maps and {sidecar.name} in {out_dir}")
