"""The schedule of a training run: the learning rate per epoch and early stopping."""

from __future__ import annotations

import math

import torch

from kinpet.settings import TrainSettings


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
