"""Self-supervised training of the kinetic UNet and whole-slice prediction.

The loss (De Benetti et al. 2023, Sec. 2.2) is the mean squared error between each
pixel's measured TAC and the TAC that the kinetic model produces from the parameters the
network predicts, over pixels whose curve area exceeds a threshold (the paper's
low-activity mask). No labels are needed: the kinetic model is the teacher.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kinpet.atomic import remove_stale_temporaries
from kinpet.averaging import average_decay, averaged_copy, snapshot_weight, update_average

# The "X as X" imports from kinpet.checkpoints, kinpet.schedules, kinpet.settings and
# kinpet.slicedata are re-exports: the training API stays one import (kinpet.training).
from kinpet.checkpoints import STATE_FILES as STATE_FILES
from kinpet.checkpoints import TrainingBusyError as TrainingBusyError
from kinpet.checkpoints import append_row as append_row
from kinpet.checkpoints import data_fingerprint as data_fingerprint
from kinpet.checkpoints import load_checkpoint as load_checkpoint
from kinpet.checkpoints import save_checkpoint as save_checkpoint
from kinpet.checkpoints import stale_reason as stale_reason
from kinpet.checkpoints import training_lock as training_lock
from kinpet.checkpoints import truncate_log as truncate_log
from kinpet.fitting import frame_weights
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import PAPER_LOWER, KineticModel
from kinpet.metrics import activity_mask, tac_metrics
from kinpet.models import Model, get_model
from kinpet.network import INITIAL_VALUES, KineticUNet, slices_to_parameters
from kinpet.projection import newton_log_beta, project_maps
from kinpet.schedules import learning_rate_schedule as learning_rate_schedule
from kinpet.schedules import stop_early as stop_early
from kinpet.settings import LOSS_WEIGHTS as LOSS_WEIGHTS
from kinpet.settings import RECIPES as RECIPES
from kinpet.settings import SCALINGS as SCALINGS
from kinpet.settings import SCHEDULES as SCHEDULES
from kinpet.settings import TrainSettings as TrainSettings
from kinpet.settings import settings_from_config as settings_from_config
from kinpet.slicedata import SliceSet as SliceSet
from kinpet.slicedata import input_scale as input_scale
from kinpet.slicedata import scaled_input as scaled_input
from kinpet.slicedata import subject_scale as subject_scale


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


def model_tacs(
    params: torch.Tensor, subject: torch.Tensor, models, kinetic: Model | None = None
) -> torch.Tensor:
    """Kinetic-model TACs [B, T, H, W] of predicted parameter maps [B, n, H, W] of the
    registry model ``kinetic`` (default ``irreversible_2tc``: K1, k2, k3, Vb), evaluated on
    each slice's subject's :class:`kinpet.kinetics.KineticModel` of ``models``."""
    kinetic = kinetic or get_model("irreversible_2tc")
    per_pixel = params.permute(0, 2, 3, 1).float()  # [B, H, W, n]
    out = torch.empty(
        (params.shape[0], models[0].n_frames, *params.shape[2:]),
        dtype=per_pixel.dtype,
        device=params.device,
    )
    for s, rows in subject_rows(subject, params.device):
        out[rows] = kinetic.curves(per_pixel[rows], models[s]).permute(0, 3, 1, 2)
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
    weights = projection_weights(frames, settings, "cpu")
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


def build_model(settings: TrainSettings) -> KineticUNet:
    """The network of these settings (ablation and network-layout switches): one output
    per parameter of ``settings.model``, within its bounds (:mod:`kinpet.models`)."""
    kinetic = get_model(settings.model)
    return KineticUNet(
        settings.convolution,
        settings.pooling,
        settings.activation,
        lower=kinetic.lower,
        upper=kinetic.upper,
        initial=tuple(INITIAL_VALUES[name] for name in kinetic.parameters),
        straight_through=settings.straight_through,
        head_init=settings.head_init,
        shared_temporal=settings.shared_temporal,
        decimate_time=settings.decimate_time,
    )


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


def network_parameters(model, meas, rows, data: SliceSet, settings, time_padding):
    """Parameter maps [B, n, H, W] of a batch: the network's, projected when
    ``settings.projection`` (see :class:`TrainSettings`; frame weights of
    :func:`projection_weights`)."""
    params = _forward(model, meas, meas.device, settings.amp, time_padding)
    if settings.projection:
        weights = projection_weights(data.frames, settings, meas.device)
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
    kinetic = get_model(settings.model)
    with torch.inference_mode():
        for rows in torch.arange(len(data)).split(batch_size):
            meas = data.tacs[rows].to(device)
            params = network_parameters(model, meas, rows, data, settings, "replicate")
            scale = data.slice_scales(rows).to(device).view(-1, 1, 1, 1)
            pred = model_tacs(params, data.subject[rows], data.models, kinetic) * scale
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


def blend_weights(frames: FrameSchedule, equal_share: float) -> np.ndarray:
    """Frame weights [T] (mean 1): ``equal_share`` of equal weights mixed with
    duration x decay weights (:func:`kinpet.fitting.frame_weights`)."""
    return equal_share + (1 - equal_share) * frame_weights(frames, "duration_decay")


def loss_weights(frames: FrameSchedule, settings: TrainSettings, device) -> torch.Tensor:
    """The frame weights [T] of the training loss, on ``device``."""
    if settings.loss_weights == "blend":
        # Equal weights keep the early frames (K1, the spleen's fast exchange); duration x
        # decay the late ones (Ki). A mix keeps both.
        weights = blend_weights(frames, settings.blend_equal_share)
    else:
        weights = frame_weights(frames, settings.loss_weights)
    return torch.as_tensor(weights).to(device)


def projection_weights(frames: FrameSchedule, settings: TrainSettings, device) -> torch.Tensor:
    """The frame weights [T] of the projection's per-pixel least squares, on ``device``:
    the loss's, unless ``settings.projection_equal_share`` sets a blend of their own."""
    if settings.projection_equal_share is None:
        return loss_weights(frames, settings, device)
    return torch.as_tensor(blend_weights(frames, settings.projection_equal_share)).to(device)


def batch_mask(meas, rows, data: SliceSet, settings: TrainSettings) -> torch.Tensor:
    """The activity mask [B, H, W] of a training batch ``meas`` (scaled as ``data``): the
    threshold applies to the curves in kBq/ml."""
    scale = data.slice_scales(rows).to(meas.device).view(-1, 1, 1, 1)
    return activity_mask(meas * scale, data.frames, settings.mask_threshold, settings.mask_auc)


def training_loss(model, meas, rows, data: SliceSet, settings: TrainSettings, weights):
    """The self-supervised loss of one batch ``meas`` ([B, T, H, W], on the model's device;
    the slices ``rows`` of ``data``, scaled as ``data``): masked, frame-weighted MSE
    between the measured and the model TACs (``settings.model``'s closed form, in torch)
    of the predicted parameters; with
    ``settings.loss == "newton"``, :func:`newton_loss`."""
    if settings.loss == "newton":
        return newton_loss(model, meas, rows, data, settings, weights)
    # The paper pads time with zeros in training, replicated frames in validation.
    params = network_parameters(model, meas, rows, data, settings, "zeros")
    pred = model_tacs(params, data.subject[rows], data.models, get_model(settings.model))
    return masked_mse(pred, meas, batch_mask(meas, rows, data, settings), weights)


def newton_loss(model, meas, rows, data: SliceSet, settings: TrainSettings, weights):
    """Mean squared distance, over the masked pixels of a batch, between the network's
    log beta (beta = k2 + k3) and one damped Newton step of each pixel's projected curve
    cost from it (:func:`kinpet.projection.newton_log_beta`; the target carries no
    gradient)."""
    raw = _forward(model, meas, meas.device, settings.amp, "zeros")
    beta = raw[:, 1] + raw[:, 2]  # [B, H, W]
    mask = batch_mask(meas, rows, data, settings)
    target = torch.zeros(beta.shape, dtype=torch.float64, device=beta.device)
    with torch.no_grad():
        for s, r in subject_rows(data.subject[rows], meas.device):
            m = mask[r]
            curves = meas[r].permute(0, 2, 3, 1)[m]  # [N, T]
            step = newton_log_beta(beta[r][m], curves, data.models[s], weights)
            target[r] = target[r].masked_scatter(m, step)
    floor = float(PAPER_LOWER[1] + PAPER_LOWER[2])
    error = (torch.log(beta.clamp(min=floor)) - target.to(beta.dtype)) ** 2
    weight = mask.to(error.dtype)
    return (error * weight).sum() / weight.sum().clamp(min=1)


def check_slice_set(data: SliceSet, settings: TrainSettings, name: str = "slice") -> None:
    """Refuse a slice set whose kinetic model or scaling is not the one of ``settings``.

    The loss evaluates each subject's model as the set was built
    (:meth:`SliceSet.from_subjects`), so a set built with another ``sampling`` or
    ``scaling`` would silently train another recipe.
    """
    for model, scale in zip(data.models, data.scales, strict=True):
        if model.sampling != settings.sampling:
            raise ValueError(
                f"the {name} set's kinetic model uses sampling {model.sampling!r} but the "
                f"settings ask for {settings.sampling!r}: build it with "
                "SliceSet.from_subjects(..., sampling=settings.sampling)"
            )
        if (scale != 1.0) != (settings.scaling != "none"):
            raise ValueError(
                f"the {name} set is {'scaled' if scale != 1.0 else 'not scaled'} but the "
                f"settings ask for scaling {settings.scaling!r}: build it with "
                "SliceSet.from_subjects(..., scaling=settings.scaling)"
            )


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
    for name, data in (("training", train_set), ("validation", val_set)):
        check_slice_set(data, settings, name)
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
    # What is validated, saved as best and predicted: the trained weights, or their average.
    averaging = settings.ema_decay or settings.swa_start
    scored = averaged_copy(model) if averaging else model
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
        reason = stale_reason(state, settings, fingerprint)
        if reason:
            print(f"not resuming from {last_path} ({reason}): starting afresh", file=stream)
            state = None
    if state is not None:
        model.load_state_dict(state.get("trained", state["model"]))
        scored.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        for path in (log_path, monitor_path):
            truncate_log(path, start_epoch)
        print(f"resumed from epoch {start_epoch} of {settings.epochs} ({last_path})", file=stream)
    else:
        for path in (log_path, monitor_path, best_path, last_path):
            path.unlink(missing_ok=True)
    save = functools.partial(
        save_checkpoint,
        model=scored,
        trained=model if scored is not model else None,
        optimizer=optimizer,
        schedule=schedule,
        generator=generator,
        settings=settings,
        data=fingerprint,
    )
    print(
        f"device {device}; {settings.model}; "
        f"{settings.convolution}/{settings.pooling}/{settings.activation}"
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
            if settings.ema_decay:
                step = epoch * n_batches + b
                update_average(scored, model, average_decay(step, settings.ema_decay))
            running += loss.item() * len(rows)
            seen += len(rows)
            progress.step(epoch, b, n_batches, running / seen)
        if settings.swa_start:
            update_average(scored, model, snapshot_weight(epoch + 1, settings.swa_start))
        lr = optimizer.param_groups[0]["lr"]
        schedule.step()
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": running / seen}
        validate = (epoch + 1) % settings.validate_every == 0 or epoch + 1 == settings.epochs
        if validate and len(val_set):
            val_loss, cs, mae = evaluate(scored, val_set, settings, device)
            row.update(
                val_loss=val_loss, val_cs=float(np.nanmean(cs)), val_mae=float(np.nanmean(mae))
            )
            if val_loss < best["val_loss"]:
                best = {"val_loss": val_loss, "epoch": epoch + 1}
                save(best_path, epoch=epoch, best=best)
        row["seconds"] = time.perf_counter() - started  # without the monitor's time
        if validate and monitor is not None:
            train_eval = evaluate(scored, train_set, settings)[0]
            extra = {"epoch": epoch + 1, "train_eval_loss": train_eval}
            extra.update(monitor(scored))
            append_row(monitor_path, extra, list(extra))
            model.train()
        append_row(log_path, row)
        progress.epoch(epoch, row)
        # last.pt last: a run killed before this line redoes the epoch, and the rows the
        # epoch appended to the logs are dropped on resume (truncate_log).
        save(last_path, epoch=epoch, best=best)
    if not best_path.exists():  # no validation data: the last state is the best we have
        save(best_path, epoch=settings.epochs - 1, best=best)
    return {**best, "device": str(device)}


def load_model(path, device="auto") -> tuple[KineticUNet, TrainSettings]:
    """A trained network and its settings from a checkpoint written by :func:`train`."""
    device = pick_device(device)
    state = load_checkpoint(path, device)
    settings = TrainSettings(**state["settings"])
    model = build_model(settings).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return model, settings
