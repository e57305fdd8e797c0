"""The input an organ sees: the arterial input delayed, dispersed and, for the liver, mixed
with the portal vein's (docs/phantom.md, "Organ-specific input").

The phantom's input function is the blood in the aorta, which is also what an
image-derived input measures. Organs downstream of it see that curve later and smeared:

    A_organ(t) = D_tau [ f A + (1 - f) D_pv A ] (t - delay)

with D_tau the convolution with the exponential dispersion kernel (1/tau) exp(-t/tau), and
for a dual-input organ (the liver) f the hepatic-arterial flow fraction and D_pv the
portal vein's transit through the gut, the same exponential kernel with the portal mean
transit time (the one-parameter portal model of Brix et al. 2001 and Zuo et al. 2019).
Every step is linear and time-invariant, so their order does not matter.

The dispersed curve of a piecewise-linear input is computed exactly at knots (a recursion
over the input's segments) on a grid of 0.5 s over the bolus (``DISPERSION_GRID_S``), and
the result is again a piecewise-linear :class:`~kinpet.inputfunction.InputFunction`, so
that the kinetic model stays closed-form; between the knots it is linear (its error is
measured in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kinpet.inputfunction import InputFunction

# Knots of a dispersed input (s): the input's own samples plus a grid of these steps up to
# these times, fine over the bolus and coarse over the slow tail; its linear interpolation
# is then within 1e-3 of the peak where the bolus arrives and 5e-5 after the first minute
# (tests/test_organinput.py).
DISPERSION_GRID_S = ((0.5, 300.0), (5.0, 900.0), (30.0, np.inf))
INPUT_COLUMNS = ("delay_s", "dispersion_s", "arterial_fraction", "portal_transit_s")
INPUT_DEFAULTS = (0.0, 0.0, 1.0, 0.0)
# Sidecar descriptions of the columns (truth organ tables and maps).
INPUT_DESCRIPTIONS = {
    "delay_s": {
        "Description": "Delay of the organ's input after the aortic input (blood.tsv).",
        "Units": "s",
    },
    "dispersion_s": {
        "Description": "Time constant of the exponential dispersion of the organ's input.",
        "Units": "s",
    },
    "arterial_fraction": {
        "Description": "Share of the arterial input in the organ's input (1: arterial only; "
        "the rest is the portal vein's, the arterial input dispersed by portal_transit_s).",
        "Units": "1",
    },
    "portal_transit_s": {
        "Description": "Mean transit time of the portal-vein input through the gut.",
        "Units": "s",
    },
}


@dataclass(frozen=True)
class OrganInput:
    """How an organ's input differs from the arterial (aortic) input.

    Parameters
    ----------
    delay_s : float
        Arrival delay after the aorta (s); negative for an organ reached earlier.
    dispersion_s : float
        Time constant tau of the exponential dispersion kernel (s); 0: none.
    arterial_fraction : float
        Share of the arterial input in a dual input, 0-1; 1: arterial only.
    portal_transit_s : float
        Mean transit time of the portal-vein part through the gut (s); used when
        ``arterial_fraction`` < 1.
    """

    delay_s: float = 0.0
    dispersion_s: float = 0.0
    arterial_fraction: float = 1.0
    portal_transit_s: float = 0.0

    def __post_init__(self):
        for name in INPUT_COLUMNS:
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"organ input {name} must be a finite number")
        if self.dispersion_s < 0 or self.portal_transit_s < 0:
            raise ValueError("organ input dispersion_s and portal_transit_s must be >= 0 s")
        if not 0.0 <= self.arterial_fraction <= 1.0:
            raise ValueError(
                f"organ input arterial_fraction must be within 0-1, not {self.arterial_fraction}"
            )
        if self.arterial_fraction < 1.0 and self.portal_transit_s <= 0:
            raise ValueError("a dual input (arterial_fraction < 1) needs portal_transit_s > 0")

    @property
    def is_arterial(self) -> bool:
        """True when the organ sees the arterial input itself."""
        return self.delay_s == 0.0 and self.dispersion_s == 0.0 and self.arterial_fraction == 1.0


def exponential_dispersion(times_s, values, tau_s: float) -> np.ndarray:
    """The piecewise-linear curve (times_s, values) convolved with (1/tau) exp(-t/tau).

    Exact at ``times_s``: on a segment of length h from a0 to a1,
    E1 = e E0 + a1 - a0 e - (a1 - a0) (1 - e) / x with x = h / tau and e = exp(-x). The
    curve is taken as 0 before ``times_s[0]``, where the result starts at 0.

    Parameters
    ----------
    times_s : numpy.ndarray [n], increasing
    values : numpy.ndarray [n]
    tau_s : float
        Time constant (s); 0 returns ``values`` unchanged.

    Returns
    -------
    numpy.ndarray [n]
    """
    t = np.asarray(times_s, dtype=np.float64)
    a = np.asarray(values, dtype=np.float64)
    if tau_s == 0:
        return a.copy()
    x = np.diff(t) / tau_s
    e = np.exp(-x)
    gain = -np.expm1(-x) / x  # (1 - e) / x, in (0, 1]
    out = np.empty_like(a)
    out[0] = 0.0
    for i in range(x.size):
        out[i + 1] = e[i] * out[i] + a[i + 1] - a[i] * e[i] - (a[i + 1] - a[i]) * gain[i]
    return out


def dispersion_knots(times_s, grid=DISPERSION_GRID_S) -> np.ndarray:
    """The input's knots plus ``grid``'s steps (s) up to its times, to the input's end."""
    t = np.asarray(times_s, dtype=np.float64)
    parts, start, end = [t], float(t[0]), float(t[-1])
    for step, until in grid:
        stop = min(until, end)
        if stop > start:
            parts.append(np.arange(start, stop, step))
            start = stop
    return np.unique(np.concatenate(parts))


def organ_input_function(arterial: InputFunction, organ: OrganInput) -> InputFunction:
    """The input ``organ`` sees, from the arterial input (module docstring).

    Returns ``arterial`` itself when the organ sees it unchanged.
    """
    if organ.is_arterial:
        return arterial
    t, a = arterial.knots_s, arterial.knot_values
    if organ.dispersion_s > 0 or organ.arterial_fraction < 1:
        t = dispersion_knots(t)
        a = arterial(t)
    if organ.arterial_fraction < 1:
        portal = exponential_dispersion(t, a, organ.portal_transit_s)
        a = organ.arterial_fraction * a + (1 - organ.arterial_fraction) * portal
    a = exponential_dispersion(t, a, organ.dispersion_s)
    source = f"{arterial.source or 'input'} as seen by an organ ({organ})"
    return InputFunction(t, a, source=source).delayed(organ.delay_s)


def organ_inputs(organ_values) -> dict:
    """``OrganInput`` per organ from an organ table's optional input columns.

    Columns absent from the table take their defaults (arterial input); so do empty cells.
    An impossible value raises ValueError naming the organ.
    """
    inputs = {}
    if organ_values is None:
        return inputs
    for _, row in organ_values.iterrows():
        kwargs = {}
        for name, default in zip(INPUT_COLUMNS, INPUT_DEFAULTS, strict=True):
            value = row[name] if name in organ_values.columns else default
            kwargs[name] = default if value is None or np.isnan(float(value)) else float(value)
        try:
            inputs[str(row["organ"])] = OrganInput(**kwargs)
        except ValueError as err:
            raise ValueError(f"organ {row['organ']}: {err}") from None
    return inputs
