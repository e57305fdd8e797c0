"""Train one ablation of the kinetic UNet on the training slices."""

import sys

from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import read_slices
from kinpet.training import SliceSet, TrainSettings, pick_device, train

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects the object)
sm = snakemake  # noqa: F821


def load(npz_paths, blood_paths, sampling):
    slices, inputs, frames = [], [], None
    for npz, blood in zip(npz_paths, blood_paths, strict=True):
        data = read_slices(npz)
        slices.append(data["tacs"])
        these = FrameSchedule(data["frame_start_s"], data["frame_duration_s"], source=npz)
        if frames is not None and these != frames:
            raise ValueError(f"{npz}: frame schedule differs from the other subjects'")
        frames = these
        inputs.append(InputFunction.from_blood_tsv(blood))
    return SliceSet.from_subjects(slices, inputs, frames, sampling)


settings = TrainSettings(**{**sm.params.settings, **sm.params.ablation, "threads": sm.threads})
print(
    f"device: {pick_device(settings.device)} (CUDA visible: {pick_device('auto').type == 'cuda'})",
    file=sys.stderr,
)
train_set = load(sm.input.train, sm.input.train_blood, settings.sampling)
val_set = load(sm.input.validation, sm.input.validation_blood, settings.sampling)
out_dir = sm.output.best.rsplit("/", 1)[0]
result = train(train_set, val_set, settings, out_dir, resume=True, stream=sys.stderr)
print(f"best validation loss {result['val_loss']:.6g} at epoch {result['epoch']}", file=sys.stderr)
