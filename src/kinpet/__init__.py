"""kinpet: voxel-wise kinetic modelling of dynamic FDG PET.

Modules: ``frames`` (frame schedules), ``inputfunction`` (arterial input functions),
``kinetics`` (the exact irreversible two-tissue model), ``fitting`` (curve_fit and
the fast global fitter, whose code is the package ``fastfit``), ``io`` and ``cli``.
"""

import os

# torch's CPU build calls MKL, whose default path chooses its kernels at run time: with
# more threads than free cores (jobs side by side, a loaded SLURM node) a process's first
# calls could take another path and its exp differ by an ulp, so one subject's simulated
# PET differed between two runs of the same config. MKL reads this setting at its first
# call: importing kinpet before any torch operation fixes the path (a user's own value is
# kept). The cost is within run-to-run noise (benchmarks/fitting.py, the model).
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

__version__ = "0.1.0"
