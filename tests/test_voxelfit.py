"""Chunked voxel-wise fitting: the chunks gather into the maps of one whole-volume fit."""

import json
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from kinpet import voxelfit
from kinpet.evaluation import axial_slice
from kinpet.fitting import fit
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import write_blood_tsv, write_nifti, write_slices
from kinpet.kinetics import irreversible_2tc
from kinpet.voxelfit import (
    chunk_bounds,
    covered_slices,
    figure_slice,
    fit_chunk,
    gather_chunks,
    read_chunk,
    read_slab,
    slab_layout,
    write_slabs,
)

FIT_CHUNK_SCRIPT = Path(__file__).resolve().parents[1] / "workflow/scripts/fit_chunk.py"

FRAMES = FrameSchedule.paper()
INPUT = InputFunction.feng(peak_kbq_per_ml=200.0, delay_s=8.0)


def small_volume(seed=0, shape=(5, 4, 7)):
    rng = np.random.default_rng(seed)
    truth = rng.uniform([0.1, 0.3, 0.02, 0.02], [0.9, 1.5, 0.1, 0.2], size=(*shape, 4))
    pet = irreversible_2tc(truth, INPUT, FRAMES) + rng.normal(0, 0.5, (*shape, len(FRAMES)))
    mask = rng.uniform(size=shape) > 0.3
    return pet.astype(np.float32), mask


def test_chunk_bounds_cover_every_slice_once():
    for n_slices, n_chunks in ((7, 3), (100, 4), (3, 3), (2, 5)):
        bounds = [chunk_bounds(n_slices, n_chunks, c) for c in range(n_chunks)]
        covered = np.concatenate([np.arange(z0, z1) for z0, z1 in bounds])
        np.testing.assert_array_equal(covered, np.arange(n_slices))
    with pytest.raises(ValueError, match="chunk 3"):
        chunk_bounds(10, 3, 3)


def test_covered_slices():
    assert covered_slices(10, "all").all()
    np.testing.assert_array_equal(np.flatnonzero(covered_slices(10, 4)), [2, 6])
    np.testing.assert_array_equal(np.flatnonzero(covered_slices(10, [0, 9, 12])), [0, 9])
    np.testing.assert_array_equal(np.flatnonzero(covered_slices(10, "figure4", 7)), [7])
    with pytest.raises(ValueError, match="figure_z"):
        covered_slices(10, "figure4")


def test_figure_slice_shows_the_most_organs_then_the_most_voxels():
    names = {"background": 0, "body": 1, "liver": 5, "kidneys": 6, "spleen": 7}
    labels = np.ones((6, 6, 10), dtype=int)
    labels[:, :, 2:5] = 5  # a large liver alone on slices 2-4
    labels[:2, :2, 6:9] = 5  # then small parts of all three on slices 6-8
    labels[4:, 4:, 6:9] = 7
    labels[0, 5, 7:9] = 6
    labels[1, 5, 8] = 6  # slice 8 has one more kidney voxel than slice 7
    assert figure_slice(labels, names) == 8
    # Only the organs present in the table count.
    assert figure_slice(labels, {"liver": 5}) in (2, 3, 4)
    with pytest.raises(ValueError, match="none of the organs"):
        figure_slice(labels, {"body": 1})


def test_figure_4_shows_the_slice_that_curve_fit_covered():
    # One rule picks the slice curve_fit fits ("figure4") and the slice Fig. 4 shows among
    # those a fit covered: with "figure4" they are the same slice, and with a stride the
    # figure takes the covered slice with the most organs, not the one with most voxels.
    names = {"background": 0, "body": 1, "liver": 5, "kidneys": 6, "spleen": 7}
    labels = np.ones((6, 6, 10), dtype=int)
    labels[:, :, 2:5] = 5  # a large liver alone on slices 2-4
    labels[:2, :2, 6:9] = 5  # small parts of all three on slices 6-8
    labels[4:, 4:, 6:9] = 7
    labels[0, 5, 6:9] = 6
    organs = {o: names[o] for o in ("liver", "spleen", "kidneys")}
    z = figure_slice(labels, names)
    assert axial_slice(covered_slices(10, "figure4", figure_z=z), labels, organs) == z == 6
    stride = covered_slices(10, 2)  # slices 1, 3, 5, 7, 9
    assert stride[3] and stride[7]  # the large-liver slice and an all-organ slice
    assert axial_slice(stride, labels, organs) == 7


def test_chunks_gather_to_the_whole_volume_fit():
    pet, mask = small_volume()
    covered = covered_slices(7, "all")
    whole, n_whole = fit_chunk(pet, mask, 0, 7, covered, INPUT, FRAMES, "fast")
    bounds = [chunk_bounds(7, 3, c) for c in range(3)]
    parts = [fit_chunk(pet, mask, z0, z1, covered, INPUT, FRAMES, "fast") for z0, z1 in bounds]
    gathered = gather_chunks([p[0] for p in parts], bounds, mask.shape)
    assert sum(p[1] for p in parts) == n_whole == mask.sum()
    np.testing.assert_allclose(gathered, whole, rtol=1e-5, equal_nan=True)
    # Against the fitter called directly on the masked curves (independent of the chunking).
    direct = fit(pet[mask], INPUT, FRAMES, method="fast")
    np.testing.assert_allclose(whole[mask][:, :4], direct.params, rtol=1e-5)
    np.testing.assert_allclose(whole[mask][:, 4], direct.ki, rtol=1e-5)
    # Voxels outside the mask stay NaN in every channel.
    assert np.isnan(whole[~mask]).all()


def test_a_chunk_of_another_model_has_its_maps():
    # reversible_2tc: K1, k2, k3, k4, Vb, VT, VS and SSE, as its own fitter gives them.
    from kinpet.modelfit import fit_reversible

    pet, mask = small_volume(shape=(3, 2, 2))
    covered = covered_slices(2, "all")
    maps, n = fit_chunk(pet, mask, 0, 2, covered, INPUT, FRAMES, "fast", model="reversible_2tc")
    assert maps.shape == (3, 2, 2, 8) and n == mask.sum()
    direct = fit_reversible(pet[mask], INPUT, FRAMES, "fast")
    np.testing.assert_allclose(maps[mask][:, :5], direct.params, rtol=1e-5)
    k1, k2, k3, k4 = direct.params[:, :4].T
    np.testing.assert_allclose(maps[mask][:, 5], k1 / k2 * (1 + k3 / k4), rtol=1e-5)
    np.testing.assert_allclose(maps[mask][:, 7], direct.sse, rtol=1e-5)
    assert np.isnan(maps[~mask]).all()


def test_more_chunks_than_slices_gather_with_empty_chunks(tmp_path):
    """fit.chunks above the slice count: the empty chunks read nothing (nibabel raised
    OSError 22 on an empty slice range), are written and gathered like the others."""
    pet, mask = small_volume()
    path = tmp_path / "pet.nii.gz"
    write_nifti(path, pet, np.eye(4))
    image = nib.load(path)
    covered = covered_slices(7, "all")
    whole, _ = fit_chunk(pet, mask, 0, 7, covered, INPUT, FRAMES, "fast")
    bounds = [chunk_bounds(7, 12, c) for c in range(12)]
    assert any(z0 == z1 for z0, z1 in bounds)
    chunks = []
    for c, (z0, z1) in enumerate(bounds):
        part = read_chunk(image, z0, z1)
        assert part.shape == (5, 4, z1 - z0, len(FRAMES))
        maps, _ = fit_chunk(part, mask[:, :, z0:z1], 0, z1 - z0, covered[z0:z1], INPUT, FRAMES)
        write_slices(tmp_path / f"chunk-{c}.npz", maps=maps, z=np.array([z0, z1]))
        with np.load(tmp_path / f"chunk-{c}.npz") as data:
            chunks.append(data["maps"])
    gathered = gather_chunks(chunks, bounds, mask.shape)
    np.testing.assert_allclose(gathered, whole, rtol=1e-5, equal_nan=True)


def test_reference_method_covers_only_its_slices():
    pet, mask = small_volume(shape=(3, 3, 6))
    covered = covered_slices(6, [4])
    maps, n = fit_chunk(pet, mask, 3, 6, covered, INPUT, FRAMES, "curve_fit")
    assert n == mask[:, :, 4].sum()
    assert np.isnan(maps[:, :, [0, 2]]).all()
    fitted = maps[:, :, 1][mask[:, :, 4]]
    assert np.isfinite(fitted).all()


# -- Chunk jobs read only their slices (the slab file of rule fit_slabs) -----------------


def body_volume(shape=(5, 4, 9)):
    """A volume whose top slices (6-8) hold no body voxel, written as gzipped NIfTI."""
    pet, mask = small_volume(seed=3, shape=shape)
    mask[:, :, 6:] = False
    return pet, mask


def test_slab_reads_equal_the_whole_image_reads(tmp_path):
    """First, middle and last chunk, an empty chunk and a chunk with no body voxel: the
    slab file gives the voxels nibabel gives from the gzipped image, and the same fit."""
    pet, mask = body_volume()
    write_nifti(tmp_path / "pet.nii.gz", pet, np.eye(4))
    image = nib.load(tmp_path / "pet.nii.gz")
    assert write_slabs(image, tmp_path / "slabs.npy") == (9, 5, 4, len(FRAMES))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pet.nii.gz", "slabs.npy"]
    covered = covered_slices(9, "all")
    for n_chunks, chunk in ((3, 0), (3, 1), (3, 2), (12, 5), (12, 11)):
        z0, z1 = chunk_bounds(9, n_chunks, chunk)
        old, new = read_chunk(image, z0, z1), read_slab(tmp_path / "slabs.npy", z0, z1)
        assert new.dtype == np.float32 and new.shape == old.shape == (5, 4, z1 - z0, 62)
        np.testing.assert_array_equal(new, old)
        np.testing.assert_array_equal(new[mask[:, :, z0:z1]], old[mask[:, :, z0:z1]])
        args = (mask[:, :, z0:z1], 0, z1 - z0, covered[z0:z1], INPUT, FRAMES, "fast")
        (old_maps, old_n), (new_maps, new_n) = fit_chunk(old, *args), fit_chunk(new, *args)
        assert new_maps.tobytes() == old_maps.tobytes() and new_n == old_n  # bit-identical
        if (n_chunks, chunk) == (3, 2):  # slices 6-8: no body voxel
            assert new_n == 0 and np.isnan(new_maps).all()
    assert chunk_bounds(9, 12, 5)[0] == chunk_bounds(9, 12, 5)[1]  # (12, 5) is empty


def test_slab_read_maps_only_the_chunks_bytes(tmp_path, monkeypatch):
    """read_slab maps exactly the bytes of slices [z0, z1); the rest of the file may be
    anything (here overwritten with NaN) without changing what it returns."""
    pet, _ = body_volume()
    path = tmp_path / "slabs.npy"
    write_nifti(tmp_path / "p.nii.gz", pet, np.eye(4))
    write_slabs(nib.load(tmp_path / "p.nii.gz"), path)
    (n_z, n_x, n_y, n_t), offset = slab_layout(path)
    plane = n_x * n_y * n_t * 4
    assert path.stat().st_size == offset + n_z * plane
    maps = []
    real_memmap = np.memmap

    def spy(filename, dtype, mode, offset, shape):
        maps.append((offset, shape))
        return real_memmap(filename, dtype=dtype, mode=mode, offset=offset, shape=shape)

    monkeypatch.setattr(voxelfit.np, "memmap", spy)
    z0, z1 = 3, 6
    expected = np.moveaxis(pet, 2, 0)[z0:z1]
    raw = bytearray(path.read_bytes())
    nan = np.full(offset + n_z * plane, np.nan, np.float32).tobytes()
    raw[offset : offset + z0 * plane] = nan[: z0 * plane]
    raw[offset + z1 * plane :] = nan[: (n_z - z1) * plane]
    path.write_bytes(bytes(raw))
    slab = read_slab(path, z0, z1)
    assert maps == [(offset + z0 * plane, (z1 - z0, n_x, n_y, n_t))]
    np.testing.assert_array_equal(np.moveaxis(slab, 2, 0), expected)
    assert np.isnan(read_slab(path, 0, 1)).all()  # the overwritten bytes, to be sure
    maps.clear()
    assert read_slab(path, 4, 4).shape == (n_x, n_y, 0, n_t) and maps == []  # maps nothing
    with pytest.raises(ValueError, match="not within"):
        read_slab(path, 8, 10)


def test_slab_file_is_checked(tmp_path):
    np.save(tmp_path / "three_d.npy", np.zeros((2, 3, 4), np.float32))
    np.save(tmp_path / "float64.npy", np.zeros((2, 3, 4, 5)))
    for name in ("three_d.npy", "float64.npy"):
        with pytest.raises(ValueError, match="not a slab file"):
            read_slab(tmp_path / name, 0, 1)
    write_nifti(tmp_path / "vol.nii.gz", np.zeros((2, 3, 4), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="not a 4-D image"):
        write_slabs(nib.load(tmp_path / "vol.nii.gz"), tmp_path / "out.npy")
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.parametrize("keep", [0, 40, 0.5, -1])
def test_a_truncated_slab_file_is_named(tmp_path, keep):
    """A slab file cut short (a copy or a write that stopped part way): one error naming
    the file, for the missing slices and for those still in the file, not numpy's
    "mmap length is greater than file size"."""
    from kinpet.io import KinpetInputError

    path = tmp_path / "pet_2p5mm_slabs.npy"
    write_slabs(small_volume(shape=(5, 4, 6))[0], path)
    data = path.read_bytes()
    cut = len(data) - 1 if keep == -1 else int(keep * len(data)) if keep < 1 else keep
    path.write_bytes(data[:cut])
    problem = "empty file" if cut == 0 else "truncated or corrupt"
    for z0, z1 in ((0, 1), (4, 6)):
        with pytest.raises(KinpetInputError) as info:
            read_slab(path, z0, z1)
        assert str(info.value).startswith(f"{path}: {problem}"), info.value
        assert "\n" not in str(info.value)
    with pytest.raises(KinpetInputError, match="file not found"):
        read_slab(tmp_path / "missing.npy", 0, 1)


def test_fit_chunk_times_the_fitter():
    pet, mask = small_volume(shape=(3, 3, 4))
    timing = {}
    _, n = fit_chunk(pet, mask, 0, 4, covered_slices(4, "all"), INPUT, FRAMES, timing=timing)
    assert n > 0 and timing["fit_s"] > 0
    fit_chunk(pet, mask & False, 0, 4, covered_slices(4, "all"), INPUT, FRAMES, timing=timing)
    assert timing["fit_s"] == 0.0


def test_importing_voxelfit_imports_neither_torch_nor_scipy():
    """The fit_slabs job imports kinpet.voxelfit: it needs no fitter (torch) and no
    organ tables (kinpet.evaluation, scipy); fit_chunk and figure_slice import them."""
    code = (
        "import sys, kinpet.voxelfit; "
        "print(sorted(m for m in ('torch', 'scipy', 'pandas', 'kinpet.evaluation') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_fit_chunk_job_reads_only_its_slab(tmp_path, monkeypatch):
    """The pipeline's fit_chunk script: it asks the slab file for its chunk's slices and
    nothing else, never opens the gzipped 4-D image, and writes the fitter's time."""
    pet, mask = body_volume()
    labels = mask.astype(np.int16)
    write_nifti(tmp_path / "pet.nii.gz", pet, np.eye(4))
    write_nifti(tmp_path / "labels.nii.gz", labels, np.eye(4))
    write_slabs(nib.load(tmp_path / "pet.nii.gz"), tmp_path / "slabs.npy")
    (tmp_path / "pet.json").write_text(json.dumps(FRAMES.to_bids()))
    write_blood_tsv(tmp_path / "blood.tsv", INPUT)
    reads, loads = [], []
    real_read, real_load = voxelfit.read_slab, nib.load

    def spy_read(path, z0, z1):
        reads.append((Path(path).name, z0, z1))
        return real_read(path, z0, z1)

    def spy_load(path, *args, **kwargs):
        loads.append(Path(path).name)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(voxelfit, "read_slab", spy_read)
    monkeypatch.setattr(nib, "load", spy_load)
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # the script redirects it to its log
    sm = SimpleNamespace(
        input=SimpleNamespace(
            slabs=str(tmp_path / "slabs.npy"),
            labels=str(tmp_path / "labels.nii.gz"),
            labels_tsv=str(tmp_path / "labels.tsv"),
            blood=str(tmp_path / "blood.tsv"),
            pet_json=str(tmp_path / "pet.json"),
        ),
        output=SimpleNamespace(
            maps=str(tmp_path / "chunk-1.npz"), fit_time=str(tmp_path / "chunk-1.fit_time.tsv")
        ),
        log=[str(tmp_path / "chunk-1.log")],
        threads=torch.get_num_threads(),
        wildcards=SimpleNamespace(method="fast", chunk="1"),
        params=SimpleNamespace(
            model="irreversible_2tc", chunks=3, slices="all", weights="none", sampling="average"
        ),
    )
    runpy.run_path(str(FIT_CHUNK_SCRIPT), init_globals={"snakemake": sm})
    sys.stderr.close()
    assert reads == [("slabs.npy", 3, 6)] and loads == ["labels.nii.gz"]
    with np.load(tmp_path / "chunk-1.npz") as data:
        assert list(data["z"]) == [3, 6] and int(data["voxels"]) == mask[:, :, 3:6].sum()
        assert "fit_seconds" not in data  # wall time would make the maps' bytes vary
        old, _ = fit_chunk(
            read_chunk(real_load(tmp_path / "pet.nii.gz"), 3, 6),
            mask[:, :, 3:6],
            0,
            3,
            covered_slices(3, "all"),
            INPUT,
            FRAMES,
            "fast",
        )
        assert data["maps"].tobytes() == old.tobytes()
    fit_time = pd.read_csv(tmp_path / "chunk-1.fit_time.tsv", sep="\t")
    assert list(fit_time.columns) == ["voxels", "fit_s"]
    assert int(fit_time["voxels"].iloc[0]) == mask[:, :, 3:6].sum()
    assert fit_time["fit_s"].iloc[0] > 0
