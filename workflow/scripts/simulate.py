"""Simulate one phantom subject (kinpet.phantom) into the PET-BIDS dataset."""

import sys
from pathlib import Path

from kinpet import phantom, simulation
from kinpet.io import frames_from_spec, read_organ_values
from kinpet.labelmap import read_label_anatomy
from kinpet.motion import Breathing
from kinpet.readers import script_log

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
cfg = snakemake.params  # noqa: F821
inp = snakemake.input  # noqa: F821
subject_id = snakemake.wildcards.subject  # noqa: F821
anatomy = None
if "anatomy" in inp.keys():
    # A label map's anatomy (phantom.anatomy); a missing body or organ: one line (script_log).
    anatomy = read_label_anatomy(
        inp.anatomy,
        cfg.voxel_mm,
        inp.anatomy_classes,
        inp.get("anatomy_ct"),
        log=lambda message: print(message, file=sys.stderr),
    )
subject = phantom.make_subject(
    subject_id,
    seed=cfg.seed,
    size=cfg.size,
    organ_values=read_organ_values(inp.organs),
    voxel_mm=cfg.voxel_mm,
    input_peak_kbq_per_ml=tuple(cfg.input_peak_kbq_per_ml),
    input_delay_s=tuple(cfg.input_delay_s),
    parameter_cv=cfg.parameter_cv,
    spatial_cv=cfg.spatial_cv,
    anatomy=anatomy,
    deform_mm=cfg.get("deform_mm", 0.0),
)
# The dataset root is three levels above the PET file: <root>/sub-XX/pet/sub-XX_pet.nii.gz.
root = Path(snakemake.output.pet).parents[2]  # noqa: F821
frames = frames_from_spec(cfg.frames)
# Too little memory or disk (PhantomResourceError): one line in the log (script_log).
simulation.check_simulation_resources(subject, len(frames), root, "config phantom.voxel_mm")
summary = simulation.simulate_subject(
    subject,
    root,
    frames=frames,
    fwhm_mm=cfg.fwhm_mm,
    noise_cov=cfg.noise_cov,
    threads=snakemake.threads,  # noqa: F821
    motion=Breathing(**cfg.motion) if "motion" in cfg.keys() else None,
)
print(summary, file=sys.stderr)
