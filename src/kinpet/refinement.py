"""Self-supervised refinement at test time.

The training loss needs no labels, so a trained network can be fine-tuned on the very
subject it is about to predict (rule ``predict``, ``training.refine_steps``).
"""

from __future__ import annotations

import copy
import sys
import time

import numpy as np
import torch

from kinpet.metrics import activity_mask
from kinpet.network import KineticUNet
from kinpet.training import SliceSet, TrainSettings, loss_weights, training_loss


def refine(
    model: KineticUNet,
    data: SliceSet,
    settings: TrainSettings,
    steps: int,
    learning_rate: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    stream=sys.stderr,
) -> tuple[KineticUNet, list]:
    """Self-supervised refinement at test time: fine-tune a copy of ``model`` on ``data``.

    The loss needs no labels, so the network can be fitted to the very slices it is about
    to predict. Batches are drawn in a seeded random order over the slices with masked
    pixels (epoch after epoch) for ``steps`` AdamW steps at ``learning_rate`` (default the
    training's), with the training's loss (scaling, frame weights, mask).

    Returns
    -------
    The refined copy (in eval mode; ``model`` is left untouched) and the loss of each step.
    """
    device = next(model.parameters()).device
    tuned = copy.deepcopy(model)
    tuned.train()
    if steps <= 0:
        return tuned.eval(), []
    batch_size = batch_size or settings.batch_size
    weights = loss_weights(data.frames, settings, device)
    scales = data.slice_scales(torch.arange(len(data))).view(-1, 1, 1, 1)
    active = activity_mask(
        data.tacs * scales, data.frames, settings.mask_threshold, settings.mask_auc
    )
    usable = active.flatten(1).any(dim=1).nonzero().flatten()
    if not len(usable):
        raise ValueError("refinement: no slice has pixels above the activity threshold")
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=learning_rate or settings.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    losses, order = [], torch.empty(0, dtype=torch.int64)
    started = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, usable[torch.randperm(len(usable), generator=generator)]])
        rows, order = order[:batch_size], order[batch_size:]
        loss = training_loss(tuned, data.tacs[rows].to(device), rows, data, settings, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % max(steps // 10, 1) == 0 or step + 1 == steps:
            print(
                f"refinement step {step + 1}/{steps}: loss {np.mean(losses[-10:]):.4g} "
                f"({time.perf_counter() - started:.0f} s)",
                file=stream,
                flush=True,
            )
    return tuned.eval(), losses
