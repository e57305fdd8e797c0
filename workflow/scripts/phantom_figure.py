"""Figure: a coronal and an axial slice of a phantom subject (last frame, organ contours)
beside its label map, the organs' curves, and the respiratory motion trace."""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kinpet.anatomy import LABEL_INDEX, LABELS, PAPER_ORGANS, coronal_slice_index  # noqa: E402
from kinpet.figures import save_figure  # noqa: E402
from kinpet.io import KinpetInputError  # noqa: E402
from kinpet.motion import Breathing, breathing_state, frame_states  # noqa: E402
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
# The axial slice with the most liver (else body) voxels: liver, kidneys, spleen in one cut.
liver = (labels == LABEL_INDEX["liver"]).sum(axis=(0, 1))
z = int(np.argmax(liver if liver.any() else (labels > 0).sum(axis=(0, 1))))
# One pass through the gzip stream per plane: only these planes of every frame are kept.
plane = read_volume(inp.pet, np.float32, slab=np.s_[:, y, :, :], ndim=4)  # (x, z, t)
axial = read_volume(inp.pet, np.float32, slab=np.s_[:, :, z, -1], ndim=4)  # (x, y)
lab = labels[:, y, :]
starts, durations = np.array(meta["FrameTimesStart"]), np.array(meta["FrameDuration"])
mids_min = (starts + durations / 2) / 60
print(f"coronal slice y = {y}, axial slice z = {z}, image {plane.shape}", file=sys.stderr)

shown = ["lungs", "heart", "liver", "kidneys", "spleen", "aorta", "bones", "bladder", "tumour"]
colours = dict(zip(shown, plt.get_cmap("tab10").colors, strict=False))
fig, axes = plt.subplots(
    2, 3, figsize=(14, 9), gridspec_kw={"width_ratios": [1, 1, 1.1]}, layout="constrained"
)
(ax, ax_lab, ax_tac), (ax_ax, ax_axlab, ax_motion) = axes
# A fixed colour per label value, the contours' for the contoured organs, so that the
# panels and the legend agree.
spare = iter(plt.get_cmap("Pastel1").colors)
label_colours = [
    "white" if k == 0 else "0.85" if k == 1 else colours.get(name) or next(spare)
    for k, name in sorted(LABELS.items())
]
label_cmap = matplotlib.colors.ListedColormap(label_colours)


def show_plane(ax_img, ax_labels, image, labels_2d, extent, title, xlabel, ylabel, flip=False):
    """An activity plane with organ contours beside its label map (x right -> left: the
    radiological view; ``flip``: the second axis runs downwards)."""
    body = labels_2d > 0
    vmax = np.percentile(image[body], 99.5) if body.any() else None
    ax_img.imshow(image.T, origin="lower", cmap="gray_r", extent=extent, vmax=vmax)
    for name in shown:
        mask = (labels_2d == LABEL_INDEX[name]).T.astype(float)
        if mask.any():
            ax_img.contour(
                mask, levels=[0.5], colors=[colours[name]], linewidths=0.9, extent=extent
            )
    ax_labels.imshow(
        labels_2d.T,
        origin="lower",
        cmap=label_cmap,
        vmin=-0.5,
        vmax=len(LABELS) - 0.5,
        extent=extent,
        interpolation="nearest",
    )
    for a, what in ((ax_img, "activity, last frame"), (ax_labels, "label map")):
        if flip:
            a.invert_yaxis()
        a.set_title(f"{title}: {what}", fontsize=9)
        a.set_xlabel(xlabel)
        a.set_ylabel(ylabel)


nx, ny, nz = labels.shape
show_plane(
    ax,
    ax_lab,
    plane[:, :, -1],
    lab,
    (0, nx * voxel, 0, nz * voxel),
    f"coronal y = {y}",
    "patient right  ->  left (mm)",
    "inferior  ->  superior (mm)",
)
show_plane(
    ax_ax,
    ax_axlab,
    axial,
    labels[:, :, z],
    (0, nx * voxel, 0, ny * voxel),
    f"axial z = {z}",
    "patient right  ->  left (mm)",
    "anterior  ->  posterior (mm)",  # y runs front to back: anterior up, as a radiologist reads
    flip=True,
)
present = [k for k in np.unique(labels) if k > 0]
ax_axlab.legend(
    handles=[matplotlib.patches.Patch(color=label_colours[k], label=LABELS[k]) for k in present],
    fontsize=7,
    loc="upper center",
    bbox_to_anchor=(0.5, -0.16),
    ncol=4,
    frameon=False,
)
for name in shown:
    mask = lab == LABEL_INDEX[name]
    if mask.any():
        style = "-" if name in PAPER_ORGANS else "--"
        ax_tac.plot(mids_min, plane[mask].mean(axis=0), style, color=colours[name], label=name)
subject = snakemake.params.subject  # noqa: F821
fig.suptitle(
    f"{subject} ({meta['PhantomSize']}), last frame {len(mids_min)} ({mids_min[-1]:.0f} min)"
)
ax_tac.set_xscale("symlog", linthresh=2)
ax_tac.set_yscale("log")
ax_tac.set_xlabel("time (min)")
ax_tac.set_ylabel("mean activity in the coronal slice (kBq/ml)")
ax_tac.legend(fontsize=8, ncol=2)

# The motion trace: the diaphragm's displacement over the first breaths, and what each
# frame records (its time average), against the frame's mid-time.
motion = meta.get("PhantomRespiratoryMotion")
if motion is None:
    ax_motion.text(0.5, 0.5, "no respiratory motion", ha="center", va="center")
    ax_motion.set_axis_off()
else:
    breathing = Breathing(
        motion["AmplitudeZmm"], motion["AmplitudeYmm"], motion["PeriodSeconds"], motion["PhaseBins"]
    )
    t = np.linspace(0.0, 3 * breathing.period_s, 300)
    state = breathing_state(t, breathing.period_s)
    recorded = frame_states(starts, durations, breathing)
    for amplitude, axis, colour in (
        (breathing.amplitude_z_mm, "z (feet)", "C0"),
        (breathing.amplitude_y_mm, "y (anterior)", "C3"),
    ):
        ax_motion.plot(
            t, state * amplitude, color=colour, lw=0.8, alpha=0.6, label=f"{axis}: continuous"
        )
        ax_motion.plot(
            starts + durations / 2,
            recorded * amplitude,
            "o-",
            color=colour,
            ms=2.5,
            lw=1,
            label=f"{axis}: frame mean",
        )
    ax_motion.set_xscale("symlog", linthresh=10)
    ax_motion.set_xlabel("time (s)")
    ax_motion.set_ylabel("displacement at the diaphragm (mm)")
    ax_motion.set_title(
        f"breathing: period {breathing.period_s:g} s, {breathing.bins} phase bins", fontsize=9
    )
    ax_motion.legend(fontsize=7)
# save_figure: no CreationDate in the PDF, so a rerun writes the same bytes.
save_figure(fig, snakemake.output.png, dpi=90)  # noqa: F821
save_figure(fig, snakemake.output.pdf)  # noqa: F821
