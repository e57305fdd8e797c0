"""Averages of a network's weights during training: exponential over the optimiser steps
(EMA), or uniform over the epochs' ends (stochastic weight averaging, SWA).

The weights of the last optimiser steps scatter around a minimum of the training loss;
their running average sits nearer to it than any one of them (Polyak and Juditsky 1992;
the "EMA" of the weights, e.g. Izmailov et al. 2018 for its stochastic-weight form). The
averaged copy is only read (validated, saved as the best weights, predicted with); the
optimiser keeps stepping the live weights.
"""

from __future__ import annotations

import copy

import torch


def average_decay(step: int, decay: float) -> float:
    """The averaging weight of the old average at optimiser step ``step`` (from 0).

    ``min(decay, (1 + step) / (10 + step))``: the first steps replace most of the
    average (which starts at the network's random initialisation), so that a short run
    is not dominated by it; later steps approach ``decay``.

    Parameters
    ----------
    step : int
        Optimiser steps taken before this one.
    decay : float
        Decay in [0, 1); the average then spans about ``1 / (1 - decay)`` steps.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


def snapshot_weight(epoch: int, start: int) -> float:
    """The weight of the old average after epoch ``epoch`` (from 1) in a uniform average of
    the weights at the ends of epochs ``start``, ``start + 1``, ... (SWA).

    0 before and at ``start``: the average is the trained weights themselves (it tracks
    them until the window opens); then ``n / (n + 1)`` with ``n = epoch - start`` earlier
    snapshots in the window, so that every snapshot weighs the same.
    """
    return max(0, epoch - start) / max(1, epoch - start + 1)


def averaged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model`` to hold the average (in evaluation mode, no gradients)."""
    average = copy.deepcopy(model)
    average.eval()
    for p in average.parameters():
        p.requires_grad_(False)
    return average


@torch.no_grad()
def update_average(average: torch.nn.Module, model: torch.nn.Module, weight: float) -> None:
    """In place: ``average <- weight * average + (1 - weight) * model``, per tensor.

    Buffers (no network of kinpet has any with state) are copied, not averaged.
    """
    for a, p in zip(average.parameters(), model.parameters(), strict=True):
        a.lerp_(p.detach(), 1.0 - weight)
    for a, b in zip(average.buffers(), model.buffers(), strict=True):
        a.copy_(b)
