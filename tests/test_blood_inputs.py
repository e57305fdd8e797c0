"""Plasma input for the tissue, whole blood for the Vb term (blood_function)."""

import json
from io import StringIO

import numpy as np
import pandas as pd
import pytest
from test_kinetics import ode_reference

from kinpet.cli import main
from kinpet.fitting import fit
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction, InputFunctionError
from kinpet.kinetics import irreversible_2tc, tacs

FRAMES = FrameSchedule.paper()
PLASMA = InputFunction.feng(peak_kbq_per_ml=250.0, delay_s=5.0, end_s=FRAMES.end_s)
# Whole blood: a lower, later and broader curve than plasma (red cells take FDG up slowly).
WHOLE_BLOOD = InputFunction.feng(peak_kbq_per_ml=180.0, delay_s=9.0, end_s=FRAMES.end_s)
PARAMS = np.array([[0.8, 0.9, 0.05, 0.05], [0.3, 0.4, 0.1, 0.2], [1.1, 2.5, 0.02, 0.3]])


def test_tissue_sees_plasma_and_the_vb_term_whole_blood():
    """Against the ODEs: the tissue curve integrated with the plasma input (Vb = 0), the
    blood term from the whole-blood curve, frame averages and mid-times within 1e-6."""
    tissue_only = PARAMS.copy()
    tissue_only[:, 3] = 0.0
    tissue_avg, tissue_mid = ode_reference(tissue_only, PLASMA, FRAMES)
    blood_avg, blood_mid = ode_reference(np.array([[0.0, 1.0, 1.0, 1.0]]), WHOLE_BLOOD, FRAMES)
    vb = PARAMS[:, 3:]
    for sampling, t, b in (("average", tissue_avg, blood_avg), ("mid", tissue_mid, blood_mid)):
        ref = (1 - vb) * t + vb * b
        got = irreversible_2tc(PARAMS, PLASMA, FRAMES, sampling, blood_function=WHOLE_BLOOD)
        rel = np.abs(got - ref) / np.abs(ref).max(axis=1, keepdims=True)
        assert rel.max() < 1e-6, f"{sampling}: {rel.max():.2e}"
    # The published discrete model is linear in its blood term too.
    paper = irreversible_2tc(PARAMS, PLASMA, FRAMES, "paper", blood_function=WHOLE_BLOOD)
    expected = (1 - vb) * irreversible_2tc(tissue_only, PLASMA, FRAMES, "paper") + vb * (
        irreversible_2tc(np.array([0.0, 1.0, 1.0, 1.0]), WHOLE_BLOOD, FRAMES, "paper")
    )
    np.testing.assert_allclose(paper, expected, rtol=1e-10, atol=1e-10)
    # A delay shifts both curves.
    shifted = tacs("irreversible_2tc", PARAMS, PLASMA, FRAMES, delay_s=6.0,
                   blood_function=WHOLE_BLOOD)  # fmt: skip
    expected = irreversible_2tc(PARAMS, PLASMA.delayed(6.0), FRAMES,
                                blood_function=WHOLE_BLOOD.delayed(6.0))  # fmt: skip
    np.testing.assert_array_equal(shifted, expected)


@pytest.mark.parametrize("method", ["fast", "curve_fit"])
def test_noise_free_parameters_are_recovered_with_both_curves(method):
    """Within 0.1 %; the same curves fitted as if whole blood were the input are not."""
    curves = irreversible_2tc(PARAMS, PLASMA, FRAMES, blood_function=WHOLE_BLOOD)
    result = fit(curves, PLASMA, FRAMES, method=method, blood_function=WHOLE_BLOOD)
    np.testing.assert_allclose(result.params, PARAMS, rtol=1e-3, atol=1e-5)
    one_curve = fit(curves, PLASMA, FRAMES, method=method)
    assert np.all(one_curve.sse > 1e3 * np.maximum(result.sse, 1e-9))


def test_a_fitted_delay_shifts_plasma_and_whole_blood():
    curves = tacs("irreversible_2tc", PARAMS, PLASMA, FRAMES, delay_s=12.4,
                  blood_function=WHOLE_BLOOD)  # fmt: skip
    result = fit(curves, PLASMA, FRAMES, delay_bounds_s=(-5, 25), blood_function=WHOLE_BLOOD)
    np.testing.assert_allclose(result.delay_s, 12.4, atol=0.1)
    np.testing.assert_allclose(result.params, PARAMS, rtol=1e-3, atol=1e-5)


def test_the_published_organ_fit_refuses_a_second_curve():
    with pytest.raises(ValueError, match="curve_fit_paper' takes one input function"):
        fit(np.ones((1, len(FRAMES))), PLASMA, FRAMES, method="curve_fit_paper",
            blood_function=WHOLE_BLOOD)  # fmt: skip


def write_blood(path, columns):
    # On the knots of both curves: the recording is then both curves exactly.
    times = np.union1d(PLASMA.knots_s, WHOLE_BLOOD.knots_s)
    curves = {"plasma_radioactivity": PLASMA, "whole_blood_radioactivity": WHOLE_BLOOD}
    pd.DataFrame({"time": times, **{c: curves[c](times) for c in columns}}).to_csv(
        path, sep="\t", index=False, float_format="%.15g"
    )
    meta = {c: {"Units": "kBq/mL"} for c in columns} | {"time": {"Units": "s"}}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def test_reading_one_or_both_curves(tmp_path):
    both = write_blood(tmp_path / "both_blood.tsv",
                       ["plasma_radioactivity", "whole_blood_radioactivity"])  # fmt: skip
    t = np.array([30.0, 600.0])
    inp, blood, used = InputFunction.from_blood_tsv_pair(both)
    assert used == ("plasma_radioactivity", "whole_blood_radioactivity")
    np.testing.assert_allclose(inp(t), PLASMA(t), rtol=1e-9)
    np.testing.assert_allclose(blood(t), WHOLE_BLOOD(t), rtol=1e-9)
    inp, blood, used = InputFunction.from_blood_tsv_pair(both, column="whole_blood")
    assert blood is None and used == ("whole_blood_radioactivity",)
    np.testing.assert_allclose(inp(t), WHOLE_BLOOD(t), rtol=1e-9)
    plasma_only = write_blood(tmp_path / "p_blood.tsv", ["plasma_radioactivity"])
    inp, blood, used = InputFunction.from_blood_tsv_pair(plasma_only)
    assert blood is None and used == ("plasma_radioactivity",)
    neither = tmp_path / "n_blood.tsv"
    pd.DataFrame({"time": [0, 1], "aif": [0, 1]}).to_csv(neither, sep="\t", index=False)
    with pytest.raises(InputFunctionError, match="n_blood.tsv: no column 'whole_blood_radio"):
        InputFunction.from_blood_tsv_pair(neither)


def test_fit_tacs_uses_both_curves_of_a_blood_recording(tmp_path, capsys):
    both = write_blood(tmp_path / "sub-01_blood.tsv",
                       ["plasma_radioactivity", "whole_blood_radioactivity"])  # fmt: skip
    pet_json = tmp_path / "sub-01_pet.json"
    pet_json.write_text(json.dumps(FRAMES.to_bids()))
    curves = irreversible_2tc(PARAMS, PLASMA, FRAMES, blood_function=WHOLE_BLOOD)
    tissue = tmp_path / "tissue.tsv"
    pd.DataFrame({f"r{i}": c for i, c in enumerate(curves)}).to_csv(tissue, sep="\t", index=False)
    args = ["fit-tacs", "--pet-json", str(pet_json), "--blood-tsv", str(both), "--tsv",
            str(tissue), "--units", "kBq/ml"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "plasma_radioactivity is the tissue's input, whole_blood_radioactivity" in captured.err
    table = pd.read_csv(StringIO(captured.out), sep="\t")
    np.testing.assert_allclose(table[["K1", "k2", "k3", "Vb"]], PARAMS, rtol=1e-3, atol=1e-5)
    assert main([*args, "--blood-column", "plasma"]) == 0
    one = pd.read_csv(StringIO(capsys.readouterr().out), sep="\t")
    assert (one.SSE > 100 * table.SSE.clip(lower=1e-6)).all()
