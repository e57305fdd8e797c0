"""Arterial input functions: measured samples, PET-BIDS blood recordings, Feng's model.

An input function is piecewise linear through its samples (times in seconds, values in
kBq/ml by convention: the kinetic model only needs the input and the tissue curves in the
same unit). Before the first sample it rises linearly from A(0) = 0; after the last
sample it is held at the last value. Holding is needed for an image-derived input sampled
at frame mid-times, which ends half a frame before the scan does; a warning (or, with
``strict=True``, an error) is given when the uncovered tail is longer than the last frame.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

# Units accepted in PET-BIDS blood sidecars, as factors to kBq/ml.
_TO_KBQ_PER_ML = {
    "bq/ml": 1e-3,
    "kbq/ml": 1.0,
    "mbq/ml": 1e3,
    "nci/ml": 0.037,
    "uci/ml": 37.0,
}

BLOOD_COLUMNS = {
    "whole_blood": "whole_blood_radioactivity",
    "plasma": "plasma_radioactivity",
}

# Feng et al. (1993), model 2, in µCi/ml with t in minutes (Int J Biomed Comput 32: 95-110;
# docs/phantom.md).
# Blood recordings longer than MAX_KNOTS samples are simplified (InputFunction.simplified)
# to a curve within KNOT_TOLERANCE x its peak: the kinetic model's cost grows with the
# knots, and a few thousand follow any bolus at a 1-s rate.
MAX_KNOTS = 4000
KNOT_TOLERANCE = 1e-3

FENG_A = (851.1225, 21.8798, 20.8113)
FENG_LAMBDA = (-4.133859, -0.1190996, -0.01043449)


class InputFunctionError(ValueError):
    """An input function is invalid; the message names the source when there is one."""


def units_to_kbq_per_ml(units: str, source: str | None = None) -> float:
    """Factor that converts a PET-BIDS radioactivity-concentration unit to kBq/ml."""
    key = units.strip().lower().replace(" ", "").replace("µ", "u").replace("cm3", "ml")
    key = key.replace("cc", "ml").replace(".ml^-1", "/ml").replace(".ml-1", "/ml")
    if key not in _TO_KBQ_PER_ML:
        where = f"{source}: " if source else ""
        known = ", ".join(sorted({"Bq/ml", "kBq/ml", "MBq/ml", "nCi/ml", "uCi/ml"}))
        raise InputFunctionError(f"{where}unknown units {units!r} (known: {known})")
    return _TO_KBQ_PER_ML[key]


class InputFunction:
    """A piecewise-linear arterial input function.

    Parameters
    ----------
    times_s : array_like, shape (n,)
        Sample times in seconds after injection, strictly increasing, >= 0.
    values : array_like, shape (n,)
        Activity concentrations (kBq/ml by convention), finite and >= 0.
    source : str, optional
        Where the samples came from; used in error messages.

    Notes
    -----
    ``times_s`` and ``values`` keep the samples as given. ``knots_s`` and
    ``knot_values`` are the samples with the point (0, 0) prepended when the first
    sample is later than t = 0: the curve the exact model integrates.
    """

    def __init__(self, times_s, values, source: str | None = None):
        where = f"{source}: " if source else ""
        try:
            t = np.array(times_s, dtype=np.float64)
            a = np.array(values, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise InputFunctionError(
                f"{where}input function samples are not numbers ({err})"
            ) from None
        if t.ndim != 1 or a.ndim != 1:
            raise InputFunctionError(f"{where}times and values must be 1-D")
        if t.size != a.size:
            raise InputFunctionError(f"{where}{t.size} sample times but {a.size} values")
        if t.size < 2:
            raise InputFunctionError(f"{where}an input function needs at least 2 samples")
        if np.isnan(t).any() or np.isnan(a).any():
            raise InputFunctionError(f"{where}input function contains NaN")
        if not (np.isfinite(t).all() and np.isfinite(a).all()):
            raise InputFunctionError(f"{where}input function contains infinite values")
        if (t < 0).any():
            raise InputFunctionError(f"{where}sample times must be >= 0 s (after injection)")
        if (np.diff(t) <= 0).any():
            bad = int(np.flatnonzero(np.diff(t) <= 0)[0]) + 1
            raise InputFunctionError(
                f"{where}sample times must be strictly increasing (sample {bad}: "
                f"{t[bad]} s after {t[bad - 1]} s)"
            )
        if (a < 0).any():
            bad = int(np.flatnonzero(a < 0)[0])
            raise InputFunctionError(f"{where}negative input function value {a[bad]} at {t[bad]} s")
        t.setflags(write=False)
        a.setflags(write=False)
        self.times_s = t
        self.values = a
        self.source = source
        if t[0] > 0:
            self.knots_s = np.concatenate([[0.0], t])
            self.knot_values = np.concatenate([[0.0], a])
        else:
            self.knots_s, self.knot_values = t, a

    def __repr__(self) -> str:
        src = f", source={self.source!r}" if self.source else ""
        return (
            f"InputFunction({self.times_s.size} samples, {self.times_s[0]:g}-"
            f"{self.times_s[-1]:g} s, peak {self.values.max():.4g}{src})"
        )

    def __call__(self, t_s) -> np.ndarray:
        """Values at times ``t_s`` (s): linear between samples, held after the last."""
        t = np.asarray(t_s, dtype=np.float64)
        return np.interp(t, self.knots_s, self.knot_values, left=0.0)

    def check_not_zero(self) -> None:
        """Raise when no sample is positive: there is nothing to model (every fit of it is
        singular, and a network would predict maps from nothing)."""
        if np.any(self.values > 0):
            return
        where = f"{self.source}: " if self.source else ""
        raise InputFunctionError(
            f"{where}the input function is zero everywhere ({self.values.size} samples, "
            f"{self.times_s[0]:g}-{self.times_s[-1]:g} s)"
        )

    # -- coverage -----------------------------------------------------------------------
    def uncovered_tail_s(self, frames) -> float:
        """How long the scan goes on after the last sample (s); 0 if covered."""
        return max(0.0, float(frames.end_s) - float(self.times_s[-1]))

    def check_covers(self, frames, strict: bool = False) -> None:
        """Warn (or raise with ``strict``) when the input stops more than a frame early.

        The last value is held to the end of the scan; a tail up to the last frame's
        duration is normal for an image-derived input sampled at frame mid-times.
        """
        tail = self.uncovered_tail_s(frames)
        if tail <= float(frames.durations_s[-1]):
            return
        where = f"{self.source}: " if self.source else ""
        msg = (
            f"{where}the input function ends at {self.times_s[-1]:g} s but the scan ends at "
            f"{frames.end_s:g} s; the last value is held for the remaining {tail:g} s"
        )
        if strict:
            raise InputFunctionError(msg.replace("; the last value is held for", "; missing"))
        warnings.warn(msg, stacklevel=2)

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def from_blood_tsv(cls, path, column: str = "whole_blood", units: str | None = None):
        """Read a PET-BIDS blood recording (``*_blood.tsv``).

        Parameters
        ----------
        path : path-like
            The ``_blood.tsv`` file: a ``time`` column (s) and the chosen radioactivity column.
        column : {"whole_blood", "plasma"} or str
            Which curve to use: the PET-BIDS ``whole_blood_radioactivity`` or
            ``plasma_radioactivity`` column, or any other column name.
        units : str, optional
            Units of the column when the ``_blood.json`` sidecar does not give them.
            Values are converted to kBq/ml.

        A recording of more than :data:`MAX_KNOTS` samples comes back
        :meth:`simplified` (within :data:`KNOT_TOLERANCE` x its peak), or is refused.
        """
        import pandas as pd

        path = Path(path)
        name = BLOOD_COLUMNS.get(column, column)
        try:
            table = pd.read_csv(path, sep="\t")
        except FileNotFoundError:
            raise InputFunctionError(f"{path}: file not found") from None
        except Exception as err:  # noqa: BLE001 - pandas raises many parser errors
            raise InputFunctionError(f"{path}: cannot read as TSV ({err})") from None
        for needed in ("time", name):
            if needed not in table.columns:
                raise InputFunctionError(
                    f"{path}: no column {needed!r} (columns: {', '.join(map(str, table.columns))})"
                )
        sidecar = path.with_suffix(".json")
        meta = {}
        if sidecar.exists():
            try:
                meta = json.loads(sidecar.read_text(encoding="utf-8"))
            except UnicodeDecodeError as err:
                raise InputFunctionError(f"{sidecar}: not UTF-8 text ({err})") from None
            except json.JSONDecodeError as err:
                raise InputFunctionError(f"{sidecar}: not valid JSON ({err})") from None
        column_units = units or (meta.get(name) or {}).get("Units")
        if column_units is None:
            raise InputFunctionError(
                f"{path}: units of {name!r} unknown: give them in {sidecar.name} "
                f'("{name}": {{"Units": "kBq/ml"}}) or pass units='
            )
        time_units = (meta.get("time") or {}).get("Units", "s")
        time_factor = {"s": 1.0, "sec": 1.0, "min": 60.0}.get(str(time_units).lower())
        if time_factor is None:
            raise InputFunctionError(f"{sidecar}: unknown time units {time_units!r}")
        factor = units_to_kbq_per_ml(column_units, source=str(sidecar))
        try:
            times = table["time"].to_numpy(dtype=np.float64) * time_factor
            values = table[name].to_numpy(dtype=np.float64) * factor
        except (TypeError, ValueError) as err:
            raise InputFunctionError(f"{path}: non-numeric values ({err})") from None
        blood = cls(times, values, source=str(path))
        blood.check_not_zero()
        if blood.times_s.size > MAX_KNOTS:
            # Every model call costs time and memory in proportion to the knots (a
            # 2-million-row recording: 33 s and 5.7 GB each): keep the few that matter.
            blood = blood.simplified()
        return blood

    @classmethod
    def from_blood_tsv_pair(cls, path, column: str = "auto", units: str | None = None):
        """The inputs of a PET-BIDS blood recording: (tissue input, whole blood or None,
        the names of the columns used).

        ``column="auto"``: with both ``plasma_radioactivity`` and
        ``whole_blood_radioactivity`` in the file, the plasma curve is the tissue's input
        and whole blood the Vb term's (:func:`kinpet.kinetics.irreversible_2tc`'s
        ``blood_function``); with one of them, that one serves both terms. Any other
        ``column`` (see :meth:`from_blood_tsv`) serves both terms.
        """
        if column != "auto":
            name = BLOOD_COLUMNS.get(column, column)
            return cls.from_blood_tsv(path, column=column, units=units), None, (name,)
        import pandas as pd

        try:
            names = set(pd.read_csv(path, sep="\t", nrows=0).columns)
        except FileNotFoundError:
            raise InputFunctionError(f"{path}: file not found") from None
        except Exception as err:  # noqa: BLE001 - pandas raises many parser errors
            raise InputFunctionError(f"{path}: cannot read as TSV ({err})") from None
        have = [key for key in ("plasma", "whole_blood") if BLOOD_COLUMNS[key] in names]
        if not have:
            raise InputFunctionError(
                f"{path}: no column {BLOOD_COLUMNS['whole_blood']!r} or "
                f"{BLOOD_COLUMNS['plasma']!r} (columns: {', '.join(map(str, sorted(names)))}); "
                "name the input's column with the blood-column option"
            )
        curves = [cls.from_blood_tsv(path, column=key, units=units) for key in have]
        used = tuple(BLOOD_COLUMNS[key] for key in have)
        return curves[0], (curves[1] if len(curves) == 2 else None), used

    def simplified(
        self, tolerance: float = KNOT_TOLERANCE, max_knots: int = MAX_KNOTS
    ) -> InputFunction:
        """The same curve on fewer samples, within ``tolerance`` x its peak everywhere.

        A subset of the samples (the first and the last always among them) is chosen by
        splitting, as Douglas and Peucker do, each stretch where linear interpolation
        between the kept samples misses a dropped one by more than ``tolerance`` x the
        peak, at its worst sample. The interpolated curves differ at most there, so the
        new curve is within that bound at every time and its integral (which the exact
        model convolves) within that bound x the recording's length.

        Raises
        ------
        InputFunctionError
            When more than ``max_knots`` samples are needed (a noisy recording: smooth or
            decimate it first), naming the source, the rows and the tolerance.
        """
        limit = tolerance * float(self.values.max())
        keep = simplify_samples(self.times_s, self.values, limit, max_knots)
        if keep is None:
            where = f"{self.source}: " if self.source else ""
            raise InputFunctionError(
                f"{where}{self.times_s.size} samples, and more than {max_knots} are needed to "
                f"follow the curve within {tolerance:.2%} of its peak ({limit:.4g}): smooth "
                f"or decimate the recording"
            )
        return InputFunction(self.times_s[keep], self.values[keep], source=self.source)

    def delayed(self, delay_s: float) -> InputFunction:
        """The input as the tissue sees it ``delay_s`` seconds later: A(t - delay_s).

        Exact for the piecewise-linear curve: its knots (with the ramp from (0, 0)) move by
        ``delay_s``. A positive delay leaves the input at 0 for the first ``delay_s``
        seconds; a negative one starts it at A(-delay_s) at t = 0 and drops what came
        before (the tissue saw it before the scan began). The last value is held after the
        last knot, as always.
        """
        delay_s = float(delay_s)
        if not np.isfinite(delay_s):
            raise InputFunctionError(f"the input delay must be finite, not {delay_s}")
        if delay_s == 0.0:
            return self
        times = self.knots_s + delay_s
        values = self.knot_values
        if delay_s < 0:
            keep = times > 0
            times = np.concatenate([[0.0], times[keep]])
            values = np.concatenate([[float(self(-delay_s))], values[keep]])
        source = f"{self.source or 'input'} delayed by {delay_s:g} s"
        return InputFunction(times, values, source=source)

    @classmethod
    def feng(
        cls,
        peak_kbq_per_ml: float = 250.0,
        delay_s: float = 0.0,
        end_s: float = 3900.0,
        times_s=None,
    ) -> InputFunction:
        """Feng et al. (1993) model 2, scaled to a given peak and delayed.

        Parameters
        ----------
        peak_kbq_per_ml : float
            Maximum of the curve (kBq/ml). 250 kBq/ml is the scale of a ~3 MBq/kg FDG
            study on a long axial field-of-view scanner, whose 2-s aorta frames peak near
            200 kBq/ml (docs/phantom.md).
        delay_s : float
            Time from injection to the arrival of the bolus (the model's tau), in s.
        end_s : float
            Last sample time (s); the default covers the paper's 65-min scan.
        times_s : array_like, optional
            Sample times (s). The default samples the bolus every 1 s for 3 min, then
            every 10 s to 10 min, then every 60 s.
        """
        if times_s is None:
            bolus = np.arange(0.0, 180.0, 1.0)
            middle = np.arange(180.0, 600.0, 10.0)
            tail = np.arange(600.0, end_s, 60.0)
            rel = np.concatenate([bolus, middle, tail])
            times_s = np.unique(np.concatenate([[0.0], delay_s + rel, [end_s]]))
            times_s = times_s[times_s <= end_s]
        times_s = np.asarray(times_s, dtype=np.float64)
        shape = feng_model(times_s / 60.0, delay_min=delay_s / 60.0)
        return cls(times_s, shape * (peak_kbq_per_ml / feng_peak()), source="Feng model 2")


def simplify_samples(t, a, limit: float, max_knots: int) -> np.ndarray | None:
    """Indices of samples of the curve (t, a) whose linear interpolation stays within
    ``limit`` of every sample (see :meth:`InputFunction.simplified`); None when that takes
    more than ``max_knots``.

    Vectorised: each pass splits every stretch that misses at its worst sample, so a
    two-million-sample curve takes a few dozen passes over numpy arrays.
    """
    t, a = np.asarray(t, np.float64), np.asarray(a, np.float64)
    n = t.size
    keep = np.zeros(n, dtype=bool)
    keep[[0, -1]] = True
    positions = np.arange(n)
    while True:
        knots = np.flatnonzero(keep)
        segment = np.minimum(np.searchsorted(knots, positions, side="right") - 1, knots.size - 2)
        t0, t1 = t[knots[segment]], t[knots[segment + 1]]
        a0, a1 = a[knots[segment]], a[knots[segment + 1]]
        miss = np.abs(a - (a0 + (a1 - a0) * ((t - t0) / (t1 - t0))))
        worst = np.maximum.reduceat(miss, knots[:-1])
        split = worst > limit
        if not split.any():
            return knots
        if knots.size + int(split.sum()) > max_knots:
            return None
        at_worst = np.flatnonzero((miss == worst[segment]) & split[segment])
        first = np.unique(segment[at_worst], return_index=True)[1]
        keep[at_worst[first]] = True


def feng_model(t_min, delay_min: float = 0.0) -> np.ndarray:
    """Feng et al. (1993) model 2 plasma curve (µCi/ml), t in minutes; 0 before the delay.

    Cp(t) = (A1 (t - tau) - A2 - A3) e^{l1 (t - tau)} + A2 e^{l2 (t - tau)} + A3 e^{l3 (t - tau)},
    which is 0 at t = tau.
    """
    t = np.asarray(t_min, dtype=np.float64) - delay_min
    a1, a2, a3 = FENG_A
    l1, l2, l3 = FENG_LAMBDA
    tp = np.maximum(t, 0.0)
    cp = (a1 * tp - a2 - a3) * np.exp(l1 * tp) + a2 * np.exp(l2 * tp) + a3 * np.exp(l3 * tp)
    return np.where(t > 0, np.maximum(cp, 0.0), 0.0)


def feng_peak() -> float:
    """Maximum of :func:`feng_model` (µCi/ml, about 103 at 0.29 min after the delay)."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(
        lambda t: -feng_model(t)[()], bounds=(0.05, 1.0), method="bounded", options={"xatol": 1e-9}
    )
    return float(-res.fun)
