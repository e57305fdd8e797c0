"""Train one ablation of the kinetic UNet on the training slices, for the configured kinetic
model (``model:``)."""

import sys
from pathlib import Path

import numpy as np

from kinpet.convergence import loss_floor, masked_curves, monitor_subject, pooled_floor
from kinpet.evaluation import organ_indices
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.io import KinpetInputError, read_label_table, read_slices
from kinpet.readers import read_volume, script_log
from kinpet.training import (
    SliceSet,
    pick_device,
    settings_from_config,
    subject_projection,
    subject_scale,
    train,
)

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
sm = snakemake  # noqa: F821


def load(npz_paths, blood_paths, sampling, scaling):
    slices, inputs, frames = [], [], None
    for npz, blood in zip(npz_paths, blood_paths, strict=True):
        data = read_slices(npz)
        slices.append(data["tacs"])
        these = FrameSchedule(data["frame_start_s"], data["frame_duration_s"], source=npz)
        if frames is not None and these != frames:
            raise KinpetInputError(f"{npz}: frame schedule differs from the other subjects'")
        frames = these
        inputs.append(InputFunction.from_blood_tsv(blood))
    return SliceSet.from_subjects(slices, inputs, frames, sampling, scaling), slices, inputs


def floor_of(slices, inputs, frames, settings):
    """The fast fitter's loss floor over the masked pixels of these subjects' slices."""
    floors, counts = [], []
    for tacs, inp in zip(slices, inputs, strict=True):
        curves = masked_curves(tacs, frames, settings.mask_threshold, settings.mask_auc)
        floors.append(loss_floor(curves, inp, frames, settings.sampling))
        counts.append(len(curves))
    return pooled_floor(floors, counts)


def make_monitor(inp, settings, train_data, val_data):
    """The convergence study's monitor of the first test subject (phantom only)."""
    frames = FrameSchedule.from_bids_json(inp.monitor_pet_json)
    aif = InputFunction.from_blood_tsv(inp.monitor_blood)
    names = read_label_table(inp.monitor_labels_tsv)
    truth = {
        Path(p).name.split("_desc-")[1].split("_")[0]: read_volume(p, np.float32, ndim=3)
        for p in inp.monitor_truth
    }
    scale = subject_scale(aif, frames, settings.scaling)
    watch = monitor_subject(
        read_volume(inp.monitor_pet, np.float32, ndim=4),
        read_volume(inp.monitor_labels, ndim=3),
        organ_indices(names, sm.params.monitor_organs, source=inp.monitor_labels_tsv),
        truth,
        aif,
        frames,
        settings.sampling,
        settings.mask_threshold,
        sm.params.erode_voxels,
        scale,
        subject_projection(aif, frames, settings),
        mask_auc=settings.mask_auc,
    )
    floors = {
        "train_floor": floor_of(*train_data, frames, settings),
        "val_floor": floor_of(*val_data, frames, settings) if val_data[0] else np.nan,
    }
    print(f"loss floors (fast fitter): {floors}", file=sys.stderr)
    return lambda network: {**floors, **watch(network)}


settings = settings_from_config(
    sm.params.settings,
    sm.params.underneath,
    **sm.params.ablation,
    model=sm.params.model,
    threads=sm.threads,
)
print(
    f"device: {pick_device(settings.device)} (CUDA visible: {pick_device('auto').type == 'cuda'})",
    file=sys.stderr,
)
train_set, *train_raw = load(
    sm.input.train, sm.input.train_blood, settings.sampling, settings.scaling
)
val_set, *val_raw = load(
    sm.input.validation, sm.input.validation_blood, settings.sampling, settings.scaling
)
monitor = None
if "monitor_pet" in sm.input.keys():
    monitor = make_monitor(sm.input, settings, train_raw, val_raw)
out_dir = sm.output.best.rsplit("/", 1)[0]
# The state folder is no rule output: Snakemake does not delete it before a rerun, so a
# killed job resumes where it stopped (README, "Faults").
state_dir = Path("results/training_state") / sm.wildcards.ablation
# Another job training into the same folder (TrainingBusyError) ends in one line too.
result = train(
    train_set,
    val_set,
    settings,
    out_dir,
    resume=True,
    stream=sys.stderr,
    monitor=monitor,
    state_dir=state_dir,
)
if monitor is None:
    Path(sm.output.monitor).write_text("epoch\n")  # nothing monitored: a header only
print(f"best validation loss {result['val_loss']:.6g} at epoch {result['epoch']}", file=sys.stderr)
