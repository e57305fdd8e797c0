"""The training data: slices of dynamic PET with their subjects' input functions, and the
per-subject scale that puts every subject at one level before the network sees it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.kinetics import KineticModel
from kinpet.settings import SCALINGS


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
