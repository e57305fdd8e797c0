import json
import time

import numpy as np
import pytest

from kinpet.frames import FrameSchedule, FrameScheduleError
from kinpet.inputfunction import (
    KNOT_TOLERANCE,
    MAX_KNOTS,
    InputFunction,
    InputFunctionError,
    feng_model,
    feng_peak,
)
from kinpet.kinetics import KineticModel


def test_paper_schedule():
    f = FrameSchedule.paper()
    assert len(f) == 62
    assert f.end_s == 3900.0
    # 2x10 s, 30x2 s, 4x10 s, 8x30 s, 4x60 s, 5x120 s, 9x300 s, contiguous from 0.
    counts = [(10.0, 2), (2.0, 30), (10.0, 4), (30.0, 8), (60.0, 4), (120.0, 5), (300.0, 9)]
    expected = np.concatenate([[d] * n for d, n in counts])
    np.testing.assert_array_equal(f.durations_s, expected)
    np.testing.assert_array_equal(f.starts_s[1:], f.ends_s[:-1])
    assert f.starts_s[2] == 20.0 and f.durations_min[-1] == 5.0


def test_bids_json_round_trip(tmp_path):
    path = tmp_path / "sub-01_pet.json"
    path.write_text(json.dumps({**FrameSchedule.paper().to_bids(), "Units": "kBq/mL"}))
    assert FrameSchedule.from_bids_json(path) == FrameSchedule.paper()


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"FrameTimesStart": [0, 10]}, "missing PET-BIDS field"),
        ({"FrameTimesStart": [0, 10], "FrameDuration": [10]}, "2 frame start times but 1"),
        ({"FrameTimesStart": [0, 10], "FrameDuration": [10, 0]}, "durations must be > 0"),
        ({"FrameTimesStart": [0, 5], "FrameDuration": [10, 10]}, "must not overlap"),
        ({"FrameTimesStart": [10, 0], "FrameDuration": [5, 5]}, "ordered"),
        ({"FrameTimesStart": [0, "x"], "FrameDuration": [5, 5]}, "not numbers"),
        ({"FrameTimesStart": [-5, 0], "FrameDuration": [5, 5]}, "before injection"),
    ],
)
def test_bad_sidecars_name_the_file(tmp_path, meta, message):
    path = tmp_path / "sub-07_pet.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(FrameScheduleError, match=message) as err:
        FrameSchedule.from_bids_json(path)
    assert str(path) in str(err.value)


def test_schedules_in_minutes_with_7_significant_digits_load():
    """Starts and ends written in minutes to 7 significant digits, as kinfitr's and PETPAL's
    tables carry them: neighbouring frames then overlap or gap by rounding, which is
    accepted; a schedule shifted by a whole 2-s frame is not."""
    paper = FrameSchedule.paper()
    starts_min = np.array([float(f"{x:.7g}") for x in paper.starts_min])
    ends_min = np.array([float(f"{x:.7g}") for x in paper.ends_s / 60.0])
    frames = FrameSchedule(starts_min * 60.0, (ends_min - starts_min) * 60.0)
    np.testing.assert_allclose(frames.starts_s, paper.starts_s, atol=1e-3)
    # Durations rounded on their own (0.03333333 min for 2 s) accumulate: a 6-ms overlap
    # between 2-s frames (0.3 % of a frame) is rounding too.
    starts = paper.starts_s.copy()
    starts[10] -= 0.006
    FrameSchedule(starts, paper.durations_s)
    starts[10] -= 0.1  # 106 ms: 5 % of the 2-s frames
    with pytest.raises(FrameScheduleError, match=r"0.106 s before frame 9 ends .* 0.02 s"):
        FrameSchedule(starts, paper.durations_s)


def test_unreadable_sidecar(tmp_path):
    path = tmp_path / "bad_pet.json"
    path.write_text("{not json")
    with pytest.raises(FrameScheduleError, match="not valid JSON"):
        FrameSchedule.from_bids_json(path)
    with pytest.raises(FrameScheduleError, match="not found"):
        FrameSchedule.from_bids_json(tmp_path / "missing.json")


def test_gaps_between_frames_are_allowed():
    f = FrameSchedule([0, 60, 600], [60, 60, 300])
    assert f.end_s == 900


def test_input_is_piecewise_linear_zero_at_start_and_held():
    inp = InputFunction([10.0, 20.0, 40.0], [100.0, 50.0, 10.0])
    np.testing.assert_allclose(
        inp([0.0, 5.0, 10.0, 15.0, 30.0, 40.0, 1000.0]), [0.0, 50.0, 100.0, 75.0, 30.0, 10.0, 10.0]
    )
    assert inp.knots_s[0] == 0.0 and inp.times_s[0] == 10.0


@pytest.mark.parametrize(
    "times, values, message",
    [
        ([0, 10, 10], [0, 1, 2], "strictly increasing"),
        ([0, 20, 10], [0, 1, 2], "strictly increasing"),
        ([0, 10, 20], [0, np.nan, 2], "NaN"),
        ([0, 10, 20], [0, -1, 2], "negative"),
        ([0, 10], [0, 1, 2], "2 sample times but 3"),
        ([-1, 10], [0, 1], ">= 0"),
        ([0], [0], "at least 2"),
    ],
)
def test_input_validation(times, values, message):
    with pytest.raises(InputFunctionError, match=message):
        InputFunction(times, values, source="idif.tsv")


def test_coverage_rule():
    frames = FrameSchedule.paper()
    # Mid-time samples end half a frame early: normal, silent.
    InputFunction(frames.mids_s, np.ones(62)).check_covers(frames)
    short = InputFunction([0, 60, 1200], [0, 10, 5], source="short.tsv")
    with pytest.warns(UserWarning, match="short.tsv.*held"):
        short.check_covers(frames)
    with pytest.raises(InputFunctionError, match="short.tsv.*missing"):
        short.check_covers(frames, strict=True)


def test_blood_tsv_with_units(tmp_path):
    tsv = tmp_path / "sub-01_recording-manual_blood.tsv"
    tsv.write_text(
        "time\tplasma_radioactivity\twhole_blood_radioactivity\n"
        "0\t0\t0\n30\t12000\t10000\n60\t6000\t5000\n"
    )
    tsv.with_suffix(".json").write_text(
        json.dumps(
            {
                "time": {"Units": "s"},
                "plasma_radioactivity": {"Units": "Bq/mL"},
                "whole_blood_radioactivity": {"Units": "kBq/mL"},
            }
        )
    )
    plasma = InputFunction.from_blood_tsv(tsv, column="plasma")
    np.testing.assert_allclose(plasma.values, [0, 12.0, 6.0])
    blood = InputFunction.from_blood_tsv(tsv)
    np.testing.assert_allclose(blood.values, [0, 10000.0, 5000.0])


def test_blood_tsv_errors(tmp_path):
    tsv = tmp_path / "sub-02_blood.tsv"
    tsv.write_text("time\twhole_blood_radioactivity\n0\t0\n30\t10\n")
    with pytest.raises(InputFunctionError, match="units of 'whole_blood_radioactivity' unknown"):
        InputFunction.from_blood_tsv(tsv)
    with pytest.raises(InputFunctionError, match="unknown units 'furlongs'"):
        InputFunction.from_blood_tsv(tsv, units="furlongs")
    with pytest.raises(InputFunctionError, match="no column 'plasma_radioactivity'"):
        InputFunction.from_blood_tsv(tsv, column="plasma", units="kBq/ml")
    np.testing.assert_allclose(InputFunction.from_blood_tsv(tsv, units="MBq/ml").values, [0, 1e4])


def test_feng_model_facts():
    # Feng et al. 1993, model 2 (docs/phantom.md): Cp(tau) = 0, peak ~103 at 0.29 min,
    # 11.2 at 60 min.
    assert feng_model(0.735, delay_min=0.735) == 0.0
    assert feng_peak() == pytest.approx(103, abs=1.0)
    t = np.linspace(0.01, 2, 20000)
    assert t[np.argmax(feng_model(t))] == pytest.approx(0.29, abs=0.01)
    assert feng_model(60.0) == pytest.approx(11.2, abs=0.1)
    inp = InputFunction.feng(peak_kbq_per_ml=200.0, delay_s=15.0)
    assert inp.values.max() == pytest.approx(200.0, rel=1e-3)
    assert inp(15.0) == 0.0 and inp(14.0) == 0.0
    assert inp.times_s[-1] == 3900.0


def test_sidecar_times_in_minutes_are_refused(tmp_path):
    minutes = FrameSchedule(
        FrameSchedule.paper().starts_s / 60, FrameSchedule.paper().durations_s / 60
    )
    path = tmp_path / "sub-01_pet.json"
    path.write_text(json.dumps(minutes.to_bids()))
    with pytest.raises(FrameScheduleError) as err:
        FrameSchedule.from_bids_json(path)
    message = str(err.value)
    assert message.startswith(f"{path}: the 62 frames end at 65 s, too short")
    assert "are these minutes?" in message


def test_a_scan_of_many_hours_is_only_warned_about(tmp_path):
    hours = FrameSchedule.from_durations([600.0] * 30)  # 5 h
    path = tmp_path / "sub-01_pet.json"
    path.write_text(json.dumps(hours.to_bids()))
    with pytest.warns(UserWarning, match=r"sub-01_pet.json: the 30 frames end at 18000 s \(5 h\)"):
        assert FrameSchedule.from_bids_json(path) == hours


def test_blood_recording_that_is_zero_everywhere(tmp_path):
    tsv = tmp_path / "sub-03_recording-manual_blood.tsv"
    tsv.write_text("time\twhole_blood_radioactivity\n0\t0\n30\t0\n3900\t0\n")
    with pytest.raises(InputFunctionError) as err:
        InputFunction.from_blood_tsv(tsv, units="kBq/ml")
    assert str(err.value) == f"{tsv}: the input function is zero everywhere (3 samples, 0-3900 s)"


def write_recording(path, times, values):
    np.savetxt(
        path,
        np.column_stack([times, values]),
        delimiter="\t",
        fmt="%.9g",
        comments="",
        header="time\twhole_blood_radioactivity",
    )
    path.with_suffix(".json").write_text(
        json.dumps({"time": {"Units": "s"}, "whole_blood_radioactivity": {"Units": "kBq/mL"}})
    )


def test_a_long_recording_is_simplified_within_its_tolerance(tmp_path):
    """A 100 000-row recording (a sample every 39 ms) keeps a few hundred knots; the model
    of it matches the full recording's within the bound the tolerance gives."""
    frames = FrameSchedule.paper()
    times = np.linspace(0.0, 3900.0, 100_000)
    full = InputFunction.feng(250.0, 12.0, times_s=times)
    tsv = tmp_path / "sub-01_recording-sampler_blood.tsv"
    write_recording(tsv, times, full.values)
    read = InputFunction.from_blood_tsv(tsv)
    assert 10 < read.times_s.size <= MAX_KNOTS
    assert read.times_s[0] == 0.0 and read.times_s[-1] == 3900.0
    dense = np.linspace(0.0, 3900.0, 1_000_003)
    peak = full.values.max()
    assert np.abs(read(dense) - full(dense)).max() <= KNOT_TOLERANCE * peak * (1 + 1e-6)
    params = np.array([[0.1, 0.15, 0.05, 0.05], [0.9, 1.2, 0.02, 0.3], [0.5, 0.5, 0.1, 1.0]])
    exact = KineticModel(full, frames)(params)
    simple = KineticModel(read, frames)(params)
    # The input is off by at most tol x peak everywhere: a tissue curve by at most that
    # times (Vb + (1 - Vb) K1 x the scan's length in minutes), the impulse response <= K1.
    bound = KNOT_TOLERANCE * peak * (params[:, 3] + (1 - params[:, 3]) * params[:, 0] * 65)
    assert (np.abs(simple - exact).max(axis=1) <= bound).all()
    assert np.abs(simple - exact).max() < 1e-3 * np.abs(exact).max()


def test_a_two_million_row_recording_sets_up_fast(tmp_path):
    """Read, the recording keeps a few knots, and a model of it is set up and run in a
    fraction of the 33 s (and 5.7 GB) that each call took with all two million."""
    frames = FrameSchedule.paper()
    times = np.linspace(0.0, 3900.0, 2_000_000)
    tsv = tmp_path / "sub-01_recording-sampler_blood.tsv"
    write_recording(tsv, times, InputFunction.feng(250.0, 12.0, times_s=times).values)
    read = InputFunction.from_blood_tsv(tsv)
    assert read.times_s.size <= MAX_KNOTS
    started = time.perf_counter()
    KineticModel(read, frames)(np.array([[0.5, 0.5, 0.1, 0.1]]))
    assert time.perf_counter() - started < 5


def test_a_noisy_long_recording_is_refused(tmp_path):
    times = np.linspace(0.0, 3900.0, 20_000)
    values = InputFunction.feng(250.0, 12.0, times_s=times).values
    noisy = values + np.random.default_rng(0).normal(0, 2.5, times.size).clip(-values)
    tsv = tmp_path / "sub-01_recording-sampler_blood.tsv"
    write_recording(tsv, times, noisy)
    message = f"{tsv}: 20000 samples, and more than {MAX_KNOTS} are needed to follow the curve"
    with pytest.raises(InputFunctionError, match=message):
        InputFunction.from_blood_tsv(tsv)
