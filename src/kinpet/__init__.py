"""kinpet: voxel-wise kinetic modelling of dynamic FDG PET.

Modules: ``frames`` (frame schedules), ``inputfunction`` (arterial input functions),
``kinetics`` (the exact irreversible two-tissue model), ``fitting`` (curve_fit and
the fast global fitter, whose code is the package ``fastfit``), ``io`` and ``cli``.
"""

__version__ = "0.1.0"
