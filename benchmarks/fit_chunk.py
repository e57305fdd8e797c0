"""Benchmark (not a test): a fit_chunk job's time against the fitter's own time, old way
(each job decompresses the whole gzipped 4-D image) against new way (rule fit_slabs writes
the image once, slice-major and uncompressed, and each job maps only its slices), in the
same run.

Every job runs in its own Python process, as under Snakemake: the new way is the
pipeline's own script (workflow/scripts/fit_chunk.py, given a stand-in for the
``snakemake`` object), the old way the script as it was (nibabel's slice of the gzipped
image, and kinpet.evaluation imported as kinpet.voxelfit then did). Old and new jobs of a
chunk run one after the other, so that both see the same load; the maps of both must be
bit-identical. What Snakemake itself adds per job (its script preamble, the benchmark
thread) is in neither.

Printed per way and chunk count: jobs, voxels fitted, the jobs' wall time per voxel, the
fitter's own wall time per voxel (timed around kinpet.fitting.fit inside each job), their
ratio, the fixed cost per job (job minus fit), and the jobs' CPU time; for the new way, the
one fit_slabs job per subject beside it (not in the ratio).

Needs a subject's preprocessed files, e.g. the demo's test subject:

    .venv/bin/snakemake --cores 1 results/preprocessed/sub-04/labels.tsv
    .venv/bin/python benchmarks/fit_chunk.py [--subject results/preprocessed/sub-04]
        [--chunks 4 1] [--threads 2] [--method fast]
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "workflow/scripts/fit_chunk.py"

# The job as it was before fit_slabs: the whole gzipped image behind nibabel's proxy.
OLD_JOB = """
import sys, json
args = json.loads(sys.argv[1])
import nibabel as nib
import numpy as np
import torch
import kinpet.evaluation  # noqa: F401 (the old kinpet.voxelfit imported it)
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import write_slices
from kinpet.voxelfit import MAP_NAMES, chunk_bounds, covered_slices, fit_chunk, read_chunk
torch.set_num_threads(args["threads"])
d = args["subject"]
pet_img = nib.load(d + "/pet_2p5mm.nii.gz")
labels = np.asarray(nib.load(d + "/labels_2p5mm.nii.gz").dataobj)
z0, z1 = chunk_bounds(labels.shape[2], args["chunks"], args["chunk"])
covered = covered_slices(labels.shape[2], "all")
frames = FrameSchedule.from_bids_json(d + "/pet.json")
inp = InputFunction.from_blood_tsv(d + "/input_blood.tsv")
pet = read_chunk(pet_img, z0, z1)
mask = labels[:, :, z0:z1] > 0
timing = {}
maps, n = fit_chunk(pet, mask, 0, z1 - z0, covered[z0:z1], inp, frames, args["method"],
                    timing=timing, weights="none", sampling="average")
write_slices(args["out"], maps=maps, z=np.array([z0, z1]), voxels=np.array(n),
             names=np.array(MAP_NAMES), fit_seconds=np.array(timing["fit_s"]))
"""

# The pipeline's script, given a stand-in for the object Snakemake injects.
NEW_JOB = """
import sys, json, runpy
from types import SimpleNamespace
args = json.loads(sys.argv[1])
d = args["subject"]
sm = SimpleNamespace(
    input=SimpleNamespace(
        slabs=args["slabs"], labels=d + "/labels_2p5mm.nii.gz", labels_tsv=d + "/labels.tsv",
        blood=d + "/input_blood.tsv", pet_json=d + "/pet.json",
    ),
    output=SimpleNamespace(maps=args["out"], fit_time=args["out"] + ".fit_time.tsv"),
    log=[args["log"]], threads=args["threads"],
    wildcards=SimpleNamespace(method=args["method"], chunk=str(args["chunk"])),
    params=SimpleNamespace(chunks=args["chunks"], slices="all", weights="none",
                           sampling="average"),
)
runpy.run_path(args["script"], init_globals={"snakemake": sm}, run_name="__main__")
"""

SLAB_JOB = """
import sys, json
args = json.loads(sys.argv[1])
import nibabel as nib
from kinpet.voxelfit import write_slabs
write_slabs(nib.load(args["subject"] + "/pet_2p5mm.nii.gz"), args["slabs"])
"""


def fitter_seconds(way: str, out, data) -> float:
    """The fitter's own seconds in one job: in the old job's npz, beside the new job's maps."""
    if way == "O":
        return float(data["fit_seconds"])
    with open(f"{out}.fit_time.tsv") as table:
        header, row = table.read().split("\n")[:2]
    return float(dict(zip(header.split("\t"), row.split("\t"), strict=True))["fit_s"])


def run_job(code: str, **args) -> tuple[float, float]:
    """Run ``code`` in a fresh Python; return its wall and CPU seconds (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, json.dumps(args)], check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subject", default="results/preprocessed/sub-04")
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="fast", choices=["fast", "curve_fit"])
    opts = parser.parse_args()
    subject = str(Path(opts.subject).resolve())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        slabs = str(tmp / "pet_2p5mm_slabs.npy")
        slab_wall, slab_cpu = run_job(SLAB_JOB, subject=subject, slabs=slabs)
        for n_chunks in opts.chunks:
            totals = {way: {"wall": 0.0, "cpu": 0.0, "fit": 0.0, "voxels": 0} for way in "ON"}
            for chunk in range(n_chunks):
                outputs = {}
                for way, code in (("O", OLD_JOB), ("N", NEW_JOB)):
                    out = str(tmp / f"{way}-{n_chunks}-{chunk}.npz")
                    wall, cpu = run_job(
                        code,
                        subject=subject,
                        slabs=slabs,
                        script=str(SCRIPT),
                        out=out,
                        log=str(tmp / f"{way}-{n_chunks}-{chunk}.log"),
                        threads=opts.threads,
                        method=opts.method,
                        chunks=n_chunks,
                        chunk=chunk,
                    )
                    with np.load(out) as data:
                        outputs[way] = data["maps"]
                        t = totals[way]
                        t["wall"] += wall
                        t["cpu"] += cpu
                        t["fit"] += fitter_seconds(way, out, data)
                        t["voxels"] += int(data["voxels"])
                if outputs["O"].tobytes() != outputs["N"].tobytes():
                    raise SystemExit(f"chunk {chunk} of {n_chunks}: old and new maps differ")
            for way, name in (("O", "old (gzip per job)"), ("N", "new (slab file)")):
                t = totals[way]
                rows.append(
                    {
                        "way": name,
                        "chunks": n_chunks,
                        "voxels": t["voxels"],
                        "job_us_per_voxel": 1e6 * t["wall"] / t["voxels"],
                        "fit_us_per_voxel": 1e6 * t["fit"] / t["voxels"],
                        "job_over_fit": t["wall"] / t["fit"],
                        "fixed_s_per_job": (t["wall"] - t["fit"]) / n_chunks,
                        "cpu_s_per_job": t["cpu"] / n_chunks,
                    }
                )
    header = (
        f"{'way':<20} {'chunks':>6} {'voxels':>8} {'job µs/vox':>11} {'fit µs/vox':>11} "
        f"{'job/fit':>8} {'job-fit s/job':>14} {'CPU s/job':>10}"
    )
    print(f"method {opts.method}, {opts.threads} threads per job, {subject}")
    print(header)
    for r in rows:
        print(
            f"{r['way']:<20} {r['chunks']:>6} {r['voxels']:>8} {r['job_us_per_voxel']:>11.1f} "
            f"{r['fit_us_per_voxel']:>11.1f} {r['job_over_fit']:>8.2f} "
            f"{r['fixed_s_per_job']:>14.2f} {r['cpu_s_per_job']:>10.2f}"
        )
    print(
        f"new way, once per subject: fit_slabs {slab_wall:.2f} s wall, {slab_cpu:.2f} s CPU "
        "(not in the ratio)"
    )


if __name__ == "__main__":
    main()
