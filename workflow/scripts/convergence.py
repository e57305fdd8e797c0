"""Learning curves of the convergence study: losses against the fast fitter's floor and the
test subject's organ bias against the truth, per epoch and trained ablation."""

import sys

import pandas as pd

from kinpet.convergence import learning_curves
from kinpet.figures import convergence_figure, save_figure
from kinpet.io import KinpetInputError, atomic_path
from kinpet.readers import read_table, script_log

script_log(snakemake.log[0])  # noqa: F821 (stderr to the log; bad input: one line)
sm = snakemake  # noqa: F821
tables = []
for ablation, log_path in sm.params.logs.items():
    monitor_path = sm.params.monitors[ablation]
    monitor = read_table(monitor_path, ["epoch"], sep=",")
    if monitor.empty:
        raise KinpetInputError(f"{monitor_path}: no monitored epochs (is training.monitor on?)")
    tables.append(
        learning_curves(read_table(log_path, ["epoch"], sep=","), monitor).assign(ablation=ablation)
    )
curves = pd.concat(tables, ignore_index=True)
with atomic_path(sm.output.csv) as tmp:
    curves.to_csv(tmp, index=False)
fig = convergence_figure(curves, sm.params.organs)
save_figure(fig, sm.output.png)
save_figure(fig, sm.output.pdf)
print(curves.to_string(), file=sys.stderr)
