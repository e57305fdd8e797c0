"""Figure: exact frame-averaged model vs mid-time and the paper's discrete model."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kinpet.figures import save_figure  # noqa: E402
from kinpet.readers import read_table, script_log  # noqa: E402

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
curves = read_table(
    snakemake.input[0],  # noqa: F821
    ["organ", "sampling", "frame_start_s", "frame_duration_s", "activity_kbq_per_ml"],
)
organs = list(dict.fromkeys(curves["organ"]))
styles = {"average": "-", "mid": "--", "paper": ":"}
fig, axes = plt.subplots(2, len(organs), figsize=(2.6 * len(organs), 5.2), sharex=True)
for col, organ in enumerate(organs):
    one = curves[curves["organ"] == organ]
    exact = one[one["sampling"] == "average"]
    t_min = (exact["frame_start_s"] + exact["frame_duration_s"] / 2) / 60
    peak = exact["activity_kbq_per_ml"].max()
    for sampling, style in styles.items():
        y = one[one["sampling"] == sampling]["activity_kbq_per_ml"].to_numpy()
        axes[0, col].plot(t_min, y, style, label=sampling)
        deviation = 100 * (y - exact["activity_kbq_per_ml"].to_numpy()) / peak
        axes[1, col].plot(t_min, deviation, style, label=sampling)
    axes[0, col].set_title(organ)
    axes[0, col].set_xscale("symlog", linthresh=2)
    axes[1, col].set_xlabel("time (min)")
axes[0, 0].set_ylabel("activity (kBq/ml)")
axes[1, 0].set_ylabel("difference to exact\n(% of peak)")
axes[0, -1].legend(fontsize=8)
fig.tight_layout()
# save_figure: no CreationDate in the PDF, so a rerun writes the same bytes.
save_figure(fig, snakemake.output.png, dpi=120)  # noqa: F821
save_figure(fig, snakemake.output.pdf)  # noqa: F821
