"""Chunked voxel-wise fitting: the chunks gather into the maps of one whole-volume fit."""

import nibabel as nib
import numpy as np
import pytest

from kinpet.evaluation import axial_slice
from kinpet.fitting import fit
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import write_nifti, write_slices
from kinpet.kinetics import irreversible_2tc
from kinpet.voxelfit import (
    chunk_bounds,
    covered_slices,
    figure_slice,
    fit_chunk,
    gather_chunks,
    read_chunk,
)

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
