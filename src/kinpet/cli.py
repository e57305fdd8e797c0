"""The ``kinpet`` command line."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from kinpet import __version__


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
    from kinpet import phantom
    from kinpet.io import read_organ_values

    subjects = int(args.subjects) if args.subjects.isdigit() else args.subjects.split(",")
    organ_values = read_organ_values(args.organ_values) if args.organ_values else None
    phantom.write_dataset(
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
    )


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
    p.set_defaults(func=cmd_simulate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as err:
        # Our errors name the file and the problem; a traceback would only hide that.
        print(f"kinpet {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
