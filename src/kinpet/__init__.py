"""kinpet: voxel-wise kinetic modelling of dynamic FDG PET.

Modules: ``frames`` (frame schedules), ``inputfunction`` (arterial input functions),
``kinetics`` (the exact compartment models; ``models``: their registry), ``fitting`` and
``modelfit`` (curve_fit and the fast global fitter, whose code is the package ``fastfit``),
``anatomy``, ``phantom`` and ``simulation`` (the digital phantom), ``io`` and ``cli``;
README.md lists the rest.
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
