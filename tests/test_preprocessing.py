"""Resampling, slice range, crops and the image-derived input (kinpet.preprocessing)."""

import numpy as np
import pytest
from bids_synthetic import (
    NAMES,
    input_function,
    lps_affine,
    phantom_activity,
    phantom_labels,
    reorient,
)

from kinpet.frames import FrameSchedule
from kinpet.preprocessing import (
    PreprocessingError,
    canonical_grid,
    centre_crop_offsets,
    extract_slices,
    image_derived_input,
    resample_to_spacing,
    slice_range,
    slices_to_volume,
    voxel_volume_ml,
)

NAME_INDEX = {name: i for i, name in enumerate(NAMES)}
SEVEN_ORGANS = ("bones", "lungs", "heart", "liver", "kidneys", "spleen", "aorta")


def world_mm(affine, shape):
    """RAS+ coordinates (mm) of every voxel centre, shape (3, *shape)."""
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape(3, *shape)


@pytest.fixture(scope="module")
def native():
    """A phantom on the paper's native 1.6-mm grid (200 x 160 x 320 mm)."""
    shape, voxel = (125, 100, 200), 1.6
    labels = phantom_labels(shape, voxel)
    return labels, lps_affine(shape, voxel, origin_lps=(12.0, -30.0, 500.0)), voxel


def test_canonical_grid_covers_the_same_extent():
    # 50 x 1.6 mm = 80 mm = 32 x 2.5 mm exactly; 51 x 1.6 = 81.6 mm needs 33 voxels.
    affine = lps_affine((50, 51, 50), 1.6, origin_lps=(1.0, 2.0, 3.0))
    shape, out = canonical_grid((50, 51, 50), affine, 2.5)
    assert shape == (32, 33, 32)
    np.testing.assert_allclose(np.diag(out)[:3], [-2.5, -2.5, 2.5])
    # The centre of the grid stays where it was (RAS of LPS centre (1, 2, 3) is (-1, -2, 3)).
    centre = out[:3, :3] @ ((np.array(shape) - 1) / 2) + out[:3, 3]
    np.testing.assert_allclose(centre, [-1.0, -2.0, 3.0], atol=1e-9)


def rotation_z(degrees):
    a = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return rot


@pytest.mark.parametrize(
    "axcodes, tilt",
    [(("L", "P", "S"), 0), (("R", "A", "S"), 0), (("S", "R", "P"), 0), (("L", "P", "S"), 12)],
)
def test_resampling_keeps_physical_space(axcodes, tilt):
    """A linear function of world coordinates stays the same function after resampling.

    Linear interpolation reproduces a linear function exactly, so every output voxel whose
    centre lies among the input's voxel centres must equal the function at its world
    position: this checks spacing, origin, orientation and axis order at once, for flipped,
    permuted and oblique (tilted by 12 degrees) inputs.
    """
    shape, voxel = (30, 25, 40), 1.6
    affine = rotation_z(tilt) @ lps_affine(shape, voxel, origin_lps=(5.0, -3.0, 100.0))
    ras = world_mm(affine, shape)
    coef = np.array([0.7, -0.3, 0.2])

    def field(world):
        return np.tensordot(coef, world, axes=1) + 100.0

    data, stored_affine = reorient(field(ras).astype(np.float32), affine, axcodes)
    out, out_affine = resample_to_spacing(data, stored_affine, 2.5)
    out_world = world_mm(out_affine, out.shape)
    # Continuous input index of every output voxel centre.
    index = np.linalg.solve(affine[:3, :3], out_world.reshape(3, -1) - affine[:3, 3:4])
    n = np.array(shape)[:, None]
    inside = np.all((index >= -1e-6) & (index <= n - 1 + 1e-6), axis=0).reshape(out.shape)
    assert inside.sum() > 0.4 * out.size
    np.testing.assert_allclose(out[inside], field(out_world)[inside], rtol=1e-5)
    # Canonical orientation: x towards the left, y posterior, z superior.
    assert tuple(np.sign(np.diag(out_affine)[:3])) == (-1, -1, 1)


def test_resampling_preserves_total_activity_of_a_smooth_image(native):
    """sum(C * voxel volume) of a smooth blob (sd 20 and 40 mm) is kept within 0.1 %."""
    labels, affine, voxel = native
    x, y, z = world_mm(affine, labels.shape)
    blob = np.exp(-((x - 5) ** 2 + (y + 3) ** 2) / (2 * 20**2) - (z - 520) ** 2 / (2 * 40**2))
    out, out_affine = resample_to_spacing(blob.astype(np.float32), affine, 2.5)
    before = blob.sum() * voxel_volume_ml(affine)
    after = out.astype(np.float64).sum() * voxel_volume_ml(out_affine)
    assert after == pytest.approx(before, rel=1e-3)


def test_resampling_preserves_activity_and_organ_volumes_of_the_phantom(native):
    """Piecewise-constant organs 1.6 -> 2.5 mm: total activity per frame within 1 %,
    the seven organs' volumes (nearest neighbour) within 5 %."""
    labels, affine, voxel = native
    frames = FrameSchedule.from_durations([30, 300])
    pet = phantom_activity(labels, frames)
    out, out_affine = resample_to_spacing(pet, affine, 2.5)
    assert out.shape[3] == 2 and out.dtype == np.float32
    before = pet.sum(axis=(0, 1, 2), dtype=np.float64) * voxel_volume_ml(affine)
    after = out.sum(axis=(0, 1, 2), dtype=np.float64) * voxel_volume_ml(out_affine)
    np.testing.assert_allclose(after, before, rtol=0.01)

    out_labels, label_affine = resample_to_spacing(labels, affine, 2.5, "nearest")
    np.testing.assert_array_equal(label_affine, out_affine)
    assert out_labels.dtype == np.int16 and out_labels.shape == out.shape[:3]
    for organ in SEVEN_ORGANS:
        v0 = np.sum(labels == NAME_INDEX[organ]) * voxel_volume_ml(affine)
        v1 = np.sum(out_labels == NAME_INDEX[organ]) * voxel_volume_ml(out_affine)
        assert v1 == pytest.approx(v0, rel=0.05), organ
    # Nearest neighbour creates no new label values.
    assert set(np.unique(out_labels)) <= set(np.unique(labels))


def test_shear_is_rejected():
    affine = np.eye(4)
    affine[0, 1] = 0.5
    with pytest.raises(PreprocessingError, match="scan.nii: the affine has shear"):
        resample_to_spacing(np.zeros((4, 4, 4)), affine, 2.5, source="scan.nii")


def lungs_bladder_labels():
    """Hand-made labels: lungs on z 20..29, bladder on z 5..8, body around them."""
    labels = np.zeros((20, 16, 40), dtype=np.int16)
    labels[4:16, 3:13, 2:36] = NAME_INDEX["body"]
    labels[6:10, 5:9, 20:30] = NAME_INDEX["lungs"]
    labels[8:12, 6:10, 5:9] = NAME_INDEX["bladder"]
    return labels


def test_slice_range_runs_from_the_bladder_to_the_top_of_the_lungs():
    labels = lungs_bladder_labels()
    np.testing.assert_array_equal(slice_range(labels, NAME_INDEX, 2.5), np.arange(5, 30))
    # 10 mm above and 5 mm below at 2.5 mm per slice: 4 and 2 slices.
    z = slice_range(labels, NAME_INDEX, 2.5, margins_mm=(10, 5))
    np.testing.assert_array_equal(z, np.arange(3, 34))
    # Half slices round up: 6.25 mm -> 3 slices, 3.75 mm -> 2 slices.
    z = slice_range(labels, NAME_INDEX, 2.5, margins_mm=(6.25, 3.75))
    np.testing.assert_array_equal(z, np.arange(3, 33))
    # Margins stop at the image's edges.
    z = slice_range(labels, NAME_INDEX, 2.5, margins_mm=(100, 100))
    np.testing.assert_array_equal(z, np.arange(0, 40))
    # A fixed number of evenly spaced slices, ends included (the paper keeps 75).
    z = slice_range(labels, NAME_INDEX, 2.5, n_slices=5)
    np.testing.assert_array_equal(z, [5, 11, 17, 23, 29])


def test_slice_range_goes_by_label_name():
    labels = lungs_bladder_labels()
    renumbered = np.where(labels == NAME_INDEX["lungs"], 40, labels)
    names = {**NAME_INDEX, "lungs": 40}
    np.testing.assert_array_equal(slice_range(renumbered, names, 2.5), np.arange(5, 30))


@pytest.mark.parametrize("missing", ["lungs", "bladder"])
def test_slice_range_needs_lungs_and_bladder(missing):
    labels = lungs_bladder_labels()
    names = {k: v for k, v in NAME_INDEX.items() if k != missing}
    with pytest.raises(PreprocessingError, match=f"labels.nii: no label named '{missing}'"):
        slice_range(labels, names, 2.5, source="labels.nii")
    empty = np.where(labels == NAME_INDEX[missing], 0, labels)
    with pytest.raises(PreprocessingError, match=f"label '{missing}' has no voxels"):
        slice_range(empty, NAME_INDEX, 2.5)


def test_a_missing_bladder_names_the_slice_range_override():
    """A scan without a bladder (a thorax, TotalSegmentator's example) stops with the
    override to use, whether the label table lacks the name or the label is empty."""
    labels = lungs_bladder_labels()
    empty = np.where(labels == NAME_INDEX["bladder"], 0, labels)
    names = {k: v for k, v in NAME_INDEX.items() if k != "bladder"}
    for lab, table in ((empty, NAME_INDEX), (labels, names)):
        with pytest.raises(PreprocessingError) as err:
            slice_range(lab, table, 2.5, source="labels.nii")
        assert str(err.value).startswith("labels.nii: ")
        assert str(err.value).endswith(
            "the slice range runs from the bottom of the bladder to the top of the lungs: set "
            "preprocess.slice_range: [lo, hi] (z in mm, or two organ names) for a scan without it"
        )


def test_slice_range_between_organs_or_millimetres():
    labels = lungs_bladder_labels()  # lungs on z 20..29, bladder on 5..8, body on 2..35
    labels[6:10, 5:9, 12:16] = NAME_INDEX["liver"]
    empty = np.where(labels == NAME_INDEX["bladder"], 0, labels)
    # Organ names: the lowest slice of the first, the highest of the second.
    z = slice_range(empty, NAME_INDEX, 2.5, bounds=("liver", "lungs"))
    np.testing.assert_array_equal(z, np.arange(12, 30))
    z = slice_range(empty, NAME_INDEX, 2.5, margins_mm=(5, 5), bounds=("liver", "liver"))
    np.testing.assert_array_equal(z, np.arange(10, 18))
    # Millimetres of world z: slice k's centre at z0 + 2.5 k; both ends on slice centres.
    z = slice_range(empty, NAME_INDEX, 2.5, bounds=(100.0, 125.0), z0_mm=50.0)
    np.testing.assert_array_equal(z, np.arange(20, 31))
    z = slice_range(empty, NAME_INDEX, 2.5, bounds=(101.0, 124.0), z0_mm=50.0)
    np.testing.assert_array_equal(z, np.arange(21, 30))
    # Mixed, and clipped to the image.
    z = slice_range(empty, NAME_INDEX, 2.5, bounds=(-1000, "liver"), z0_mm=50.0)
    np.testing.assert_array_equal(z, np.arange(0, 16))
    # A named organ the scan lacks says which setting named it.
    with pytest.raises(
        PreprocessingError, match=r"no label named 'pancreas' .*\(preprocess.slice_range\)$"
    ):
        slice_range(empty, NAME_INDEX, 2.5, bounds=("liver", "pancreas"))
    with pytest.raises(PreprocessingError, match=r"slice_range \[500, 600\] holds no slice"):
        slice_range(empty, NAME_INDEX, 2.5, bounds=(500, 600))


def test_slice_range_rejects_an_upside_down_image():
    with pytest.raises(PreprocessingError, match="upside down"):
        slice_range(lungs_bladder_labels()[:, :, ::-1], NAME_INDEX, 2.5)


def test_crop_is_centred_on_the_body():
    labels = lungs_bladder_labels()  # body on x 4..15 (centre 9.5), y 3..12 (centre 7.5)
    z = np.arange(5, 30)
    x0, y0 = centre_crop_offsets(labels, z, (8, 6))
    # Crop centre x0 + 3.5 and y0 + 2.5 on the body's centre (half voxels round up).
    assert (x0, y0) == (6, 5)
    # Larger than the body but inside the image: the whole body is in the crop.
    x0, y0 = centre_crop_offsets(labels, z, (14, 12))
    assert (x0, y0) == (3, 2)
    # A crop larger than the image: negative offsets, the image in the middle, zero padding.
    x0, y0 = centre_crop_offsets(labels, z, (24, 20))
    assert (x0, y0) == (-2, -2)
    # Body off-centre near an edge: the crop stays inside the image.
    shifted = np.zeros_like(labels)
    shifted[0:5, 0:4, :] = NAME_INDEX["body"]
    assert centre_crop_offsets(shifted, z, (8, 6)) == (0, 0)


def test_slices_and_crops_match_the_volume_and_go_back():
    rng = np.random.default_rng(0)
    labels = lungs_bladder_labels()
    pet = rng.random((*labels.shape, 3)).astype(np.float32)
    z = slice_range(labels, NAME_INDEX, 2.5, margins_mm=(5, 5))
    for crop in ((8, 6), (24, 20)):  # inside the image; larger than the image (padded)
        x0, y0 = centre_crop_offsets(labels, z, crop)
        tacs, lab = extract_slices(pet, labels, z, (x0, y0), crop)
        assert tacs.shape == (z.size, 3, crop[1], crop[0]) and tacs.dtype == np.float32
        assert lab.shape == (z.size, crop[1], crop[0]) and lab.dtype == np.int16
        # Element by element: tacs[s, t, h, w] == pet[x0 + w, y0 + h, z[s], t], 0 outside.
        for s, t, h, w in [(0, 0, 0, 0), (3, 2, crop[1] - 1, crop[0] - 1), (7, 1, 2, 5)]:
            x, y = x0 + w, y0 + h
            inside = 0 <= x < pet.shape[0] and 0 <= y < pet.shape[1]
            assert tacs[s, t, h, w] == (pet[x, y, z[s], t] if inside else 0)
            assert lab[s, h, w] == (labels[x, y, z[s]] if inside else 0)
        back = slices_to_volume(tacs[:, 0], z, (x0, y0), labels.shape, fill=-1)
        window = np.full(labels.shape, False)
        window[max(x0, 0) : x0 + crop[0], max(y0, 0) : y0 + crop[1], z] = True
        np.testing.assert_array_equal(back[window], pet[..., 0][window])
        assert np.all(back[~window] == -1)
        channels = slices_to_volume(tacs.transpose(0, 1, 2, 3), z, (x0, y0), labels.shape)
        assert channels.shape == (*labels.shape, 3)
    # The whole body fits in the padded crop: nothing of it is lost.
    tacs, lab = extract_slices(pet, labels, z, centre_crop_offsets(labels, z, (24, 20)), (24, 20))
    assert np.sum(lab != 0) == np.sum(labels[:, :, z] != 0)


def test_image_derived_input_is_the_aorta_frame_average():
    """The aorta holds the input's frame averages (Vb = 1); the mean curve must give them
    back at the frame mid-times. Reference: the input averaged over each frame on a fine
    grid (independent of the kinetic model code)."""
    labels = phantom_labels((20, 16, 30), 4.0)
    frames = FrameSchedule.from_durations([10, 20, 30, 60, 120, 300])
    inp = input_function(frames.end_s)
    pet = phantom_activity(labels, frames, inp)
    idif = image_derived_input(pet, labels, NAME_INDEX["aorta"], frames)
    np.testing.assert_array_equal(idif.times_s, frames.mids_s)
    reference = [
        inp(np.linspace(s, s + d, 20001)).mean()
        for s, d in zip(frames.starts_s, frames.durations_s, strict=True)
    ]
    np.testing.assert_allclose(idif.values, reference, rtol=1e-3)
    # Streaming frames gives the same curve.
    streamed = image_derived_input(
        (pet[..., t] for t in range(len(frames))), labels, NAME_INDEX["aorta"], frames
    )
    np.testing.assert_array_equal(streamed.values, idif.values)
    with pytest.raises(PreprocessingError, match="mask is empty"):
        image_derived_input(pet, labels, 99, frames)
