"""Learning curves of the convergence study: losses against the fast fitter's floor and the
test subject's organ bias against the truth, per epoch and trained ablation."""

import sys

import pandas as pd

from kinpet.convergence import learning_curves
from kinpet.figures import convergence_figure, save_figure
from kinpet.io import atomic_path

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake injects the object)
sm = snakemake  # noqa: F821
tables = []
for ablation, log_path in sm.params.logs.items():
    monitor_path = sm.params.monitors[ablation]
    monitor = pd.read_csv(monitor_path)
    if monitor.empty:
        raise ValueError(f"{monitor_path}: no monitored epochs (is training.monitor on?)")
    tables.append(learning_curves(pd.read_csv(log_path), monitor).assign(ablation=ablation))
curves = pd.concat(tables, ignore_index=True)
with atomic_path(sm.output.csv) as tmp:
    curves.to_csv(tmp, index=False)
fig = convergence_figure(curves, sm.params.organs)
save_figure(fig, sm.output.png)
save_figure(fig, sm.output.pdf)
print(curves.to_string(), file=sys.stderr)
