"""The kinetic models kinpet knows, by name: parameters, units, bounds, macro-parameters.

Every model is evaluated in closed form, exactly for the piecewise-linear input
(:mod:`kinpet.kinetics`). The one-tissue model is the irreversible two-tissue model's
k3 = 0 case (impulse response K1 exp(-k2 t)) and is fitted as that model with k3 held;
the reversible model has its own evaluation and fitter (:mod:`kinpet.modelfit`).

- ``irreversible_2tc``: K1, k2, k3, Vb (k4 = 0); Ki = K1 k3 / (k2 + k3).
- ``reversible_2tc``: K1, k2, k3, k4, Vb; VT = K1 / k2 (1 + k3 / k4), VS = K1 k3 / (k2 k4)
  (Ki is not defined).
- ``one_tc``: K1, k2, Vb; VT = K1 / k2.

Patlak's graphical method (:mod:`kinpet.patlak`) is no compartment model and has no
forward curve; ``kinpet fit-tacs --model patlak`` runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kinpet.constants import PAPER_LOWER, PAPER_UPPER, PARAMETER_NAMES, PARAMETER_UNITS


@dataclass(frozen=True)
class Model:
    """One kinetic model.

    Attributes
    ----------
    name : str
    description : str
        One line, for sidecars and figure titles.
    parameters : tuple of str
        Names of its parameters, in the order of its parameter arrays.
    units : dict
        Unit of each parameter and macro-parameter.
    lower, upper : tuple of float
        Default bounds of the parameters.
    held : dict
        Parameters of the irreversible two-tissue model this model holds fixed
        (``{"k3": 0.0}`` for ``one_tc``).
    macro : dict
        Macro-parameter name -> function of the parameters [..., n] -> [...].
    irreversible_form : bool
        The model is the irreversible two-tissue model with ``held`` parameters (evaluated
        and fitted as it); False for ``reversible_2tc``.
    """

    name: str
    description: str
    parameters: tuple[str, ...]
    units: dict
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    held: dict = field(default_factory=dict)
    macro: dict[str, Callable] = field(default_factory=dict)
    irreversible_form: bool = True

    @property
    def fit_methods(self) -> tuple[str, ...]:
        """The methods :func:`kinpet.modelfit.fit_model` fits this model with (the published
        organ fit ``curve_fit_paper`` only for the irreversible form)."""
        if self.irreversible_form:
            return ("fast", "curve_fit", "curve_fit_paper")
        return ("fast", "curve_fit")

    def curves(self, params, kinetic_model):
        """Frame values [..., T] of parameters [..., n] for a
        :class:`kinpet.kinetics.KineticModel` (input, frames, sampling).

        numpy in (any float or a list), float64 numpy out; a torch tensor in, a tensor out
        on its device and dtype, differentiable (the network's loss).
        """
        import torch

        if not torch.is_tensor(params):
            params = np.asarray(params, dtype=np.float64)
        if params.shape[-1] != len(self.parameters):
            raise ValueError(
                f"{self.name} has {len(self.parameters)} parameters {self.parameters}; got "
                f"arrays with {params.shape[-1]}"
            )
        if self.irreversible_form:
            return kinetic_model(self.to_irreversible(params))
        from kinpet.kinetics import _reversible_curves

        return _reversible_curves(params, kinetic_model)

    def to_irreversible(self, params) -> np.ndarray:
        """Its parameters [..., n] as (K1, k2, k3, Vb) [..., 4] of the two-tissue model
        (a torch tensor stays one; that model's own parameters are returned as they are)."""
        import torch

        if torch.is_tensor(params):
            if self.parameters == IRREVERSIBLE_NAMES:
                return params
            columns = [
                torch.full_like(params[..., 0], self.held[name])
                if name in self.held
                else params[..., self.parameters.index(name)]
                for name in IRREVERSIBLE_NAMES
            ]
            return torch.stack(columns, dim=-1)
        params = np.asarray(params, dtype=np.float64)
        if params.shape[-1] != len(self.parameters):
            raise ValueError(
                f"{self.name} has {len(self.parameters)} parameters {self.parameters}; got "
                f"arrays with {params.shape[-1]}"
            )
        out = np.empty((*params.shape[:-1], 4))
        for i, name in enumerate(IRREVERSIBLE_NAMES):
            if name in self.held:
                out[..., i] = self.held[name]
            else:
                out[..., i] = params[..., self.parameters.index(name)]
        return out

    def from_irreversible(self, params4) -> np.ndarray:
        """The model's parameters [..., n] out of (K1, k2, k3, Vb) [..., 4]."""
        params4 = np.asarray(params4, dtype=np.float64)
        return np.stack([params4[..., IRREVERSIBLE_NAMES.index(p)] for p in self.parameters], -1)


IRREVERSIBLE_NAMES = PARAMETER_NAMES
_UNITS = dict(zip(PARAMETER_NAMES, PARAMETER_UNITS, strict=True))


def _ki(p):
    return p[..., 0] * p[..., 2] / (p[..., 1] + p[..., 2])


def _vt(p):
    return p[..., 0] / p[..., 1]


def _vt_reversible(p):
    return p[..., 0] / p[..., 1] * (1 + p[..., 2] / p[..., 3])


def _vs(p):
    return p[..., 0] * p[..., 2] / (p[..., 1] * p[..., 3])


# k4's bounds (1/min): FDG's k4 is 0-0.05 in most tissue, larger in the liver.
K4_LOWER, K4_UPPER = 0.0, 1.0


MODELS = {
    "irreversible_2tc": Model(
        "irreversible_2tc",
        "the irreversible two-tissue model (k4 = 0) with Vb",
        IRREVERSIBLE_NAMES,
        {**_UNITS, "Ki": "ml/cm3/min"},
        tuple(PAPER_LOWER),
        tuple(PAPER_UPPER),
        macro={"Ki": _ki},
    ),
    "reversible_2tc": Model(
        "reversible_2tc",
        "the reversible two-tissue model with Vb",
        ("K1", "k2", "k3", "k4", "Vb"),
        {**_UNITS, "k4": "1/min", "VT": "ml/cm3", "VS": "ml/cm3"},
        (*PAPER_LOWER[:3], K4_LOWER, PAPER_LOWER[3]),
        (*PAPER_UPPER[:3], K4_UPPER, PAPER_UPPER[3]),
        macro={"VT": _vt_reversible, "VS": _vs},
        irreversible_form=False,
    ),
    "one_tc": Model(
        "one_tc",
        "the one-tissue model with Vb",
        ("K1", "k2", "Vb"),
        {"K1": _UNITS["K1"], "k2": _UNITS["k2"], "Vb": _UNITS["Vb"], "VT": "ml/cm3"},
        (PAPER_LOWER[0], PAPER_LOWER[1], PAPER_LOWER[3]),
        (PAPER_UPPER[0], PAPER_UPPER[1], PAPER_UPPER[3]),
        held={"k3": 0.0},
        macro={"VT": _vt},
    ),
}


def get_model(name: str) -> Model:
    """The model called ``name``; a ValueError naming the known ones otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown kinetic model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def result_columns(model: Model, result) -> dict:
    """The table columns of a :class:`kinpet.fitting.FitResult` of ``model``: its
    parameters, its macro-parameters, then delay_s (when fitted), SSE, ok and status."""
    params = result.params
    if params.shape[1] != len(model.parameters):
        params = model.from_irreversible(params)
    out = {name: params[:, i] for i, name in enumerate(model.parameters)}
    with np.errstate(invalid="ignore", divide="ignore"):
        out.update({name: f(params) for name, f in model.macro.items()})
    rest = result.as_dict()
    for name in ("delay_s", "SSE", "ok", "status"):
        if name in rest:
            out[name] = rest[name]
    return out


def parameter_map_names(model: Model) -> tuple[str, ...]:
    """The maps of ``model``'s parameters and macro-parameters, in that order (the
    network's maps; the phantom's truth is ``irreversible_2tc``'s)."""
    return (*model.parameters, *model.macro)


def map_names(model: Model) -> tuple[str, ...]:
    """The maps of a voxel-wise fit of ``model``: its parameters, macro-parameters, SSE."""
    return (*parameter_map_names(model), "SSE")


def macro_maps(model: Model, params) -> dict:
    """Each macro-parameter of ``model`` from its parameters [..., n] (numpy): name ->
    array [...]; NaN where undefined (a rate of 0 in a denominator)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return {name: f(params) for name, f in model.macro.items()}


def bids_label(model: Model) -> str:
    """The model's PET-BIDS ``model`` entity (letters and digits only)."""
    return model.name.replace("_", "")


def check_fixed(model: Model, fixed) -> None:
    """A ValueError when ``fixed`` names a parameter that ``model`` does not have."""
    unknown = sorted(set(fixed or {}) - set(model.parameters))
    if unknown:
        raise ValueError(f"fixed {unknown}: not a parameter of {model.name} {model.parameters}")
