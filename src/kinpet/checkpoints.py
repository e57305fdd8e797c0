"""Checkpoints and the state of a training run: saving, safe loading, the lock and the
check that a saved state belongs to these settings and data."""

from __future__ import annotations

import csv
import fcntl
import hashlib
import os
import pickle
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kinpet.io import KinpetInputError, atomic_path
from kinpet.settings import TrainSettings

if TYPE_CHECKING:
    from kinpet.training import SliceSet


class TrainingBusyError(RuntimeError):
    """Another process holds the lock of this training's state folder."""


# Files of a run in progress, kept in the state folder until training ends.
STATE_FILES = ("best.pt", "last.pt", "log.csv", "monitor.csv")
LOCK_NAME = "train.lock"
# Settings that do not change what is trained (how many CPU threads run it).
RESUME_IGNORES = ("threads",)
# Settings added after states were first saved, with the value those states trained with.
ADDED_SETTINGS = {"model": "irreversible_2tc", "ema_decay": 0.0, "swa_start": 0}


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


def stale_reason(state: dict, settings: TrainSettings, fingerprint: str) -> str | None:
    """Why a saved state cannot be resumed under these settings and data (None: it can)."""
    saved = {**ADDED_SETTINGS, **state.get("settings", {})}
    saved = {k: v for k, v in saved.items() if k not in RESUME_IGNORES}
    now = {k: v for k, v in asdict(settings).items() if k not in RESUME_IGNORES}
    changed = sorted(k for k in now.keys() | saved.keys() if saved.get(k) != now.get(k))
    if changed:
        return "training settings differ: " + ", ".join(
            f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed
        )
    if state.get("data") != fingerprint:
        return "the training or validation data differ"
    return None


def save_checkpoint(
    path, model, optimizer, schedule, generator, epoch, best, settings, data=None, trained=None
):
    """Save a training state; ``model`` holds the weights to predict with.

    ``trained`` (with weight averaging): the weights the optimiser steps, kept beside the
    average so that a resumed run continues them.
    """
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
    if trained is not None:
        state["trained"] = trained.state_dict()
    # Through a file object: torch names the archive's records after a path's file name,
    # which would put the temporary's host and pid into the checkpoint's bytes.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def truncate_log(path: Path, last_epoch: int) -> None:
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


def append_row(path: Path, row: dict, columns=LOG_COLUMNS):
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
