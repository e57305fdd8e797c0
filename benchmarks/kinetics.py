"""Micro-benchmark (not a test): voxel-curves per second of the exact model.

Prints curves/s for numpy (float64) and torch (float32 and float64) on the paper's
62-frame schedule, for two inputs: an image-derived input sampled at frame mid-times
(62 samples, the common case) and Feng's model sampled finely (279 samples, more knots).

    .venv/bin/python benchmarks/kinetics.py [--voxels 262144] [--repeats 3]
"""

import argparse
import time

import numpy as np
import torch

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import PAPER_LOWER, PAPER_UPPER, KineticModel, irreversible_2tc


def best_rate(fn, n, repeats):
    fn()  # warm-up
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, default=262144)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    frames = FrameSchedule.paper()
    feng = InputFunction.feng(delay_s=10.0)
    blood = irreversible_2tc(np.array([0.0, 0.1, 0.1, 1.0]), feng, frames)
    idif = InputFunction(frames.mids_s, blood, source="IDIF at frame mid-times")
    rng = np.random.default_rng(0)
    params = rng.uniform(PAPER_LOWER, PAPER_UPPER, size=(args.voxels, 4))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.voxels} voxels, {len(frames)} frames"
    )
    print(f"{'input':<12}{'sampling':<10}{'backend':<16}{'curves/s':>14}")
    for name, inp in (("idif-mids", idif), ("feng-fine", feng)):
        for sampling in ("average", "mid", "paper"):
            model = KineticModel(inp, frames, sampling)
            p64 = torch.from_numpy(params)
            p32 = p64.float()
            runs = {
                "numpy float64": lambda m=model: m(params),
                "torch float64": lambda m=model, p=p64: m(p),
                "torch float32": lambda m=model, p=p32: m(p),
            }
            for backend, fn in runs.items():
                with torch.inference_mode():
                    rate = best_rate(fn, args.voxels, args.repeats)
                print(f"{name:<12}{sampling:<10}{backend:<16}{rate:>14,.0f}")
    print("target: >= 1,000,000 curves/s in float32 torch on 2 cores")


if __name__ == "__main__":
    main()
