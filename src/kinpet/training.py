"""Self-supervised training of the kinetic UNet and whole-slice prediction.

The loss (De Benetti et al. 2023, Sec. 2.2) is the mean squared error between each
pixel's measured TAC and the TAC that the kinetic model produces from the parameters the
network predicts, over pixels whose curve area exceeds a threshold (the paper's
low-activity mask). No labels are needed: the kinetic model is the teacher.
"""

from __future__ import annotations

import csv
import functools
import math
import pickle
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from kinpet.fitting import frame_weights
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import KinpetInputError
from kinpet.kinetics import KineticModel
from kinpet.metrics import MASK_AUC_TIMES, activity_mask, tac_metrics
from kinpet.network import HEAD_INITS, KineticUNet, slices_to_parameters
from kinpet.projection import project_maps

SCALINGS = ("none", "input")
LOSS_WEIGHTS = ("none", "duration", "duration_decay", "blend")
SCHEDULES = ("step", "cosine", "multistep")
SAMPLINGS = ("average", "mid", "paper")

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
    },
}


def input_scale(input_function: InputFunction, frames: FrameSchedule) -> float:
    """Time average (kBq/ml) of the input function from injection to the scan's end.

    Dividing a subject's TACs and its input by it leaves the kinetic parameters unchanged
    and puts subjects with different injected doses on one scale.
    """
    end = float(frames.starts_s[-1] + frames.durations_s[-1])
    t = np.linspace(0.0, end, max(int(end), 2) + 1)
    value = float(np.trapezoid(input_function(t), t) / end)
    if not value > 0:
        where = f"{input_function.source}: " if input_function.source else ""
        raise ValueError(f"{where}the input function is zero over the whole scan")
    return value


def subject_scale(input_function: InputFunction, frames: FrameSchedule, scaling: str) -> float:
    """What a subject's TACs and input are divided by under ``scaling`` (TrainSettings)."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, not {scaling!r}")
    return input_scale(input_function, frames) if scaling == "input" else 1.0


def scaled_input(input_function: InputFunction, scale: float) -> InputFunction:
    """The input function divided by ``scale``."""
    return InputFunction(
        input_function.times_s, input_function.values / scale, source=input_function.source
    )


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
        "blend": the mean of equal and duration-times-decay weights.
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
    straight_through, head_init, shared_temporal, decimate_time
        The switches of :class:`kinpet.network.KineticUNet` that restore the published
        network (False, "pytorch", True, True) or keep kinpet's (True, "kinpet", False,
        False): straight-through clamp gradients in training, the head's initial bias,
        one temporal convolution shared by a block's two units, and ``space`` pooling that
        halves time by striding.
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

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {tuple(RECIPES)}, not {self.recipe!r}")
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
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")


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


@dataclass
class SliceSet:
    """Dynamic slices of several subjects with each subject's kinetic model.

    Attributes
    ----------
    tacs : torch.Tensor, shape [S, T, H, W], float32
        Frame values (kBq/ml) of each slice.
    subject : torch.Tensor, shape [S], int64
        Index into ``models`` of each slice's subject.
    models : list of KineticModel
        One per subject (its input function, divided by its scale; the frames are shared).
    scales : list of float
        One per subject: ``tacs`` and the models' inputs are the measured values divided
        by it (1 without scaling).
    """

    tacs: torch.Tensor
    subject: torch.Tensor
    models: list = field(default_factory=list)
    scales: list = field(default_factory=list)

    @classmethod
    def from_subjects(
        cls, slices, input_functions, frames: FrameSchedule, sampling="average", scaling="none"
    ):
        """Build from per-subject arrays [S_i, T, H, W] (kBq/ml) and their input functions;
        ``scaling`` as :class:`TrainSettings`."""
        if len(slices) != len(input_functions):
            raise ValueError("one input function per subject is needed")
        tacs, subject, models, scales = [], [], [], []
        for i, (arr, inp) in enumerate(zip(slices, input_functions, strict=True)):
            arr = np.asarray(arr, dtype=np.float32)
            if arr.ndim != 4 or arr.shape[1] != len(frames):
                raise ValueError(
                    f"subject {i}: slices must be [S, {len(frames)}, H, W], got {arr.shape}"
                )
            if not isinstance(inp, InputFunction):
                raise TypeError("input_functions must be kinpet InputFunction objects")
            scale = subject_scale(inp, frames, scaling)
            tacs.append(torch.from_numpy(arr / np.float32(scale)))
            subject.append(torch.full((arr.shape[0],), i, dtype=torch.int64))
            models.append(KineticModel(scaled_input(inp, scale), frames, sampling))
            scales.append(scale)
        return cls(torch.cat(tacs), torch.cat(subject), models, scales)

    def __len__(self) -> int:
        return int(self.tacs.shape[0])

    @property
    def frames(self) -> FrameSchedule:
        return self.models[0].frames

    def slice_scales(self, rows: torch.Tensor) -> torch.Tensor:
        """Scale of each of these slices, shape [B]."""
        return torch.tensor(self.scales, dtype=torch.float32)[self.subject[rows]]


def pick_device(name: str = "auto") -> torch.device:
    """CUDA when visible (Snakemake does not set CUDA_VISIBLE_DEVICES), else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def subject_rows(subject: torch.Tensor, device):
    """(subject index, its rows of the batch on ``device``) for each subject in ``subject``."""
    for s in torch.unique(subject).tolist():
        yield s, (subject == s).nonzero().flatten().to(device)


def model_tacs(params: torch.Tensor, subject: torch.Tensor, models) -> torch.Tensor:
    """Kinetic-model TACs [B, T, H, W] of predicted parameter maps [B, 4, H, W]."""
    per_pixel = params.permute(0, 2, 3, 1).float()  # [B, H, W, 4]
    out = torch.empty(
        (params.shape[0], models[0].n_frames, *params.shape[2:]),
        dtype=per_pixel.dtype,
        device=params.device,
    )
    for s, rows in subject_rows(subject, params.device):
        out[rows] = models[s](per_pixel[rows]).permute(0, 3, 1, 2)
    return out


def project_by_subject(params, tacs, subject, models, weights):
    """:func:`kinpet.projection.project_maps` of a batch [B, 4, H, W] whose slices belong
    to several subjects (``subject`` [B] indexes ``models``)."""
    out = torch.empty_like(params)
    for s, rows in subject_rows(subject, params.device):
        out[rows] = project_maps(params[rows], tacs[rows], models[s], weights)
    return out


def subject_projection(input_function: InputFunction, frames: FrameSchedule, settings):
    """The projection of one subject's maps for a network trained with
    ``projection=True`` (None otherwise): ``f(params, tacs) -> params`` with ``tacs`` as
    the network sees them (divided by the subject's scale)."""
    if not settings.projection:
        return None
    scale = subject_scale(input_function, frames, settings.scaling)
    model = KineticModel(scaled_input(input_function, scale), frames, settings.sampling)
    weights = loss_weights(frames, settings, "cpu")
    return functools.partial(project_maps, model=model, weights=weights)


def masked_mse(predicted: torch.Tensor, measured: torch.Tensor, mask: torch.Tensor, weights=None):
    """Mean squared error over the masked pixels' frames ([B, T, H, W], mask [B, H, W]).

    ``weights`` ([T], mean 1, optional) weighs each frame's squared error.
    """
    weight = mask[:, None].to(predicted.dtype)
    count = weight.sum() * predicted.shape[1]
    if weights is not None:
        weight = weight * weights.to(predicted).view(1, -1, 1, 1)
    return ((predicted - measured) ** 2 * weight).sum() / count.clamp(min=1)


def random_flips(tacs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip a batch [B, T, H, W] left-right and/or anterior-posterior at random."""
    flip_h, flip_w = torch.rand(2, generator=generator).tolist()
    dims = [d for d, u in ((-2, flip_h), (-1, flip_w)) if u < 0.5]
    return tacs.flip(dims) if dims else tacs


def learning_rate_schedule(optimizer, settings: TrainSettings):
    """The learning-rate schedule of :class:`TrainSettings` (stepped once per epoch)."""
    if settings.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, settings.halve_every, gamma=settings.gamma
        )
    if settings.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, settings.milestones, gamma=settings.gamma
        )
    warmup, total = settings.warmup_epochs, settings.epochs

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        span = max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(epoch - warmup, span) / span))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_model(settings: TrainSettings) -> KineticUNet:
    """The network of these settings (ablation and network-layout switches)."""
    return KineticUNet(
        settings.convolution,
        settings.pooling,
        settings.activation,
        straight_through=settings.straight_through,
        head_init=settings.head_init,
        shared_temporal=settings.shared_temporal,
        decimate_time=settings.decimate_time,
    )


def stop_early(best_epoch: int, completed: int, settings: TrainSettings) -> bool:
    """Whether training stops before epoch ``completed + 1``: the validation checks of
    epochs ``best_epoch + 1 .. completed`` (1-based; ``best_epoch`` -1 before any) number
    at least ``settings.early_stopping_patience`` (never when it is 0).

    Counted from the epochs alone (no state of its own), so a resumed run stops where an
    uninterrupted one would.
    """
    patience = settings.early_stopping_patience
    if patience <= 0:
        return False
    checks = sum(
        1
        for e in range(max(best_epoch, 0) + 1, completed + 1)
        if e % settings.validate_every == 0 or e == settings.epochs
    )
    return checks >= patience


def _seed_everything(seed: int) -> torch.Generator:
    # Our own code draws only from torch generators; Python's is seeded for third-party code.
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def _forward(model, tacs, device, amp: bool, time_padding: str):
    if amp and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return slices_to_parameters(model, tacs, time_padding).float()
    return slices_to_parameters(model, tacs, time_padding)


def network_parameters(model, meas, rows, data: SliceSet, settings, weights, time_padding):
    """Parameter maps [B, 4, H, W] of a batch: the network's, projected when
    ``settings.projection`` (see :class:`TrainSettings`)."""
    params = _forward(model, meas, meas.device, settings.amp, time_padding)
    if settings.projection:
        params = project_by_subject(params, meas, data.subject[rows], data.models, weights)
    return params


def evaluate(model, data: SliceSet, settings: TrainSettings, device=None, batch_size=None):
    """Loss, per-slice cosine similarity and MAE of a model on a slice set.

    All three are in measured units (kBq/ml), whatever the scaling and weights of the
    training loss: the loss is the published one (unweighted masked MSE, (kBq/ml)^2), so
    that runs with different recipes compare on one scale.
    """
    device = device or next(model.parameters()).device
    batch_size = batch_size or settings.batch_size
    model.eval()
    losses, cs, mae, weights = [], [], [], []
    frame_w = loss_weights(data.frames, settings, device)
    with torch.inference_mode():
        for rows in torch.arange(len(data)).split(batch_size):
            meas = data.tacs[rows].to(device)
            params = network_parameters(model, meas, rows, data, settings, frame_w, "replicate")
            scale = data.slice_scales(rows).to(device).view(-1, 1, 1, 1)
            pred = model_tacs(params, data.subject[rows], data.models) * scale
            meas = meas * scale
            mask = activity_mask(meas, data.frames, settings.mask_threshold, settings.mask_auc)
            losses.append(float(masked_mse(pred, meas, mask)))
            weights.append(float(mask.sum()))
            c, m = tac_metrics(meas, pred, mask)
            cs.append(c)
            mae.append(m)
    total = sum(weights)
    loss = sum(lo * w for lo, w in zip(losses, weights, strict=True)) / total if total else math.nan
    return loss, np.concatenate(cs), np.concatenate(mae)


class _Progress:
    """One line per epoch in logs; a live line on a terminal."""

    def __init__(self, total_epochs: int, stream=sys.stderr):
        self.total, self.stream = total_epochs, stream
        self.live = stream.isatty()

    def step(self, epoch, batch, n_batches, loss):
        if self.live:
            self.stream.write(
                f"\repoch {epoch + 1}/{self.total} [{batch + 1}/{n_batches}] loss {loss:.4g}   "
            )
            self.stream.flush()

    def epoch(self, epoch, row):
        text = " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
        )
        self.stream.write(("\r" if self.live else "") + text + "\n")
        self.stream.flush()


def loss_weights(frames: FrameSchedule, settings: TrainSettings, device) -> torch.Tensor:
    """The frame weights [T] of the training loss, on ``device``."""
    if settings.loss_weights == "blend":
        # Equal weights keep the early frames (K1, the spleen's fast exchange); duration x
        # decay the late ones (Ki). Their mean keeps both.
        weights = 0.5 * (frame_weights(frames, "duration_decay") + 1.0)
    else:
        weights = frame_weights(frames, settings.loss_weights)
    return torch.as_tensor(weights).to(device)


def training_loss(model, meas, rows, data: SliceSet, settings: TrainSettings, weights):
    """The self-supervised loss of one batch ``meas`` ([B, T, H, W], on the model's device;
    the slices ``rows`` of ``data``, scaled as ``data``): masked, frame-weighted MSE
    between the measured and the model TACs of the predicted parameters."""
    # The paper pads time with zeros in training, replicated frames in validation.
    params = network_parameters(model, meas, rows, data, settings, weights, "zeros")
    pred = model_tacs(params, data.subject[rows], data.models)
    scale = data.slice_scales(rows).to(meas.device).view(-1, 1, 1, 1)
    mask = activity_mask(meas * scale, data.frames, settings.mask_threshold, settings.mask_auc)
    return masked_mse(pred, meas, mask, weights)


def train(
    train_set: SliceSet,
    val_set: SliceSet,
    settings: TrainSettings,
    out_dir,
    resume: bool = False,
    stream=sys.stderr,
    monitor=None,
) -> dict:
    """Train one ablation; write ``best.pt``, ``last.pt`` and ``log.csv`` into ``out_dir``.

    With ``resume=True`` and an existing ``last.pt``, training continues from it with the
    same weights, optimiser, schedule, data order and random state, so the result equals
    an uninterrupted run.

    ``monitor`` (optional, e.g. :func:`kinpet.convergence.monitor_subject`) is called with
    the network at every validation; its dict, the epoch and the training set's loss in
    evaluation mode (``train_eval_loss``, the published loss) go to ``monitor.csv``.

    Returns
    -------
    dict with the best validation loss, its epoch and the device used.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = pick_device(settings.device)
    generator = _seed_everything(settings.seed)
    model = build_model(settings).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    schedule = learning_rate_schedule(optimizer, settings)
    weights = loss_weights(train_set.frames, settings, device)
    start_epoch, best = 0, {"val_loss": math.inf, "epoch": -1}
    last_path, best_path, log_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "log.csv"
    monitor_path = out_dir / "monitor.csv"
    if resume and last_path.exists():
        state = load_checkpoint(last_path, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        print(f"resumed from {last_path} at epoch {start_epoch}", file=stream)
    else:
        for path in (log_path, monitor_path):
            path.unlink(missing_ok=True)
    print(
        f"device {device}; {settings.convolution}/{settings.pooling}/{settings.activation}"
        f"{' with projection' if settings.projection else ''}; "
        f"{len(train_set)} training and {len(val_set)} validation slices",
        file=stream,
    )
    progress = _Progress(settings.epochs, stream)
    n_batches = math.ceil(len(train_set) / settings.batch_size)
    for epoch in range(start_epoch, settings.epochs):
        if len(val_set) and stop_early(best["epoch"], epoch, settings):
            print(f"early stop after epoch {epoch}: best at epoch {best['epoch']}", file=stream)
            break
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_set), generator=generator)
        running, seen = 0.0, 0
        for b, rows in enumerate(order.split(settings.batch_size)):
            meas = train_set.tacs[rows]
            if settings.flips:
                meas = random_flips(meas, generator)
            loss = training_loss(model, meas.to(device), rows, train_set, settings, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(rows)
            seen += len(rows)
            progress.step(epoch, b, n_batches, running / seen)
        lr = optimizer.param_groups[0]["lr"]
        schedule.step()
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": running / seen}
        validate = (epoch + 1) % settings.validate_every == 0 or epoch + 1 == settings.epochs
        if validate and len(val_set):
            val_loss, cs, mae = evaluate(model, val_set, settings, device)
            row.update(
                val_loss=val_loss, val_cs=float(np.nanmean(cs)), val_mae=float(np.nanmean(mae))
            )
            if val_loss < best["val_loss"]:
                best = {"val_loss": val_loss, "epoch": epoch + 1}
                _save(best_path, model, optimizer, schedule, generator, epoch, best, settings)
        row["seconds"] = time.perf_counter() - started  # without the monitor's time
        if validate and monitor is not None:
            extra = {"epoch": epoch + 1, "train_eval_loss": evaluate(model, train_set, settings)[0]}
            extra.update(monitor(model))
            _append_csv(monitor_path, extra, list(extra))
            model.train()
        _append_csv(log_path, row)
        progress.epoch(epoch, row)
        _save(last_path, model, optimizer, schedule, generator, epoch, best, settings)
    if not best_path.exists():  # no validation data: the last state is the best we have
        _save(best_path, model, optimizer, schedule, generator, settings.epochs - 1, best, settings)
    return {**best, "device": str(device)}


def _save(path, model, optimizer, schedule, generator, epoch, best, settings):
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "epoch": epoch,
        "best": best,
        "settings": asdict(settings),
    }
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


LOG_COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "val_cs", "val_mae", "seconds"]


def _append_csv(path: Path, row: dict, columns=LOG_COLUMNS):
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in columns})


def load_checkpoint(path, device="cpu") -> dict:
    """The state dict of a checkpoint written by :func:`train`, read without running code.

    Checkpoints hold only tensors and plain Python types (the settings as a dict), so
    they are read with ``weights_only=True``: a file carrying other pickled objects (which
    unpickling would construct, i.e. run) is refused.

    Raises
    ------
    KinpetInputError
        Naming the file: missing, truncated or corrupt, or holding objects other than
        tensors and plain types.
    """
    path = Path(path)
    if not path.exists():
        raise KinpetInputError(f"{path}: file not found")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is many lines of advice on weights_only=False: keep its first.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KinpetInputError(
            f"{path}: refused: the checkpoint holds objects other than tensors and plain "
            f"types, which loading would run ({first})"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise KinpetInputError(
            f"{path}: cannot read the checkpoint (truncated or corrupt?): {err}"
        ) from None
    missing = [k for k in ("model", "settings") if not isinstance(state, dict) or k not in state]
    if missing:
        raise KinpetInputError(f"{path}: not a kinpet checkpoint (no {', '.join(missing)})")
    return state


def load_model(path, device="auto") -> tuple[KineticUNet, TrainSettings]:
    """A trained network and its settings from a checkpoint written by :func:`train`."""
    device = pick_device(device)
    state = load_checkpoint(path, device)
    settings = TrainSettings(**state["settings"])
    model = build_model(settings).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return model, settings
