"""Patlak's graphical method (kinpet.patlak) against independent references."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import linregress

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import irreversible_2tc
from kinpet.patlak import patlak, patlak_coordinates

FRAMES = FrameSchedule.paper()
INPUT = InputFunction.feng(peak_kbq_per_ml=250.0, delay_s=5.0, end_s=FRAMES.end_s)
# Liver-, kidney-, brain-, spleen-like and a slow-exchange, no-blood curve.
PARAMS = np.array([[0.8, 0.9, 0.05, 0.05], [0.3, 0.4, 0.1, 0.04], [0.1, 0.15, 0.06, 0.03],
                   [1.1, 2.7, 0.01, 0.03], [0.6, 0.5, 0.01, 0.0]])  # fmt: skip


def test_coordinates_are_the_frame_averages_of_the_input_and_its_integral():
    """Against the trapezoid rule on a 0.05-s grid (its own error, near the bolus peak, up
    to ~5e-5 of the values)."""
    blood, integral = patlak_coordinates(INPUT, FRAMES)
    t = np.arange(0, FRAMES.end_s + 1e-9, 0.05)
    a = INPUT(t)
    cumulative = np.concatenate([[0], np.cumsum((a[1:] + a[:-1]) / 2 * np.diff(t))]) / 60.0
    for k in range(len(FRAMES)):
        inside = (t >= FRAMES.starts_s[k]) & (t <= FRAMES.ends_s[k])
        duration = FRAMES.durations_s[k]
        average_a = np.trapezoid(a[inside], t[inside]) / duration
        average_cumulative = np.trapezoid(cumulative[inside], t[inside]) / duration
        assert blood[k] == pytest.approx(average_a, rel=1e-4)
        assert integral[k] == pytest.approx(average_cumulative, rel=1e-4, abs=1e-9)


def test_the_line_is_scipys_least_squares_line():
    rng = np.random.default_rng(1)
    curves = irreversible_2tc(PARAMS, INPUT, FRAMES) * (1 + 0.03 * rng.standard_normal((5, 62)))
    r = patlak(curves, INPUT, FRAMES, t_star_min=20.0)
    blood, integral = patlak_coordinates(INPUT, FRAMES)
    use = FRAMES.mids_min >= 20.0
    assert r.frames_used == use.sum() == 9
    for i, y in enumerate(curves):
        ref = linregress(integral[use] / blood[use], y[use] / blood[use])
        assert r.ki[i] == pytest.approx(ref.slope, rel=1e-12)
        assert r.intercept[i] == pytest.approx(ref.intercept, rel=1e-10)
        assert r.r2[i] == pytest.approx(ref.rvalue**2, rel=1e-10)


def test_noise_free_slope_is_one_minus_vb_times_ki_plus_the_free_compartments_lag():
    """The model's curve is (1 - Vb) (Ki int A + K1 k2 / beta E_beta) + Vb A, with E_beta
    the input convolved with exp(-beta t). Divided by A and regressed on int A / A, the
    slope is (1 - Vb) Ki plus (1 - Vb) K1 k2 / beta times the slope of E_beta / A: the
    free compartment has not settled to a constant multiple of the input. That bias
    shrinks as t* grows; at the usual t* = 20 min it is within 3 % here."""
    curves = irreversible_2tc(PARAMS, INPUT, FRAMES)
    ki = PARAMS[:, 0] * PARAMS[:, 2] / (PARAMS[:, 1] + PARAMS[:, 2])
    blood, integral = patlak_coordinates(INPUT, FRAMES)
    biases = []
    for t_star in (10.0, 20.0, 30.0, 40.0):
        r = patlak(curves, INPUT, FRAMES, t_star)
        use = FRAMES.mids_min >= t_star
        x = integral[use] / blood[use]
        for i, (k1, k2, k3, vb) in enumerate(PARAMS):
            beta = k2 + k3
            e_beta = irreversible_2tc(np.array([1.0, beta, 0.0, 0.0]), INPUT, FRAMES)
            lag = linregress(x, e_beta[use] / blood[use]).slope
            expected = (1 - vb) * (ki[i] + k1 * k2 / beta * lag)
            assert r.ki[i] == pytest.approx(expected, rel=1e-9)
        biases.append(np.abs(r.ki / ((1 - PARAMS[:, 3]) * ki) - 1))
    biases = np.array(biases)  # [t*, curve]
    assert (np.diff(biases, axis=0) < 0).all()
    assert biases[1].max() < 0.03 and biases[3].max() < 0.01


def test_too_few_frames_after_t_star():
    with pytest.raises(ValueError, match="at least 2 frames after t\\* = 64 min"):
        patlak(np.ones(62), INPUT, FRAMES, t_star_min=64.0)


def test_fit_tacs_patlak_on_real_curves(real_tacs_path, tmp_path, capsys):
    """Grey matter (irreversible FDG uptake): the Patlak line fits (r2 > 0.99) and its Ki is
    within 15 % of the two-tissue fit's (0.041 /min); options of the compartment fit are
    refused with --model patlak."""
    from kinpet.cli import main

    out = tmp_path / "patlak.tsv"
    base = ["fit-tacs", "--tsv", str(real_tacs_path), "--model", "patlak"]
    assert main([*base, "-o", str(out)]) == 0
    table = pd.read_csv(out, sep="\t").set_index("region")
    assert list(table.columns) == ["Ki", "V0", "r2", "frames", "ok", "status"]
    assert table.ok.all() and (table.status == "ok").all()
    gm = table.loc["grey_matter_bq_per_ml"]
    assert gm.r2 > 0.99 and gm.Ki == pytest.approx(0.041, rel=0.15) and gm.frames >= 5
    assert main([*base, "--t-star", "30", "-o", str(out)]) == 0
    assert pd.read_csv(out, sep="\t").frames.iloc[0] < gm.frames
    capsys.readouterr()
    assert main([*base, "--fixed", "Vb=0.05"]) == 2
    assert "--fixed does not apply" in capsys.readouterr().err
