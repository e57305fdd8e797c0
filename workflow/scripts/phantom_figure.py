"""Figure: one coronal slice of a phantom subject (last frame) with organ contours."""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kinpet.anatomy import LABELS, PAPER_ORGANS, coronal_slice_index  # noqa: E402
from kinpet.figures import save_figure  # noqa: E402
from kinpet.io import KinpetInputError  # noqa: E402
from kinpet.readers import read_json, read_nifti_header, read_volume, script_log  # noqa: E402

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
inp = snakemake.input  # noqa: F821
labels = read_volume(inp.dseg, ndim=3)  # (x, y, z)
meta = read_json(inp.pet_json)
missing = [k for k in ("FrameTimesStart", "FrameDuration", "PhantomSize") if k not in meta]
if missing:
    raise KinpetInputError(f"{inp.pet_json}: missing field(s) {', '.join(missing)}")
voxel = read_nifti_header(inp.pet).zooms[0]
y = coronal_slice_index(labels)
# One pass through the gzip stream: only this coronal plane of every frame is kept.
plane = read_volume(inp.pet, np.float32, slab=np.s_[:, y, :, :], ndim=4)  # (x, z, t)
lab = labels[:, y, :]
mids_min = (np.array(meta["FrameTimesStart"]) + np.array(meta["FrameDuration"]) / 2) / 60
print(f"coronal slice y = {y}, image {plane.shape}", file=sys.stderr)

shown = ["lungs", "heart", "liver", "kidneys", "spleen", "aorta", "bones", "bladder", "tumour"]
colours = dict(zip(shown, plt.get_cmap("tab10").colors, strict=False))
fig, (ax, ax_tac) = plt.subplots(
    1, 2, figsize=(10, 6), gridspec_kw={"width_ratios": [1.1, 1]}, layout="constrained"
)
late = plane[:, :, -1]
extent = (0, late.shape[0] * voxel, 0, late.shape[1] * voxel)
# x runs from the patient's right to left: plotted left to right, the radiological view.
ax.imshow(
    late.T, origin="lower", cmap="gray_r", extent=extent, vmax=np.percentile(late[lab > 0], 99.5)
)
index = {name: k for k, name in LABELS.items()}
for name in shown:
    mask = (lab == index[name]).T.astype(float)
    if mask.any():
        ax.contour(mask, levels=[0.5], colors=[colours[name]], linewidths=0.9, extent=extent)
        tac = plane[lab == index[name]].mean(axis=0)
        style = "-" if name in PAPER_ORGANS else "--"
        ax_tac.plot(mids_min, tac, style, color=colours[name], label=name)
subject = snakemake.params.subject  # noqa: F821
ax.set_title(f"{subject} ({meta['PhantomSize']}), frame {len(mids_min)} ({mids_min[-1]:.0f} min)")
ax.set_xlabel("patient right  ->  left (mm)")
ax.set_ylabel("inferior  ->  superior (mm)")
ax_tac.set_xscale("symlog", linthresh=2)
ax_tac.set_yscale("log")
ax_tac.set_xlabel("time (min)")
ax_tac.set_ylabel("mean activity in the slice (kBq/ml)")
ax_tac.legend(fontsize=8, ncol=2)
# save_figure: no CreationDate in the PDF, so a rerun writes the same bytes.
save_figure(fig, snakemake.output.png, dpi=90)  # noqa: F821
save_figure(fig, snakemake.output.pdf)  # noqa: F821
