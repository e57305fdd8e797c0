"""The model registry (kinpet.models) and kinetics.tacs against independent references."""

import numpy as np
import pandas as pd
import pytest
from test_kinetics import ode_reference

from kinpet.fitting import fit
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import irreversible_2tc, tacs
from kinpet.models import MODELS, get_model, result_columns

FRAMES = FrameSchedule.paper()
INPUT = InputFunction.feng(peak_kbq_per_ml=250.0, delay_s=5.0, end_s=FRAMES.end_s)
# One-tissue curves (K1, k2, Vb): slow, brain-like and fast, spleen-like exchange.
ONE_TC = np.array([[0.1, 0.15, 0.03], [0.5, 0.6, 0.05], [1.1, 2.5, 0.02]])


def test_one_tc_equals_the_ode_solution_without_the_bound_compartment():
    """K1 exp(-k2 t) convolved with the input, through the ODEs with k3 = 0, with and
    without a delay: frame averages within 1e-6 of the peak."""
    four = np.column_stack([ONE_TC[:, 0], ONE_TC[:, 1], np.zeros(3), ONE_TC[:, 2]])
    for delay_s in (0.0, 8.5):
        ref, _ = ode_reference(four, INPUT, FRAMES, delay_s)
        got = tacs("one_tc", ONE_TC, INPUT, FRAMES, delay_s=delay_s)
        rel = np.abs(got - ref) / np.abs(ref).max(axis=1, keepdims=True)
        assert rel.max() < 1e-6, f"delay {delay_s} s: {rel.max():.2e}"


def test_tacs_of_the_two_tissue_model_is_irreversible_2tc_with_the_delayed_input():
    params = np.array([[0.8, 0.9, 0.05, 0.05], [0.3, 0.4, 0.1, 0.04]])
    for sampling in ("average", "mid"):
        np.testing.assert_array_equal(
            tacs("irreversible_2tc", params, INPUT, FRAMES, sampling, delay_s=4.0),
            irreversible_2tc(params, INPUT.delayed(4.0), FRAMES, sampling),
        )


@pytest.mark.parametrize("method", ["fast", "curve_fit"])
def test_one_tc_fit_recovers_noise_free_parameters(method):
    """Fitting the two-tissue model with the one-tissue model's held k3 = 0 returns the
    one-tissue parameters of noise-free curves, and VT = K1 / k2."""
    model = get_model("one_tc")
    curves = tacs("one_tc", ONE_TC, INPUT, FRAMES)
    result = fit(curves, INPUT, FRAMES, method=method, fixed=model.held)
    columns = result_columns(model, result)
    assert list(columns) == ["K1", "k2", "Vb", "VT", "SSE", "ok", "status"]
    got = np.column_stack([columns[name] for name in model.parameters])
    np.testing.assert_allclose(got, ONE_TC, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(columns["VT"], ONE_TC[:, 0] / ONE_TC[:, 1], rtol=3e-3)
    assert np.all(result.params[:, 2] == 0.0)


def test_registry_names_shapes_and_macro_parameters():
    assert set(MODELS) == {"irreversible_2tc", "reversible_2tc", "one_tc"}
    with pytest.raises(ValueError, match="unknown kinetic model 'srtm'; known: irreversible"):
        get_model("srtm")
    with pytest.raises(ValueError, match="one_tc has 3 parameters"):
        tacs("one_tc", np.ones((2, 4)), INPUT, FRAMES)
    two = get_model("irreversible_2tc")
    p = np.array([[0.8, 0.9, 0.1, 0.05]])
    assert two.macro["Ki"](p)[0] == pytest.approx(0.8 * 0.1 / 1.0)
    np.testing.assert_array_equal(two.from_irreversible(two.to_irreversible(p)), p)
    for m in MODELS.values():
        assert len(m.lower) == len(m.upper) == len(m.parameters)
        assert set(m.units) >= set(m.parameters) | set(m.macro)


def test_fit_tacs_one_tc(real_tacs_path, tmp_path, capsys):
    """fit-tacs --model one_tc on the real curves writes K1, k2, Vb and VT (no k3, no Ki);
    without the bound compartment grey matter (irreversible uptake) fits worse than with
    it. --fixed of a parameter the model does not have is refused, naming the model."""
    from kinpet.cli import main

    out, two = tmp_path / "one.tsv", tmp_path / "two.tsv"
    base = ["fit-tacs", "--tsv", str(real_tacs_path)]
    assert main([*base, "--model", "one_tc", "-o", str(out)]) == 0
    assert main([*base, "-o", str(two)]) == 0
    one = pd.read_csv(out, sep="\t").set_index("region")
    assert list(one.columns) == ["K1", "k2", "Vb", "VT", "SSE", "ok", "status"]
    np.testing.assert_allclose(one.VT, one.K1 / one.k2, rtol=1e-5)
    gm = "grey_matter_bq_per_ml"
    assert one.SSE[gm] > 2 * pd.read_csv(two, sep="\t").set_index("region").SSE[gm]
    capsys.readouterr()
    assert main([*base, "--model", "one_tc", "--fixed", "k3=0.1"]) == 2
    assert "not a parameter of one_tc" in capsys.readouterr().err
