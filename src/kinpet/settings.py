"""Training settings and recipes: kinpet's and the published code's.

A recipe gives every setting left unset (None) in :class:`TrainSettings` its value;
:data:`RECIPES` is the one place where a recipe expands.
"""

from __future__ import annotations

from dataclasses import dataclass

from kinpet.metrics import MASK_AUC_TIMES
from kinpet.models import get_model
from kinpet.network import HEAD_INITS

SCALINGS = ("none", "input")
LOSS_WEIGHTS = ("none", "duration", "duration_decay", "blend")
SCHEDULES = ("step", "cosine", "multistep")
SAMPLINGS = ("average", "mid", "paper")
LOSSES = ("curves", "newton")

# Training recipes: the values a recipe gives the settings that are left unset (None) in
# TrainSettings. The one place where a recipe expands (TrainSettings.__post_init__).
# "kinpet": kinpet's defaults (the results of earlier versions are unchanged under it).
# "paper": the published code (FrancescaDB/self_supervised_PBPK_modelling: main.py,
# config.yaml, utils/utils_main.py, network/unet_blocks*.py; README "Training recipes").
RECIPES = {
    "kinpet": {
        "learning_rate": 1e-4,
        "batch_size": 5,
        "validate_every": 5,
        "sampling": "average",
        "scaling": "none",
        "loss_weights": "none",
        "schedule": "step",
        "milestones": [25, 50, 75, 100],
        "gamma": 0.5,
        "early_stopping_patience": 0,
        "mask_auc": "mid",
        "straight_through": True,
        "head_init": "kinpet",
        "shared_temporal": False,
        "decimate_time": False,
        "flips": False,
        "projection": False,
        "loss": "curves",
    },
    "paper": {
        "learning_rate": 1e-4,
        "batch_size": 5,
        "validate_every": 5,
        "sampling": "paper",
        "scaling": "none",
        "loss_weights": "none",
        "schedule": "multistep",
        "milestones": [25, 50, 75, 100],
        "gamma": 0.5,
        "early_stopping_patience": 25,
        "mask_auc": "start",
        "straight_through": False,
        "head_init": "pytorch",
        "shared_temporal": True,
        "decimate_time": True,
        "flips": False,
        "projection": False,
        "loss": "curves",
    },
}


@dataclass
class TrainSettings:
    """Choices of one training run.

    A setting left at None takes the value of ``recipe`` (:data:`RECIPES`); one given
    explicitly wins over the recipe. The defaults below are the ``kinpet`` recipe's.

    Attributes
    ----------
    recipe : {"kinpet", "paper"}
        "kinpet": kinpet's defaults. "paper": the published code's training loop and
        network (README, "Training recipes"): plain clamps, PyTorch's initialisation,
        shared temporal convolutions, time-decimating space pooling, MultiStepLR at
        epochs 25, 50, 75, 100 (x0.5), early stopping after 25 validation checks, the
        mask's area over frame starts, the discrete 0.1-min model (``sampling: paper``),
        no scaling, equal frame weights, no projection, no flips, learning rate 1e-4,
        batch size 5, validation every 5 epochs. The activation is the ablation's.
    convolution, pooling, activation : str
        The ablation switches of :class:`kinpet.network.KineticUNet`.
    epochs : int
        Maximum number of epochs (500 in the paper; 100 in the published config.yaml).
    batch_size : int
        Slices per optimisation step (5).
    learning_rate : float
        Initial AdamW learning rate (1e-4).
    halve_every : int
        Period (epochs) of the ``step`` schedule (25).
    validate_every : int
        Validation period in epochs (5); the last epoch is always validated.
    sampling : str
        Kinetic model sampling mode used in the loss ("average" exact, "paper" as published).
    mask_threshold : float
        Minimum TAC area (kBq/ml x min) of the pixels in the loss and the metrics.
    mask_auc : {"mid", "start"}
        Time points (min) of that area's trapezoid: frame mid-times, or frame starts (as
        published; :func:`kinpet.metrics.activity_mask`).
    seed : int
        Seed of weights, data order and every random generator.
    device : str
        "auto" (CUDA when visible, else CPU), "cpu" or "cuda[:N]".
    threads : int or None
        CPU threads for torch (None: torch's default).
    amp : bool
        bfloat16 autocast of the network on CUDA (the kinetic model stays float32).
    scaling : {"none", "input"}
        "none" (the published code): TACs enter the network and the loss in kBq/ml.
        "input": each subject's TACs and its input function are divided by the input's
        time average over the scan (:func:`input_scale`), so that every subject enters at
        the same scale; the parameters are unchanged by it (the model is linear in the
        input).
    loss_weights : {"none", "duration", "duration_decay", "blend"}
        Weight of each frame in the loss (:func:`kinpet.fitting.frame_weights`, mean 1):
        equal (the published code), proportional to its duration (a frame's noise
        variance is inversely proportional to its length, so the 2-s frames no longer
        weigh as much as the 300-s ones), duration times the F-18 decay factor, or
        "blend": equal and duration-times-decay weights mixed, ``blend_equal_share`` of
        the former (0.5: their mean).
    schedule : {"step", "cosine", "multistep"}
        "step": the learning rate is multiplied by ``gamma`` every ``halve_every`` epochs,
        for ever; "cosine": a linear warm-up over ``warmup_epochs``, then a cosine decay to
        0 at the last epoch (for short budgets); "multistep": multiplied by ``gamma`` at
        each epoch of ``milestones``, constant after the last (the published MultiStepLR).
    milestones : list of int
        Epochs at which the ``multistep`` schedule multiplies the learning rate by
        ``gamma`` ([25, 50, 75, 100]).
    gamma : float
        Factor of the ``step`` and ``multistep`` schedules (0.5).
    warmup_epochs : int
        Epochs of linear warm-up of the cosine schedule.
    early_stopping_patience : int
        Stop when this many validation checks in a row have not improved on the best
        validation loss (0: never stop early; the published code: 25 checks).
    flips : bool
        Random left-right and anterior-posterior flips of each training batch (the
        kinetics are per pixel, so a flipped slice is as valid a sample).
    projection : bool
        False (the paper): the network's four outputs are the parameters. True: only
        beta = k2 + k3 is taken from the network; Vb, K1 and the k2/k3 split are each
        pixel's bounded least-squares solution for that beta under the loss's frame
        weights (:mod:`kinpet.projection`), in training, validation and prediction alike.
    projection_equal_share : float or None
        None: the projection's least squares weighs frames as the loss does. A number in
        [0, 1]: its own blend of that share of equal weights with duration x decay weights
        (see ``loss_weights``), while the loss keeps its weights. The loss's weights decide
        which beta the network learns; these decide how each pixel's Vb, K1 and Ki are
        solved at it: Ki's information sits in the long late frames, which the inverse
        noise variance (about duration x decay) weighs up, while the spleen's K1 needs the
        early frames. ``loss="newton"`` keeps the loss's weights in its cost.
    straight_through, head_init, shared_temporal, decimate_time
        The switches of :class:`kinpet.network.KineticUNet` that restore the published
        network (False, "pytorch", True, True) or keep kinpet's (True, "kinpet", False,
        False): straight-through clamp gradients in training, the head's initial bias,
        one temporal convolution shared by a block's two units, and ``space`` pooling that
        halves time by striding.
    loss : {"curves", "newton"}
        "curves" (the paper): the masked, frame-weighted squared error between measured
        and model curves. "newton" (needs ``projection``): each masked pixel's target is
        one damped Newton step of its own projected curve cost in log beta from the
        network's beta (:func:`kinpet.projection.newton_log_beta`), and the loss is the
        mean squared distance of log beta to it. Still label-free, but every pixel pulls
        at the same rate however flat its cost: the curve loss barely sees beta where
        exchange is fast (the spleen), this one does.
    ema_decay : float
        0 (the paper): validation, ``best.pt`` and prediction use the trained weights.
        In (0, 1): they use an exponential moving average of the weights over the
        optimiser steps (:mod:`kinpet.averaging`), which spans about ``1 / (1 -
        ema_decay)`` steps; the optimiser still steps the trained weights.
    swa_start : int
        0 (the paper): as ``ema_decay``. From epoch ``swa_start`` (from 1) on, validation,
        ``best.pt`` and prediction use the uniform average of the weights at the end of
        each epoch since then (stochastic weight averaging, Izmailov et al. 2018); before
        it, the trained weights. Exclusive with ``ema_decay``.
    model : str
        The kinetic model of :data:`kinpet.models.MODELS` (the paper's
        ``irreversible_2tc``): the network predicts its parameters within its bounds and
        the loss evaluates its closed form. ``projection``, ``loss="newton"`` and
        ``activation="log_beta"`` work on beta = k2 + k3 of the irreversible model only.
        Saved with the checkpoint, so prediction and refinement use the same model.
    """

    convolution: str = "space_time"
    pooling: str = "3d"
    activation: str = "multi_clamp"
    epochs: int = 500
    batch_size: int | None = None
    learning_rate: float | None = None
    halve_every: int = 25
    validate_every: int | None = None
    sampling: str | None = None
    mask_threshold: float = 10.0
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    amp: bool = False
    scaling: str | None = None
    loss_weights: str | None = None
    schedule: str | None = None
    warmup_epochs: int = 0
    flips: bool | None = None
    projection: bool | None = None
    recipe: str = "kinpet"
    milestones: list | None = None
    gamma: float | None = None
    early_stopping_patience: int | None = None
    mask_auc: str | None = None
    straight_through: bool | None = None
    head_init: str | None = None
    shared_temporal: bool | None = None
    decimate_time: bool | None = None
    loss: str | None = None
    blend_equal_share: float = 0.5
    projection_equal_share: float | None = None
    ema_decay: float = 0.0
    swa_start: int = 0
    model: str = "irreversible_2tc"

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {tuple(RECIPES)}, not {self.recipe!r}")
        get_model(self.model)  # a ValueError naming the known models
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                # A copy: the recipe's lists must not be shared with (and changed by) a run.
                setattr(self, name, list(value) if isinstance(value, list) else value)
        self.milestones = [int(m) for m in self.milestones]
        for name, allowed in (
            ("scaling", SCALINGS),
            ("loss_weights", LOSS_WEIGHTS),
            ("schedule", SCHEDULES),
            ("sampling", SAMPLINGS),
            ("mask_auc", MASK_AUC_TIMES),
            ("head_init", HEAD_INITS),
            ("loss", LOSSES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")
        if not 0.0 <= self.blend_equal_share <= 1.0:
            raise ValueError(f"blend_equal_share must lie in [0, 1], not {self.blend_equal_share}")
        share = self.projection_equal_share
        if share is not None and not (
            isinstance(share, int | float) and not isinstance(share, bool) and 0 <= share <= 1
        ):
            raise ValueError(f"projection_equal_share must be None or lie in [0, 1], not {share!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), not {self.ema_decay}")
        if not 0 <= self.swa_start <= self.epochs:
            raise ValueError(
                f"swa_start must be an epoch in [0, epochs = {self.epochs}], not {self.swa_start}"
            )
        if self.swa_start and self.ema_decay:
            raise ValueError("swa_start and ema_decay are two averages of the weights: pick one")
        if self.activation == "log_beta" and not self.projection:
            raise ValueError("activation 'log_beta' needs projection: true (it gives beta only)")
        if self.loss == "newton" and not self.projection:
            raise ValueError(f"loss {self.loss!r} needs projection: true (it steps beta = k2 + k3)")
        if self.model != "irreversible_2tc":
            for what, used in (
                ("projection: true", self.projection),
                ("loss 'newton'", self.loss == "newton"),
                ("activation 'log_beta'", self.activation == "log_beta"),
            ):
                if used:
                    raise ValueError(
                        f"{what} is for model 'irreversible_2tc' only (it works on beta = "
                        f"k2 + k3), not {self.model!r}"
                    )


def settings_from_config(given: dict, underneath: dict | None = None, **overrides):
    """:class:`TrainSettings` from the pipeline's ``training`` settings.

    Parameters
    ----------
    given : dict
        Settings given with (or after) the recipe: they win over it.
    underneath : dict, optional
        Settings of an earlier config file than the one naming the recipe (the default
        ``config/config.yaml`` under a ``--configfile`` with ``recipe: paper``): the
        recipe's values replace them where it has one.
    **overrides
        Win over everything (the ablation's switches, the job's threads).
    """
    given = {**given, **overrides}
    recipe = given.get("recipe", (underneath or {}).get("recipe", "kinpet"))
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {tuple(RECIPES)}, not {recipe!r}")
    kept = {k: v for k, v in (underneath or {}).items() if k not in RECIPES[recipe]}
    return TrainSettings(**{**kept, **given, "recipe": recipe})
