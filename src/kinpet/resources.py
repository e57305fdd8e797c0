"""What simulating the phantom needs (memory, scratch disk), and the check that refuses a
grid that does not fit.

The standard library only: the Snakefile imports this module at parse time (its own
environment may lack numpy with ``--use-conda``) to refuse such a config before Snakemake
plans any job, and so before it deletes the outputs of a rerun job. The ``simulate`` job
runs the same check (:func:`kinpet.simulation.check_simulation_resources`), where the
memory is that of its node or SLURM job. The body size presets live here because the grid,
and with it the estimate, follows from their field of view.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kinpet.constants import PAPER_DURATIONS_S


@dataclass(frozen=True)
class PhantomSize:
    """A body size preset.

    Parameters
    ----------
    name : str
    fov_mm : tuple of 3 floats
        Field of view (x, y, z) in mm.
    scale : tuple of 2 floats
        Transaxial and axial scale of the adult reference body (350 x 250 x 900 mm).
    """

    name: str
    fov_mm: tuple
    scale: tuple


SIZES = {
    # Paper: an adult from the upper thighs to the neck on the Quadra's 1.6-mm grid.
    "paper": PhantomSize("paper", (400.0, 290.0, 900.0), (1.0, 1.0)),
    # Demo: a child-sized body, ~150 x 110 x 250 mm, ~1 million voxels.
    "demo": PhantomSize("demo", (160.0, 118.0, 250.0), (0.43, 0.28)),
    # Tiny: for unit tests only (~120,000 voxels).
    "tiny": PhantomSize("tiny", (82.0, 61.0, 112.0), (0.22, 0.125)),
}


def grid_shape(fov_mm, voxel_mm: float) -> tuple[int, int, int]:
    """Voxels (x, y, z) of a field of view ``fov_mm`` at ``voxel_mm`` (the phantom's grid)."""
    return tuple(int(round(f / voxel_mm)) for f in fov_mm)


# -- resources ------------------------------------------------------------------------------
# What simulate_subject allocates: the label map and the five truth maps of the whole grid
# (22 bytes a voxel), and frame by frame the frame, its blur, the noise and their
# temporaries, and a NIfTI's bytes (about 38 more); the kinetic model of one slab (at
# least one slice; 1.5 kB a body voxel, measured); torch and the rest (under 1 GiB).
# Allocations, not resident pages: the resident peak is lower (zero pages of the
# background are never touched: 17 bytes a voxel measured on the demo body at 1 mm), but
# an allocation larger than the memory fails whatever is touched later.
SIMULATION_BYTES_PER_VOXEL = 60
MODEL_BYTES_PER_VOXEL = 1600
SIMULATION_FIXED_BYTES = 1 << 30
# Slabs hold at most this many voxels: the model's float64 output is then ~130 MB.
SLAB_VOXELS = 262_144


class PhantomResourceError(ValueError):
    """A simulation that would not fit in memory or on disk."""


def available_memory(mem_mb=None) -> int:
    """Bytes of memory a simulation may use.

    The physical memory (``os.sysconf``), or the cgroup's limit when lower (inside a SLURM
    job: its ``mem_mb``; a container), or ``mem_mb`` MiB when given and lower.

    Parameters
    ----------
    mem_mb : int, optional
        A job's declared memory, for a check made outside the job (the Snakefile's: a
        cluster job gets this as its cgroup limit, which the job's own check then reads).
    """
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    if mem_mb is not None:
        total = min(total, int(mem_mb) * 2**20)
    return total


def simulation_needs(shape, n_frames: int | None) -> dict:
    """Estimated peak memory and scratch disk (bytes) of simulating on a grid of ``shape``.

    The scratch file holds the noise-free frames, 4 bytes a voxel and frame, beside the
    output (None when ``n_frames`` is); the memory estimate is
    :data:`SIMULATION_BYTES_PER_VOXEL` a voxel of the grid, :data:`MODEL_BYTES_PER_VOXEL` a
    voxel of one slab and :data:`SIMULATION_FIXED_BYTES`.
    """
    voxels = math.prod(int(n) for n in shape)
    slab = max(SLAB_VOXELS, int(shape[0]) * int(shape[1]))
    return {
        "voxels": voxels,
        "memory": SIMULATION_FIXED_BYTES
        + SIMULATION_BYTES_PER_VOXEL * voxels
        + MODEL_BYTES_PER_VOXEL * slab,
        "disk": None if n_frames is None else 4 * voxels * int(n_frames),
    }


def frame_count(spec) -> int | None:
    """Frames of a phantom's ``frames`` setting: ``"paper"`` or a ``_pet.json`` path.

    None when the sidecar cannot be read: the ``simulate`` job reads it and names the
    problem (:class:`~kinpet.frames.FrameScheduleError`).
    """
    if spec == "paper":
        return len(PAPER_DURATIONS_S)
    try:
        durations = json.loads(Path(spec).read_text(encoding="utf-8"))["FrameDuration"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return len(durations) if isinstance(durations, list) else 1


def check_phantom_resources(
    size, voxel_mm: float, n_frames, root, subject="a subject", setting="voxel_mm", memory=None
) -> None:
    """Refuse a simulation that cannot fit, before anything is computed or written.

    Parameters
    ----------
    size : str or PhantomSize
        Body size preset (:data:`SIZES`).
    voxel_mm : float
    n_frames : int or None
        None: the scratch disk is not checked.
    root : path-like
        The dataset folder the subjects are written to (its file system must hold the
        scratch file).
    subject : str
        Who is simulated, for the message (``sub-01``; ``each of the 4 subjects``).
    setting : str
        How the voxel size is named in the message (``config phantom.voxel_mm``).
    memory : int, optional
        Bytes available (default: :func:`available_memory`).

    Raises
    ------
    PhantomResourceError
        Naming the setting and its value, the grid, the estimate and what is available.
    """
    size = SIZES[size] if isinstance(size, str) else size
    shape = grid_shape(size.fov_mm, voxel_mm)
    needs = simulation_needs(shape, n_frames)
    memory = available_memory() if memory is None else int(memory)
    what = (
        f"{setting} {voxel_mm:g} mm: simulating {subject} ({size.name} body) on a "
        f"{' x '.join(map(str, shape))} grid ({needs['voxels'] / 1e6:.1f} million voxels) "
        "needs about"
    )
    if needs["memory"] > memory:
        raise PhantomResourceError(
            f"{what} {needs['memory'] / 2**30:.2f} GiB of memory, more than the "
            f"{memory / 2**30:.2f} GiB available: use a larger voxel size"
        )
    if needs["disk"] is None:
        return
    folder = Path(root).resolve()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needs["disk"] > free:
        raise PhantomResourceError(
            f"{what} {needs['disk'] / 2**30:.2f} GiB of scratch space in {folder}, more "
            f"than the {free / 2**30:.2f} GiB free: use a larger voxel size or free space"
        )
