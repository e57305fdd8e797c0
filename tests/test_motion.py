"""Respiratory motion of the phantom: displacement, phase weights, frame averages, the image.

References: scipy.ndimage (map_coordinates, shift), the breathing cycle integrated by hand.
"""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.integrate import quad
from scipy.ndimage import gaussian_filter, map_coordinates, shift

from kinpet import anatomy, phantom, simulation
from kinpet.io import read_organ_values
from kinpet.motion import (
    Breathing,
    bin_states,
    breathing_profile,
    breathing_state,
    cardiac_blur,
    displaced,
    frame_average,
    frame_states,
    heart_mask,
    phase_weights,
    stretch_profile,
)

ROOT = Path(__file__).resolve().parents[1]
ORGANS = read_organ_values(ROOT / "config/organ_values.tsv")


def test_displacement_equals_scipys_linear_interpolation():
    rng = np.random.default_rng(0)
    image = rng.random((20, 16, 5))
    dz = np.linspace(-2.7, 1.3, 20)
    dy = np.linspace(0.4, -3.6, 20)
    z, y, x = np.meshgrid(*(np.arange(n) for n in image.shape), indexing="ij")
    coords = np.stack([z - dz[:, None, None], y - dy[:, None, None], x])
    expected = map_coordinates(image, coords, order=1, mode="constant", cval=0.0)
    inside = (coords[0] >= 0) & (coords[0] <= 19) & (coords[1] >= 0) & (coords[1] <= 15)
    got = displaced(image, dz, dy)
    np.testing.assert_allclose(got[inside], expected[inside], atol=1e-12)
    assert np.all(got[(coords[0] < -1) | (coords[1] < -1)] == 0)  # from outside: 0


def test_phase_weights_are_the_time_in_each_bin():
    period, bins = 4.0, 8
    np.testing.assert_allclose(phase_weights(0.0, 300.0, period, bins), np.full(8, 1 / 8))
    # 0.5-s bins; a frame from 3.25 to 5 s: half of bin 6, then bins 7, 0 and 1 whole.
    w = phase_weights(3.25, 5.0, period, bins)
    np.testing.assert_allclose(w, np.array([0.5, 0.5, 0, 0, 0, 0, 0.25, 0.5]) / 1.75)
    assert w.sum() == pytest.approx(1.0)
    # The bins' mean state approaches the cycle's mean of sin^2: 1/2.
    assert phase_weights(1.0, 41.0, period, bins) @ bin_states(period, bins) == pytest.approx(0.5)
    mean_state = quad(lambda t: breathing_state(t, period), 0, period)[0] / period
    assert mean_state == pytest.approx(0.5)


def test_stretch_profile_is_one_at_the_dome_and_zero_outside():
    z = np.array([-10.0, 0.0, 50.0, 100.0, 150.0, 200.0, 250.0])
    np.testing.assert_allclose(stretch_profile(z, 200.0, 100.0, 0.0), [0, 0, 0.5, 1, 0.5, 0, 0])
    with pytest.raises(ValueError, match="lower pole"):
        stretch_profile(z, 100.0, 200.0, 0.0)


def test_frame_average_is_the_mean_of_the_displaced_copies_by_hand():
    """One 4-s frame (one cycle, 4 bins) of a block moving as a whole (w = 1): the mean of
    four copies shifted by scipy by the bins' states, computed here by hand."""
    image = np.zeros((30, 20, 4))
    image[10:18, 6:12] = 5.0
    motion = Breathing(amplitude_z_mm=8.0, amplitude_y_mm=4.0, period_s=4.0, bins=4)
    voxel = 2.0
    got = frame_average(image, 0.0, 4.0, motion, np.ones(30), voxel)
    # States at the bins' middles (0.5, 1.5, 2.5, 3.5 s): sin^2(pi/8), sin^2(3pi/8), ...
    states = np.sin(np.pi * np.array([0.5, 1.5, 2.5, 3.5]) / 4.0) ** 2
    copies = [shift(image, (-s * 8.0 / voxel, -s * 4.0 / voxel, 0), order=1) for s in states]
    np.testing.assert_allclose(got, np.mean(copies, axis=0), atol=1e-12)
    assert got.sum() == pytest.approx(image.sum())  # nothing left the field of view
    assert np.array_equal(frame_average(image, 0, 4, Breathing(), np.ones(30), voxel), image)


def test_breathing_settings_are_checked():
    with pytest.raises(ValueError, match="period_s"):
        Breathing(amplitude_z_mm=10, period_s=0)
    with pytest.raises(ValueError, match="bins"):
        Breathing(bins=1)
    with pytest.raises(ValueError, match="cardiac_fwhm_mm"):
        Breathing(cardiac_fwhm_mm=-1.0)


def simulate(root, motion):
    sub = phantom.make_subject("sub-01", seed=3, size="tiny", organ_values=ORGANS)
    simulation.simulate_subject(
        sub, root, fwhm_mm=0.0, noise_cov=0.0, log=lambda m: None, motion=motion
    )
    image = np.asarray(nib.load(root / "sub-01/pet/sub-01_pet.nii.gz").dataobj)
    labels = np.asarray(nib.load(root / "derivatives/labels/sub-01/sub-01_dseg.nii.gz").dataobj)
    return image, labels, sub


def test_amplitude_zero_is_byte_identical_and_motion_moves_the_liver(tmp_path):
    still, labels, sub = simulate(tmp_path / "off", None)
    simulate(tmp_path / "zero", Breathing(period_s=5.0))
    pet = "sub-01/pet/sub-01_pet.nii.gz"
    assert (tmp_path / "off" / pet).read_bytes() == (tmp_path / "zero" / pet).read_bytes()
    motion = Breathing(amplitude_z_mm=12.0, amplitude_y_mm=4.0, period_s=4.0)
    moving, _, _ = simulate(tmp_path / "on", motion)
    # A late frame (300 s, x y z t): the moving image is the frame average of the still one.
    labels_zyx = np.transpose(labels, (2, 1, 0))
    profile = breathing_profile(labels_zyx, sub.grid.axis(2), "tiny")
    frame = np.transpose(still[..., -1], (2, 1, 0))
    frames = simulation.FrameSchedule.paper()
    expected = frame_average(
        frame, frames.starts_s[-1], frames.ends_s[-1], motion, profile, sub.grid.voxel_mm
    )
    np.testing.assert_allclose(
        np.transpose(moving[..., -1], (2, 1, 0)), expected, rtol=1e-5, atol=1e-5
    )
    liver = labels == anatomy.LABEL_INDEX["liver"]
    # Blurred along z: the liver's top loses activity, the pelvis (w = 0) does not move.
    assert moving[..., -1][liver].mean() < 0.99 * still[..., -1][liver].mean()
    bladder = labels == anatomy.LABEL_INDEX["bladder"]
    np.testing.assert_array_equal(moving[bladder], still[bladder])
    sidecar = (tmp_path / "on/sub-01/pet/sub-01_pet.json").read_text()
    assert '"AmplitudeZmm": 12.0' in sidecar


def test_frame_states_against_a_fine_time_grid():
    """The motion trace of the phantom figure: each frame's mean state equals the mean,
    over a fine time grid, of the state of the phase bin each instant falls in; frames of
    whole cycles (and the 2-s frames, half a 4-s cycle) record the cycle mean, 0.5."""
    breathing = Breathing(12.0, 5.0, 4.0, 8)
    starts = np.array([0.0, 0.3, 2.0, 7.1, 60.0])
    durations = np.array([0.5, 1.7, 2.0, 0.9, 300.0])
    got = frame_states(starts, durations, breathing)
    states = bin_states(4.0, 8)
    for t0, d, value in zip(starts, durations, got, strict=True):
        t = t0 + (np.arange(200_000) + 0.5) / 200_000 * d
        bins = np.floor((t / 4.0 % 1.0) * 8).astype(int)
        assert value == pytest.approx(states[bins].mean(), abs=1e-4)
    assert got[2] == pytest.approx(0.5, abs=1e-12)
    assert got[4] == pytest.approx(0.5, abs=1e-12)


def test_cardiac_blur_spreads_only_the_heart_and_keeps_its_activity():
    """The heart part, blurred by scipy's Gaussian by hand, plus the untouched rest; the
    total activity is kept (the heart lies away from the edges); vessels outside the heart's
    box do not beat."""
    labels = np.full((30, 30, 30), anatomy.LABEL_INDEX["body"], dtype=np.int16)
    labels[13:17, 13:17, 13:17] = anatomy.LABEL_INDEX["heart"]
    labels[14:16, 14:16, 14:16] = anatomy.LABEL_INDEX["heart_blood"]  # a chamber
    labels[2, 2, :] = anatomy.LABEL_INDEX["heart_blood"]  # a vein far from the heart
    heart = heart_mask(labels)
    assert heart.sum() == 4**3 and not heart[2, 2, :].any()
    image = np.where(labels == anatomy.LABEL_INDEX["body"], 1.0, 5.0).astype(np.float32)
    out = cardiac_blur(image, heart, fwhm_mm=6.0, voxel_mm=1.5)
    part = np.where(heart, image, 0.0)
    sigma = 6.0 / (2 * np.sqrt(2 * np.log(2))) / 1.5
    expected = image - part + gaussian_filter(part, sigma, mode="constant")
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out.sum() == pytest.approx(image.sum(), rel=1e-6)
    assert out[heart].mean() < image[heart].mean()  # the beat smears the wall outwards
    # scipy truncates the kernel at 4 sigma (7 voxels here): beyond it, nothing changes
    np.testing.assert_array_equal(out[:, :, :5], image[:, :, :5])
    assert cardiac_blur(image, heart, 0.0, 1.5) is image


def test_cardiac_blur_alone_in_the_simulation(tmp_path):
    """Cardiac blur without breathing: each frame is the still frame with the heart spread
    (kinpet.motion.cardiac_blur by hand), and the sidecar records it."""
    still, labels, _ = simulate(tmp_path / "off", None)
    beating, _, _ = simulate(tmp_path / "beat", Breathing(cardiac_fwhm_mm=8.0))
    labels_zyx = np.transpose(labels, (2, 1, 0))
    frame = np.transpose(still[..., -1], (2, 1, 0))
    expected = cardiac_blur(
        frame,
        heart_mask(labels_zyx),
        8.0,
        phantom.make_subject("sub-01", seed=3, size="tiny", organ_values=ORGANS).grid.voxel_mm,
    )
    np.testing.assert_allclose(
        np.transpose(beating[..., -1], (2, 1, 0)), expected, rtol=1e-5, atol=1e-5
    )
    assert not np.array_equal(beating, still)
    sidecar = (tmp_path / "beat/sub-01/pet/sub-01_pet.json").read_text()
    assert '"CardiacBlurFWHMmm": 8.0' in sidecar
