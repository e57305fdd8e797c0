"""The ``kinpet`` command line."""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np

from kinpet import __version__
from kinpet.cli_fit_image import BLOOD_COLUMN_HELP


def _frames(spec):
    from kinpet.io import frames_from_spec

    return frames_from_spec(spec)


def _input_function(args, frames):
    from kinpet.inputfunction import InputFunction

    if args.input == "feng":
        return InputFunction.feng(peak_kbq_per_ml=args.peak, delay_s=args.delay, end_s=frames.end_s)
    return InputFunction.from_blood_tsv(args.input, column=args.column, units=args.units)


def cmd_frames(args) -> None:
    frames = _frames(args.frames)
    print("frame\tstart_s\tduration_s\tmid_s")
    for i, (s, d, m) in enumerate(
        zip(frames.starts_s, frames.durations_s, frames.mids_s, strict=True)
    ):
        print(f"{i}\t{s:g}\t{d:g}\t{m:g}")


def cmd_model(args) -> None:
    from kinpet.kinetics import irreversible_2tc, ki

    frames = _frames(args.frames)
    inp = _input_function(args, frames)
    params = np.array(args.params, dtype=float)
    curve = irreversible_2tc(params, inp, frames, sampling=args.sampling)
    lines = [
        f"# K1={params[0]:g} k2={params[1]:g} k3={params[2]:g} Vb={params[3]:g} "
        f"Ki={float(ki(params)):.6g} sampling={args.sampling}",
        "frame_start_s\tframe_duration_s\tactivity_kbq_per_ml",
    ]
    for s, d, c in zip(frames.starts_s, frames.durations_s, curve, strict=True):
        lines.append(f"{s:g}\t{d:g}\t{c:.8g}")
    text = "\n".join(lines) + "\n"
    if args.output:
        with open(args.output, "w") as out:
            out.write(text)
    else:
        sys.stdout.write(text)


def cmd_simulate(args) -> None:
    from kinpet import simulation
    from kinpet.io import read_organ_values

    subjects = int(args.subjects) if args.subjects.isdigit() else args.subjects.split(",")
    organ_values = read_organ_values(args.organ_values) if args.organ_values else None
    anatomy = None
    if args.anatomy != "procedural":
        from kinpet.labelmap import read_label_anatomy

        anatomy = read_label_anatomy(
            args.anatomy,
            args.voxel,
            args.anatomy_classes,
            args.anatomy_ct,
            log=lambda message: print(message, file=sys.stderr),
        )
    simulation.write_dataset(
        args.out,
        subjects,
        seed=args.seed,
        size=args.size,
        organ_values=organ_values,
        frames=_frames(args.frames),
        voxel_mm=args.voxel,
        fwhm_mm=args.fwhm,
        noise_cov=args.noise_cov,
        threads=args.threads,
        anatomy=anatomy,
        deform_mm=args.deform_mm,
    )


def _check_outputs(args) -> None:
    """Refuse bad output paths before anything is read or written.

    An output that is one of the inputs would be overwritten; an unknown figure format
    would fail only after the table had been written.
    """
    from pathlib import Path

    from kinpet.io import KinpetInputError

    inputs = [args.tsv, args.pet_json, args.blood_tsv]
    if args.blood_tsv:
        inputs.append(str(Path(args.blood_tsv).with_suffix(".json")))
    inputs = {Path(p).resolve(): p for p in inputs if p}
    outputs = [p for p in (args.output, args.plot) if p]
    if len(outputs) == 2 and Path(args.output).resolve() == Path(args.plot).resolve():
        raise KinpetInputError(f"{args.output}: given as both -o and --plot")
    for out in outputs:
        if Path(out).resolve() in inputs:
            raise KinpetInputError(f"{out}: is an input of this command; it would be overwritten")
        if not Path(out).resolve().parent.is_dir():
            raise KinpetInputError(f"{out}: its folder does not exist")
    if args.plot:
        from matplotlib.figure import Figure

        known = Figure().canvas.get_supported_filetypes()
        fmt = Path(args.plot).suffix.lstrip(".").lower()
        if fmt not in known:
            raise KinpetInputError(
                f"{args.plot}: unknown figure format {fmt or '(no extension)'!r} "
                f"(known: {', '.join(sorted(known))})"
            )


def cmd_fit_tacs(args) -> None:
    import pandas as pd

    from kinpet.io import (
        KinpetInputError,
        read_region_curves,
        write_table_atomic,
    )
    from kinpet.models import get_model, result_columns

    _check_outputs(args)
    fixed = _parse_fixed(args.fixed)
    tissue_cols = [c.strip() for c in args.tissue_cols.split(",")] if args.tissue_cols else None
    frames = None
    if args.pet_json or args.blood_tsv:
        if not (args.pet_json and args.blood_tsv):
            raise KinpetInputError("a PET-BIDS pair needs both --pet-json and --blood-tsv")
        from kinpet.frames import FrameSchedule
        from kinpet.inputfunction import InputFunction

        frames = FrameSchedule.from_bids_json(args.pet_json)
    frames, inp, names, curves = read_region_curves(
        args.tsv,
        tissue_cols=tissue_cols,
        time_col=args.time_col,
        duration_col=args.duration_col,
        input_col=None if args.blood_tsv else args.input_col,
        units=args.units,
        time_units=args.time_units,
        frames=frames,
    )
    blood = None
    if args.blood_tsv:
        inp, blood, columns = InputFunction.from_blood_tsv_pair(
            args.blood_tsv, column=args.blood_column, units=args.blood_units
        )
        _say_inputs(args.blood_tsv, columns, "fit-tacs")
    # The pipeline's rule (kinpet.bids.read_pet_bids): an input that stops early is an error.
    inp.check_covers(frames, strict=True)
    if args.model == "patlak":
        table = _patlak_table(args, names, curves, inp, frames)
        if args.output:
            write_table_atomic(args.output, table)
        else:
            sys.stdout.write(table.to_csv(sep="\t", index=False, float_format="%.6g"))
        return
    model = get_model(args.model)
    from kinpet.modelfit import fit_model  # checks fixed against the model

    result = fit_model(curves, model.name, inp, frames, method=args.method, weights=args.weights,
                       sampling=args.sampling, fixed=fixed, delay_bounds_s=args.fit_delay,
                       blood_function=blood)  # fmt: skip
    _flag_negative_regions(args.tsv, names, curves, result)
    table = pd.DataFrame({"region": names, **result_columns(model, result)})
    # Render everything first, then write: a failure leaves no half-written output.
    figure = None
    if args.plot:
        figure = _fit_figure(frames, inp, blood, names, curves, model, result)
    if args.output:
        write_table_atomic(args.output, table)
    else:
        sys.stdout.write(table.to_csv(sep="\t", index=False, float_format="%.6g"))
    if figure is not None:
        from kinpet.figures import save_figure

        save_figure(figure, args.plot, dpi=120)


def _patlak_table(args, names, curves, inp, frames):
    """The Patlak table: region, Ki, V0 (intercept), r2, frames used."""
    import pandas as pd

    from kinpet.io import KinpetInputError
    from kinpet.patlak import patlak

    given = [flag for flag, value in (("--fixed", args.fixed), ("--fit-delay", args.fit_delay),
                                      ("--plot", args.plot)) if value]  # fmt: skip
    if given or args.method != "fast" or args.weights != "none":
        raise KinpetInputError(
            f"--model patlak is a straight-line fit: {', '.join(given) or '--method/--weights'} "
            "does not apply"
        )
    r = patlak(curves, inp, frames, t_star_min=args.t_star)
    _flag_negative_regions(args.tsv, names, curves, r)
    columns = {"Ki": r.ki, "V0": r.intercept, "r2": r.r2, "frames": r.frames_used}
    return pd.DataFrame({"region": names, **columns, "ok": r.ok, "status": r.reasons()})


def _flag_negative_regions(path, names, curves, result) -> None:
    """Clear ``ok`` of the regions that go far below 0 (:func:`kinpet.fitting.flag_negative`,
    a FitResult or PatlakResult) and warn of each, naming the file, region and minimum."""
    from kinpet.fitting import flag_negative
    from kinpet.io import NEGATIVE_TOLERANCE

    for i in flag_negative(result, curves, NEGATIVE_TOLERANCE):
        low, high = np.nanmin(curves[i]), np.nanmax(curves[i])
        warnings.warn(
            f"{path}: region {names[i]!r} goes down to {low:.4g} kBq/ml, "
            f"{-low / high:.0%} of its maximum {high:.4g} kBq/ml (more than "
            f"{NEGATIVE_TOLERANCE:.0%}: wrong scale or offset?); flagged ok=False",
            stacklevel=1,
        )


def _say_inputs(path, columns: tuple, command: str) -> None:
    """Tell which blood curves of ``path`` the model uses."""
    if len(columns) == 2:
        line = f"{columns[0]} is the tissue's input, {columns[1]} the Vb term's"
    else:
        line = f"{columns[0]} is the input of the tissue and the Vb term"
    print(f"kinpet {command}: {path}: {line}", file=sys.stderr)


def _parse_fixed(items) -> dict:
    """``["Vb=0.05", ...]`` -> ``{"Vb": 0.05}``; a clear error for anything else."""
    fixed = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            fixed[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--fixed {item!r}: expected NAME=VALUE, e.g. --fixed Vb=0.05")
    return fixed


def _fit_figure(frames, inp, blood, names, curves, model, result):
    """Measured (points) and fitted (line) curves, one panel per region."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kinpet.kinetics import KineticModel
    from kinpet.models import result_columns

    n = len(names)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    t = frames.mids_min
    delays = np.zeros(n) if result.delay_s is None else result.delay_s
    columns = result_columns(model, result)
    params = np.column_stack([columns[name] for name in model.parameters])
    rows = zip(axes[0], names, curves, params, result.reasons(), delays, strict=True)
    for ax, name, y, p, reason, delay in rows:
        ax.plot(t, y, "o", ms=4, label="measured")
        if np.isfinite(p).all():  # flagged fits (e.g. negative curves) are drawn too
            whole_blood = None if blood is None else blood.delayed(delay)
            kinetic_model = KineticModel(inp.delayed(delay), frames, result.sampling, whole_blood)
            ax.plot(t, model.curves(p, kinetic_model), "-", label="fitted")
            flag = "" if reason == "ok" else f" ({reason})"
            shift = "" if result.delay_s is None else f" delay={delay:.1f} s"
            values = " ".join(f"{k}={v:.3g}" for k, v in zip(model.parameters, p, strict=True))
            ax.set_title(f"{name}{flag}\n{values}{shift}", fontsize=9)
        else:
            ax.set_title(f"{name}: not fitted ({reason})")
        ax.set_xlabel("time after injection (min)")
        ax.set_ylabel("activity (kBq/ml)")
        ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kinpet",
        description="Voxel-wise kinetic modelling of dynamic FDG PET (irreversible 2TC).",
    )
    parser.add_argument("--version", action="version", version=f"kinpet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("frames", help="print a frame schedule")
    p.add_argument(
        "frames",
        nargs="?",
        default="paper",
        help='"paper" (62 frames, default) or a PET-BIDS _pet.json',
    )
    p.set_defaults(func=cmd_frames)

    p = sub.add_parser("model", help="print the model curve of one parameter set")
    p.add_argument(
        "--params",
        nargs=4,
        type=float,
        required=True,
        metavar=("K1", "k2", "k3", "Vb"),
        help="K1 (ml/cm3/min), k2 (1/min), k3 (1/min), Vb (fraction)",
    )
    p.add_argument("--frames", default="paper", help='"paper" (default) or a PET-BIDS _pet.json')
    p.add_argument(
        "--input", default="feng", help='"feng" (Feng model 2, default) or a PET-BIDS _blood.tsv'
    )
    p.add_argument(
        "--column",
        default="whole_blood",
        help="blood column: whole_blood (default), plasma or a column name",
    )
    p.add_argument(
        "--units",
        default=None,
        help="units of the blood column when its .json sidecar does not say",
    )
    p.add_argument("--peak", type=float, default=250.0, help="Feng input peak, kBq/ml")
    p.add_argument("--delay", type=float, default=0.0, help="Feng input delay, s")
    p.add_argument(
        "--sampling",
        choices=("average", "mid", "paper"),
        default="average",
        help="frame average (default), frame mid-time, or the paper's model",
    )
    p.add_argument("-o", "--output", help="write the TSV here instead of standard output")
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("simulate", help="simulate phantom subjects as a PET-BIDS dataset")
    p.add_argument("--out", required=True, help="dataset root folder")
    p.add_argument(
        "--subjects", default="1", help="a number (sub-01 ... sub-NN) or ids, e.g. sub-01,sub-04"
    )
    p.add_argument("--size", choices=("tiny", "demo", "paper"), default="demo")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--frames", default="paper", help='"paper" (default) or a PET-BIDS _pet.json')
    p.add_argument("--voxel", type=float, default=1.6, help="voxel size, mm")
    p.add_argument("--fwhm", type=float, default=4.0, help="PSF FWHM, mm (0: none)")
    p.add_argument(
        "--noise-cov", type=float, default=0.10, help="liver CoV in the last frame (0: none)"
    )
    p.add_argument(
        "--organ-values", help="TSV of organ means (organ, K1, k2, k3, Vb); default built in"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads for the model")
    p.add_argument(
        "--anatomy",
        default="procedural",
        help="procedural (default: the shapes of --size) or a NIfTI label map, e.g. "
        "TotalSegmentator's (docs/phantom.md)",
    )
    p.add_argument("--anatomy-ct", help="a CT on the label map's grid: its body is the outline")
    p.add_argument(
        "--deform-mm",
        type=float,
        default=0.0,
        help="rms displacement (mm) of a smooth random deformation of the procedural liver, "
        "spleen and kidneys (default 0: none)",
    )
    p.add_argument(
        "--anatomy-classes",
        default="config/totalsegmentator_classes.tsv",
        help="TSV assigning label names to kinpet's classes (default: the repository's)",
    )
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "fit-tacs",
        help="fit region curves from a table and write K1, k2, k3, Vb, Ki, SSE per region",
        description=(
            "Fit the irreversible two-tissue model to region time-activity curves. The table "
            "has one row per frame: frame start, frame duration, an image-derived input "
            "(used at frame mid-times) and one or more tissue columns. Or give a PET-BIDS "
            "pair (--pet-json, --blood-tsv) and a table of tissue columns. Activities are "
            "converted to kBq/ml; SSE is in (kBq/ml)^2, weighted."
        ),
    )
    p.add_argument("--tsv", required=True, help="table of curves (.tsv, or .csv)")
    p.add_argument("--time-col", default="frame_start_s", help="frame start column")
    p.add_argument("--duration-col", default="frame_duration_s", help="frame duration column")
    p.add_argument("--time-units", choices=("s", "min"), default="s", help="units of both")
    p.add_argument(
        "--input-col",
        default="auto",
        help="input column (default: the one column named like aorta/input/blood/aif/idif)",
    )
    p.add_argument("--tissue-cols", help="comma-separated tissue columns (default: the others)")
    p.add_argument(
        "--units",
        help="units of the activity columns, e.g. Bq/ml (default: from names like *_bq_per_ml)",
    )
    p.add_argument("--pet-json", help="PET-BIDS _pet.json: frames (with --blood-tsv)")
    p.add_argument("--blood-tsv", help="PET-BIDS _blood.tsv: the input (with --pet-json)")
    p.add_argument("--blood-column", default="auto", help=BLOOD_COLUMN_HELP)
    p.add_argument("--blood-units", help="units of the blood column if its sidecar lacks them")
    p.add_argument(
        "--method",
        choices=("fast", "curve_fit", "curve_fit_paper"),
        default="fast",
        help="fast (default), curve_fit (scipy per curve on the frames), curve_fit_paper (the "
        "published organ fit on the 0.1-min grid; --sampling does not apply, --weights none)",
    )
    p.add_argument(
        "--weights",
        choices=("none", "duration", "duration_decay"),
        default="none",
        help="frame weights: none (paper), duration, duration x F-18 decay at mid-frame",
    )
    p.add_argument("--sampling", choices=("average", "mid", "paper"), default="average")
    p.add_argument(
        "--model",
        choices=("irreversible_2tc", "reversible_2tc", "one_tc", "patlak"),
        default="irreversible_2tc",
        help="irreversible_2tc (default: K1, k2, k3, Vb, Ki), reversible_2tc (K1, k2, k3, k4, "
        "Vb, VT, VS), one_tc (K1, k2, Vb, VT) or "
        "patlak (Ki and intercept V0 of the line over the frames after --t-star)",
    )
    p.add_argument(
        "--t-star", type=float, default=20.0, help="patlak: start of the line, min (default 20)"
    )
    p.add_argument(
        "--fixed",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="hold a parameter (K1, k2, k3, Vb) at a value, e.g. --fixed Vb=0.05; repeatable",
    )
    p.add_argument(
        "--fit-delay",
        nargs=2,
        type=float,
        metavar=("LO", "HI"),
        help="fit an input delay per region within [LO, HI] s (positive: the tissue sees the "
        "input later); adds a delay_s column",
    )
    p.add_argument("-o", "--output", help="write the table here (.tsv or .csv), else stdout")
    p.add_argument("--plot", help="write a figure of measured vs fitted curves (.png, .pdf)")
    p.set_defaults(func=cmd_fit_tacs)

    from kinpet.cli_fit_image import add_parser as add_fit_image

    add_fit_image(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Warnings (implausible but possible input) in the same one-line form as errors.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            args.func(args)
        except (ValueError, OSError) as err:
            # Our errors name the file and the problem; a traceback would only hide that.
            error = err
        else:
            error = None
    for warning in caught:
        print(f"kinpet {args.command}: warning: {warning.message}", file=sys.stderr)
    if error is not None:
        print(f"kinpet {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
