"""Organ-specific inputs of the phantom: delay, exponential dispersion, the liver's dual input.

References are independent of kinpet.organinput: the dispersion and the whole tissue model
as ODEs (scipy solve_ivp, tight tolerances), the delay through kinetics.tacs.
"""

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.integrate import solve_ivp

from kinpet import anatomy, phantom, simulation
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import KinpetInputError, read_organ_values
from kinpet.kinetics import tacs
from kinpet.organinput import OrganInput, exponential_dispersion, organ_input_function

ROOT = Path(__file__).resolve().parents[1]
ORGANS = read_organ_values(ROOT / "config/organ_values.tsv")


def feng_input():
    t = np.concatenate([np.arange(0.0, 240.0), np.arange(240.0, 600.0, 10.0), [900.0, 3600.0]])
    return InputFunction.feng(peak_kbq_per_ml=250.0, delay_s=12.0, end_s=3600.0, times_s=t)


def ode_states(rhs, n_states, knots_s, times_s):
    """solve_ivp piecewise over the input's knots (its kinks), dense output at times_s."""
    out = np.empty((len(times_s), n_states))
    y = np.zeros(n_states)
    for t0, t1 in zip(knots_s[:-1], knots_s[1:], strict=True):
        inside = (times_s >= t0) & (times_s <= t1)
        sol = solve_ivp(
            rhs, (t0, t1), y, method="DOP853", rtol=1e-11, atol=1e-11, dense_output=True
        )
        if inside.any():
            out[inside] = sol.sol(times_s[inside]).T
        y = sol.y[:, -1]
    return out


def test_exponential_dispersion_is_exact_at_the_knots():
    inp = feng_input()
    t, a = inp.knots_s, inp.knot_values
    for tau in (0.5, 4.0, 25.0):
        got = exponential_dispersion(t, a, tau)
        ref = ode_states(lambda s, y, tau=tau: [(inp(s) - y[0]) / tau], 1, t, t)[:, 0]
        assert np.abs(got - ref).max() < 1e-7 * a.max(), tau
    np.testing.assert_array_equal(exponential_dispersion(t, a, 0.0), a)


def test_dual_input_with_dispersion_and_delay_matches_its_ode():
    inp = feng_input()
    organ = OrganInput(delay_s=7.0, dispersion_s=3.0, arterial_fraction=0.25, portal_transit_s=25.0)
    seen = organ_input_function(inp, organ)
    f, tau, tpv = 0.25, 3.0, 25.0

    def rhs(s, y):  # y = (portal, dispersed mix)
        a = inp(s)
        return [(a - y[0]) / tpv, (f * a + (1 - f) * y[0] - y[1]) / tau]

    times = np.concatenate([np.arange(0.0, 400.0, 0.37), [1000.0, 3000.0]])
    ref = ode_states(rhs, 2, inp.knots_s, times)[:, 1]
    got = seen(times + organ.delay_s)
    # Linear between knots 0.5 s apart: the error is at most h^2 / 8 max|D''|, and the
    # dispersed curve's max|D''| <= max|A'| / tau, ~14 kBq/ml/s / 3 s at Feng's first rise:
    # 0.15 kBq/ml, 9e-4 of the peak (the worst is where the bolus arrives).
    assert np.abs(got - ref).max() < 1e-3 * ref.max()
    late = times > 60.0
    assert np.abs(got - ref)[late].max() < 5e-5 * ref.max()  # smooth after the first minute
    assert seen(organ.delay_s - 0.01) == 0.0  # nothing arrives before the delay
    # A unit-area kernel and a unit-sum mix: the area under the curve is kept.
    grid = np.linspace(0.0, 3600.0, 360001)
    assert np.trapezoid(seen(grid), grid) == pytest.approx(np.trapezoid(inp(grid), grid), rel=0.02)
    assert organ_input_function(inp, OrganInput()) is inp


def test_organ_input_rejects_impossible_values():
    with pytest.raises(ValueError, match="arterial_fraction"):
        OrganInput(arterial_fraction=1.5)
    with pytest.raises(ValueError, match="portal_transit_s"):
        OrganInput(arterial_fraction=0.3)
    with pytest.raises(ValueError, match=">= 0"):
        OrganInput(dispersion_s=-1.0)


def write_table(path, **columns):
    table = ORGANS.copy()
    for name, values in columns.items():
        table[name] = [values.get(o, "") for o in table["organ"]]
    table.to_csv(path, sep="\t", index=False)
    return path


def test_organ_table_errors_name_the_file_and_the_organ(tmp_path):
    bad = write_table(tmp_path / "a.tsv", delay_s={"liver": "soon"})
    with pytest.raises(KinpetInputError, match=r"a.tsv: delay_s of liver is not a number"):
        read_organ_values(bad)
    bad = write_table(tmp_path / "b.tsv", arterial_fraction={"liver": 0.25})
    with pytest.raises(KinpetInputError, match=r"b.tsv: organ liver: .*portal_transit_s"):
        read_organ_values(bad)
    empty = read_organ_values(write_table(tmp_path / "c.tsv", delay_s={"liver": 4}))
    inputs = phantom.make_subject("sub-01", size="tiny", organ_values=empty).organ_inputs
    assert inputs["liver"] == OrganInput(delay_s=4.0)
    assert inputs["spleen"] == OrganInput()  # an empty cell: the arterial input


def simulate(root, organ_values):
    sub = phantom.make_subject("sub-01", seed=3, size="tiny", organ_values=organ_values)
    simulation.simulate_subject(sub, root, fwhm_mm=0.0, noise_cov=0.0, log=lambda m: None)
    return sub


def truth_path(root, name):
    return root / "derivatives/truth/sub-01" / f"sub-01_desc-{name}_truth.nii.gz"


def load(path):
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def delayed(tmp_path_factory):
    """A tiny subject whose kidneys see the input 9 s late and whose liver has a dual input."""
    root = tmp_path_factory.mktemp("delayed")
    table = write_table(
        root / "organs.tsv",
        delay_s={"kidneys": 9.0, "liver": 3.0},
        dispersion_s={"liver": 4.0},
        arterial_fraction={"liver": 0.25},
        portal_transit_s={"liver": 25.0},
    )
    return root, simulate(root / "bids", read_organ_values(table))


def organ_voxels(root, organ, n=30):
    bids = root / "bids"
    pet = load(bids / "sub-01/pet/sub-01_pet.nii.gz")
    labels = load(bids / "derivatives/labels/sub-01/sub-01_dseg.nii.gz")
    where = np.argwhere(labels == anatomy.LABEL_INDEX[organ])[:n]
    truth = np.stack([load(truth_path(bids, p)) for p in ("K1", "k2", "k3", "Vb")], -1)
    frames = FrameSchedule.from_bids_json(bids / "sub-01/pet/sub-01_pet.json")
    return pet[tuple(where.T)], truth[tuple(where.T)].astype(np.float64), frames, where, bids


def test_delayed_organ_curves_are_the_model_with_the_delay(delayed):
    root, subject = delayed
    curves, params, frames, where, bids = organ_voxels(root, "kidneys")
    aorta = InputFunction.from_blood_tsv(bids / "sub-01/pet/sub-01_recording-idif_blood.tsv")
    expected = tacs("irreversible_2tc", params, aorta, frames, delay_s=9.0)
    np.testing.assert_allclose(curves, expected, rtol=1e-5, atol=1e-5)
    undelayed = tacs("irreversible_2tc", params, aorta, frames)
    assert np.abs(curves - undelayed).max() > 100 * 1e-5 * np.abs(curves).max()
    assert np.all(load(truth_path(bids, "delay"))[tuple(where.T)] == 9.0)


def test_dual_input_liver_matches_the_whole_model_as_an_ode(delayed):
    """The liver's frame averages against one ODE: portal, dispersed mix, two tissues."""
    root, subject = delayed
    curves, params, frames, where, bids = organ_voxels(root, "liver", n=3)
    aorta = subject.input_function(frames)
    lag, f, tau, tpv = 3.0, 0.25, 4.0, 25.0
    knots = np.unique(np.concatenate([aorta.knots_s + lag, frames.starts_s, frames.ends_s]))
    knots = knots[knots <= frames.end_s]
    for (k1, k2, k3, vb), curve in zip(params, curves, strict=True):

        def rhs(s, y, k1=k1, k2=k2, k3=k3, vb=vb):  # portal, input, C1, C2, integral of C
            a = aorta(s - lag)
            c = (1 - vb) * (y[2] + y[3]) + vb * y[1]
            return [
                (a - y[0]) / tpv,
                (f * a + (1 - f) * y[0] - y[1]) / tau,
                (k1 * y[1] - (k2 + k3) * y[2]) / 60.0,
                k3 * y[2] / 60.0,
                c,
            ]

        ends = ode_states(rhs, 5, knots, np.concatenate([frames.starts_s, frames.ends_s]))
        n = len(frames)
        ref = (ends[n:, 4] - ends[:n, 4]) / frames.durations_s
        assert np.abs(curve - ref).max() < 3e-4 * ref.max()
    seen = [load(truth_path(bids, n))[tuple(where.T)] for n in simulation.INPUT_TRUTH_NAMES]
    np.testing.assert_array_equal(np.stack(seen), [[3.0] * 3, [4.0] * 3, [0.25] * 3, [25.0] * 3])
    organs = pd.read_csv(bids / "derivatives/truth/sub-01/sub-01_organs.tsv", sep="\t")
    liver = organs.set_index("organ").loc["liver"]
    assert (liver["delay_s"], liver["arterial_fraction"]) == (3.0, 0.25)


def test_blood_sees_the_aortic_input_and_zero_inputs_change_no_byte(delayed, tmp_path):
    root, _ = delayed
    curves, params, frames, where, bids = organ_voxels(root, "aorta", n=5)
    assert np.all(load(truth_path(bids, "delay"))[tuple(where.T)] == 0.0)
    assert np.all(load(truth_path(bids, "arterialfraction"))[tuple(where.T)] == 1.0)
    zeros = write_table(tmp_path / "zeros.tsv", delay_s={"liver": 0.0}, dispersion_s={})
    simulate(tmp_path / "a", ORGANS)
    simulate(tmp_path / "b", read_organ_values(zeros))
    pet = "sub-01/pet/sub-01_pet.nii.gz"
    assert (tmp_path / "a" / pet).read_bytes() == (tmp_path / "b" / pet).read_bytes()
