"""The reversible two-tissue model (kinetics.reversible_2tc, kinpet.modelfit)."""

import numpy as np
import pandas as pd
import pytest
from test_kinetics import ode_reference

from kinpet.cli import main
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import irreversible_2tc, reversible_2tc, reversible_rates, tacs
from kinpet.modelfit import fit_reversible, rates_to_parameters

FRAMES = FrameSchedule.paper()
INPUT = InputFunction.feng(peak_kbq_per_ml=250.0, delay_s=5.0, end_s=FRAMES.end_s)


def random_reversible(n, seed):
    rng = np.random.default_rng(seed)
    return np.column_stack([
        rng.uniform(0.05, 1.5, n), rng.uniform(0.1, 2.5, n), rng.uniform(0.02, 0.5, n),
        rng.uniform(0.005, 0.1, n), rng.uniform(0.01, 0.2, n),
    ])  # fmt: skip


@pytest.mark.parametrize("delay_s", [0.0, 14.0])
def test_reversible_model_equals_the_ode_solution(delay_s):
    """Frame averages and mid-times within 1e-6 of the peak, with and without delay."""
    params = random_reversible(40, seed=3)
    ref_avg, ref_mid = ode_reference(params, INPUT, FRAMES, delay_s)
    for sampling, ref in (("average", ref_avg), ("mid", ref_mid)):
        got = tacs("reversible_2tc", params, INPUT, FRAMES, sampling, delay_s=delay_s)
        rel = np.abs(got - ref) / np.abs(ref).max(axis=1, keepdims=True)
        assert rel.max() < 1e-6, f"{sampling}: {rel.max():.2e}"


def test_k4_zero_is_the_irreversible_model_and_rates_round_trip():
    params = random_reversible(20, seed=4)
    params[:, 3] = 0.0
    np.testing.assert_allclose(
        reversible_2tc(params, INPUT, FRAMES),
        irreversible_2tc(params[:, [0, 1, 2, 4]], INPUT, FRAMES),
        rtol=1e-10, atol=1e-10,
    )  # fmt: skip
    p = random_reversible(50, seed=5)
    a1, a2 = reversible_rates(p[:, 1], p[:, 2], p[:, 3])
    np.testing.assert_allclose(a1 + a2, p[:, 1] + p[:, 2] + p[:, 3])
    np.testing.assert_allclose(a1 * a2, p[:, 1] * p[:, 3])
    k1, k34 = p[:, 0], p[:, 2] + p[:, 3]
    d1 = (1 - p[:, 4]) * k1 * (k34 - a1) / (a2 - a1)
    d2 = (1 - p[:, 4]) * k1 * (a2 - k34) / (a2 - a1)
    np.testing.assert_allclose(rates_to_parameters(a1, a2, p[:, 4], d1, d2), p, rtol=1e-9)


@pytest.mark.parametrize("method, n", [("fast", 40), ("curve_fit", 8)])
def test_noise_free_parameters_are_recovered(method, n):
    truth = random_reversible(n, seed=6)
    result = fit_reversible(tacs("reversible_2tc", truth, INPUT, FRAMES), INPUT, FRAMES,
                            method=method)  # fmt: skip
    assert result.ok.all()
    np.testing.assert_allclose(result.params, truth, rtol=1e-3)


def test_fast_is_as_good_as_curve_fit_on_noisy_curves():
    """The fast fitter's SSE is at most 1.001 x curve_fit's (started from the same grid)
    on at least 99 % of noisy curves."""
    rng = np.random.default_rng(7)
    clean = tacs("reversible_2tc", random_reversible(40, seed=7), INPUT, FRAMES)
    noisy = clean + rng.normal(size=clean.shape) * np.sqrt(np.maximum(clean, 1.0))
    fast = fit_reversible(noisy, INPUT, FRAMES, method="fast")
    slow = fit_reversible(noisy, INPUT, FRAMES, method="curve_fit")
    assert fast.ok.all() and slow.ok.all()
    assert np.mean(fast.sse <= 1.001 * slow.sse) >= 0.99


def test_noise_free_parameters_and_delay_are_recovered():
    """With a fitted input delay: the parameters within 0.1 % and the delay within 0.1 s,
    for a delay on and off the grid of delays (1 s apart)."""
    from kinpet.modelfit import fit_model

    truth = random_reversible(2, seed=11)
    delays = np.array([4.0, 12.6])
    curves = np.concatenate(
        [
            tacs("reversible_2tc", truth[i : i + 1], INPUT, FRAMES, delay_s=d)
            for i, d in enumerate(delays)
        ]
    )
    result = fit_model(curves, "reversible_2tc", INPUT, FRAMES, delay_bounds_s=(0, 16))
    assert result.ok.all()
    np.testing.assert_allclose(result.delay_s, delays, atol=0.1)
    np.testing.assert_allclose(result.params, truth, rtol=1e-3)
    assert np.isnan(result.ki).all()  # not defined for this model
    assert list(result.as_dict())[:6] == ["K1", "k2", "k3", "k4", "Vb", "delay_s"]


def test_fixed_parameters_and_bounds():
    truth = random_reversible(10, seed=8)
    truth[:, 4] = 0.05
    result = fit_reversible(tacs("reversible_2tc", truth, INPUT, FRAMES), INPUT, FRAMES,
                            fixed={"Vb": 0.05})  # fmt: skip
    assert (result.params[:, 4] == 0.05).all()
    np.testing.assert_allclose(result.params, truth, rtol=1e-3)
    with pytest.raises(ValueError, match=r"fixed \['Ki'\]: not a parameter of reversible_2tc"):
        fit_reversible(np.ones(len(FRAMES)), INPUT, FRAMES, fixed={"Ki": 0.1})
    with pytest.raises(ValueError, match="each 5 numbers"):
        fit_reversible(np.ones(len(FRAMES)), INPUT, FRAMES, bounds=([0] * 4, [1] * 4))


def test_fit_tacs_reversible_on_real_curves(real_tacs_path, tmp_path, capsys):
    """Columns K1, k2, k3, k4, Vb, VT, VS; with k4 the grey matter fits better than
    without it (a nested model: SSE at most the irreversible fit's)."""
    out, two = tmp_path / "rev.tsv", tmp_path / "irr.tsv"
    base = ["fit-tacs", "--tsv", str(real_tacs_path)]
    assert main([*base, "--model", "reversible_2tc", "-o", str(out)]) == 0
    assert main([*base, "-o", str(two)]) == 0
    rev = pd.read_csv(out, sep="\t").set_index("region")
    irr = pd.read_csv(two, sep="\t").set_index("region")
    assert list(rev.columns) == ["K1", "k2", "k3", "k4", "Vb", "VT", "VS", "SSE", "ok", "status"]
    assert (rev.SSE <= irr.SSE * (1 + 1e-6)).all() and rev.ok.all()
    np.testing.assert_allclose(rev.VT, rev.K1 / rev.k2 * (1 + rev.k3 / rev.k4), rtol=1e-4)
    delayed = tmp_path / "delayed.tsv"
    args = [*base, "--model", "reversible_2tc", "--fit-delay", "-10", "40", "-o", str(delayed)]
    assert main(args) == 0
    fit = pd.read_csv(delayed, sep="\t").set_index("region")
    assert "delay_s" in fit.columns and fit.ok.all()
    assert fit.delay_s.between(-10, 40).all()
    assert (fit.SSE <= rev.SSE * (1 + 1e-6)).all()  # delay 0 is one of the candidates
