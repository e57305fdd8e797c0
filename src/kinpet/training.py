"""Self-supervised training of the kinetic UNet and whole-slice prediction.

The loss (De Benetti et al. 2023, Sec. 2.2) is the mean squared error between each
pixel's measured TAC and the TAC that the kinetic model produces from the parameters the
network predicts, over pixels whose curve area exceeds a threshold (the paper's
low-activity mask). No labels are needed: the kinetic model is the teacher.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import hashlib
import math
import os
import pickle
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from kinpet.fitting import frame_weights
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import KinpetInputError, atomic_path, remove_stale_temporaries
from kinpet.kinetics import KineticModel
from kinpet.metrics import activity_mask, tac_metrics
from kinpet.network import KineticUNet, slices_to_parameters
from kinpet.projection import project_maps

SCALINGS = ("none", "input")
LOSS_WEIGHTS = ("none", "duration", "duration_decay", "blend")
SCHEDULES = ("step", "cosine")


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
    """Choices of one training run; the defaults are the paper's where it states them.

    Attributes
    ----------
    convolution, pooling, activation : str
        The ablation switches of :class:`kinpet.network.KineticUNet`.
    epochs : int
        Maximum number of epochs (500 in the paper).
    batch_size : int
        Slices per optimisation step.
    learning_rate : float
        Initial AdamW learning rate (1e-4), halved every ``halve_every`` epochs (25).
    validate_every : int
        Validation period in epochs; the last epoch is always validated.
    sampling : str
        Kinetic model sampling mode used in the loss ("average" exact, "paper" as published).
    mask_threshold : float
        Minimum TAC area (kBq/ml x min) of the pixels in the loss and the metrics.
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
    schedule : {"step", "cosine"}
        "step": the learning rate halves every ``halve_every`` epochs (as published);
        "cosine": a linear warm-up over ``warmup_epochs``, then a cosine decay to 0 at
        the last epoch (for short budgets).
    warmup_epochs : int
        Epochs of linear warm-up of the cosine schedule.
    flips : bool
        Random left-right and anterior-posterior flips of each training batch (the
        kinetics are per pixel, so a flipped slice is as valid a sample).
    projection : bool
        False (the paper): the network's four outputs are the parameters. True: only
        beta = k2 + k3 is taken from the network; Vb, K1 and the k2/k3 split are each
        pixel's bounded least-squares solution for that beta under the loss's frame
        weights (:mod:`kinpet.projection`), in training, validation and prediction alike.
    """

    convolution: str = "space_time"
    pooling: str = "3d"
    activation: str = "multi_clamp"
    epochs: int = 500
    batch_size: int = 5
    learning_rate: float = 1e-4
    halve_every: int = 25
    validate_every: int = 5
    sampling: str = "average"
    mask_threshold: float = 10.0
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    amp: bool = False
    scaling: str = "none"
    loss_weights: str = "none"
    schedule: str = "step"
    warmup_epochs: int = 0
    flips: bool = False
    projection: bool = False

    def __post_init__(self):
        for name, allowed in (
            ("scaling", SCALINGS),
            ("loss_weights", LOSS_WEIGHTS),
            ("schedule", SCHEDULES),
            ("sampling", ("average", "mid", "paper")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")


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
        return torch.optim.lr_scheduler.StepLR(optimizer, settings.halve_every, gamma=0.5)
    warmup, total = settings.warmup_epochs, settings.epochs

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        span = max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(epoch - warmup, span) / span))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_model(settings: TrainSettings) -> KineticUNet:
    return KineticUNet(settings.convolution, settings.pooling, settings.activation)


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
            mask = activity_mask(meas, data.frames, settings.mask_threshold)
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
    mask = activity_mask(meas * scale, data.frames, settings.mask_threshold)
    return masked_mse(pred, meas, mask, weights)


class TrainingBusyError(RuntimeError):
    """Another process holds the lock of this training's state folder."""


# Files of a run in progress, kept in the state folder until training ends.
STATE_FILES = ("best.pt", "last.pt", "log.csv", "monitor.csv")
LOCK_NAME = "train.lock"
# Settings that do not change what is trained (how many CPU threads run it).
_RESUME_IGNORES = ("threads",)


@contextmanager
def training_lock(state_dir):
    """Hold an exclusive lock on ``state_dir`` for the ``with`` block.

    The lock is ``fcntl.flock`` on ``state_dir/train.lock`` (held until the process ends,
    however it ends), taken without waiting; the file holds the holder's pid.

    Raises
    ------
    TrainingBusyError
        Naming the folder and the pid of the process that holds the lock.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_NAME
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise TrainingBusyError(
                f"{state_dir}: another training holds {LOCK_NAME} (pid {holder}); wait for it "
                "to finish or stop it before training here again"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def data_fingerprint(*sets: SliceSet) -> str:
    """SHA-256 of the slices, subjects, scales and input functions of these slice sets.

    Saved with the training state, so that a run on other data never resumes from it.
    """
    digest = hashlib.sha256()
    for data in sets:
        digest.update(np.ascontiguousarray(data.tacs.numpy()).tobytes())
        digest.update(np.ascontiguousarray(data.subject.numpy()).tobytes())
        digest.update(np.asarray(data.scales, dtype=np.float64).tobytes())
        for model in data.models:
            digest.update(np.asarray(model.input_function.times_s, np.float64).tobytes())
            digest.update(np.asarray(model.input_function.values, np.float64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _stale_reason(state: dict, settings: TrainSettings, fingerprint: str) -> str | None:
    """Why a saved state cannot be resumed under these settings and data (None: it can)."""
    saved = {k: v for k, v in state.get("settings", {}).items() if k not in _RESUME_IGNORES}
    now = {k: v for k, v in asdict(settings).items() if k not in _RESUME_IGNORES}
    changed = sorted(k for k in now.keys() | saved.keys() if saved.get(k) != now.get(k))
    if changed:
        return "training settings differ: " + ", ".join(
            f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed
        )
    if state.get("data") != fingerprint:
        return "the training or validation data differ"
    return None


def train(
    train_set: SliceSet,
    val_set: SliceSet,
    settings: TrainSettings,
    out_dir,
    resume: bool = False,
    stream=sys.stderr,
    monitor=None,
    state_dir=None,
) -> dict:
    """Train one ablation; write ``best.pt``, ``last.pt`` and ``log.csv`` into ``out_dir``.

    While training, these files (and ``monitor.csv``) live in ``state_dir`` (default:
    ``out_dir``), rewritten atomically after every epoch; when ``state_dir`` is another
    folder they are moved into ``out_dir`` at the end and ``state_dir`` is removed. A
    workflow manager that deletes its outputs before rerunning a job (Snakemake) thus
    leaves the state of a killed run in place.

    With ``resume=True`` and a ``last.pt`` in ``state_dir`` saved under the same settings
    (``threads`` aside) and the same data (:func:`data_fingerprint`), training continues
    from it with the same weights, optimiser, schedule, data order and random state, so
    the result equals an uninterrupted run. A state saved under other settings or data is
    not resumed: training starts afresh and the log says why.

    The whole run holds :func:`training_lock` on ``state_dir``: a second trainer on the
    same folder stops at once with :class:`TrainingBusyError`.

    ``monitor`` (optional, e.g. :func:`kinpet.convergence.monitor_subject`) is called with
    the network at every validation; its dict, the epoch and the training set's loss in
    evaluation mode (``train_eval_loss``, the published loss) go to ``monitor.csv``.

    Returns
    -------
    dict with the best validation loss, its epoch and the device used.
    """
    out_dir = Path(out_dir)
    state_dir = out_dir if state_dir is None else Path(state_dir)
    separate = state_dir.resolve() != out_dir.resolve()
    with training_lock(state_dir) as lock:
        result = _train_locked(train_set, val_set, settings, state_dir, resume, stream, monitor)
        for name in STATE_FILES:
            remove_stale_temporaries(state_dir / name)  # of saves that a kill cut short
            if separate and (state_dir / name).exists():
                out_dir.mkdir(parents=True, exist_ok=True)
                os.replace(state_dir / name, out_dir / name)
        lock.unlink()
    if separate:
        with contextlib.suppress(OSError):  # not empty: files of someone else; keep them
            state_dir.rmdir()
    return result


def _train_locked(train_set, val_set, settings, state_dir, resume, stream, monitor):
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = pick_device(settings.device)
    generator = _seed_everything(settings.seed)
    model = build_model(settings).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    schedule = learning_rate_schedule(optimizer, settings)
    weights = loss_weights(train_set.frames, settings, device)
    fingerprint = data_fingerprint(train_set, val_set)
    start_epoch, best = 0, {"val_loss": math.inf, "epoch": -1}
    last_path, best_path = state_dir / "last.pt", state_dir / "best.pt"
    log_path, monitor_path = state_dir / "log.csv", state_dir / "monitor.csv"
    state = None
    if resume and last_path.exists():
        state = load_checkpoint(last_path, device)
        reason = _stale_reason(state, settings, fingerprint)
        if reason:
            print(f"not resuming from {last_path} ({reason}): starting afresh", file=stream)
            state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        for path in (log_path, monitor_path):
            _truncate_csv(path, start_epoch)
        print(f"resumed from epoch {start_epoch} of {settings.epochs} ({last_path})", file=stream)
    else:
        for path in (log_path, monitor_path, best_path, last_path):
            path.unlink(missing_ok=True)
    save = functools.partial(
        _save,
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        generator=generator,
        settings=settings,
        data=fingerprint,
    )
    print(
        f"device {device}; {settings.convolution}/{settings.pooling}/{settings.activation}"
        f"{' with projection' if settings.projection else ''}; "
        f"{len(train_set)} training and {len(val_set)} validation slices",
        file=stream,
    )
    progress = _Progress(settings.epochs, stream)
    n_batches = math.ceil(len(train_set) / settings.batch_size)
    for epoch in range(start_epoch, settings.epochs):
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
                save(best_path, epoch=epoch, best=best)
        row["seconds"] = time.perf_counter() - started  # without the monitor's time
        if validate and monitor is not None:
            extra = {"epoch": epoch + 1, "train_eval_loss": evaluate(model, train_set, settings)[0]}
            extra.update(monitor(model))
            _append_csv(monitor_path, extra, list(extra))
            model.train()
        _append_csv(log_path, row)
        progress.epoch(epoch, row)
        # last.pt last: a run killed before this line redoes the epoch, and the rows the
        # epoch appended to the logs are dropped on resume (_truncate_csv).
        save(last_path, epoch=epoch, best=best)
    if not best_path.exists():  # no validation data: the last state is the best we have
        save(best_path, epoch=settings.epochs - 1, best=best)
    return {**best, "device": str(device)}


def _save(path, model, optimizer, schedule, generator, epoch, best, settings, data=None):
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "epoch": epoch,
        "best": best,
        "settings": asdict(settings),
        "data": data,
    }
    # Through a file object: torch names the archive's records after a path's file name,
    # which would put the temporary's host and pid into the checkpoint's bytes.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def _truncate_csv(path: Path, last_epoch: int) -> None:
    """Drop the rows after ``last_epoch`` (those of an epoch that a kill cut short)."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    column = rows[0].index("epoch")
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[column]) <= last_epoch]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        csv.writer(f).writerows(kept)


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
