"""Constants used across kinpet, in one torch-free place.

The irreversible two-tissue model's parameters, their units and the paper's bounds
(De Benetti et al. 2023, Sec. 2.2: the network's multi-clamp and curve_fit use the same),
the F-18 decay constant and the paper's frame durations.
"""

import math

PARAMETER_NAMES = ("K1", "k2", "k3", "Vb")
PARAMETER_UNITS = ("ml/cm3/min", "1/min", "1/min", "1")
PAPER_LOWER = (0.01, 0.01, 0.01, 0.0)
PAPER_UPPER = (2.0, 3.0, 1.0, 1.0)

# A Gaussian's standard deviation per unit of its full width at half maximum.
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))

# F-18 half-life (min), as in NIST's table of radionuclide half-lives (109.77 min).
F18_HALF_LIFE_MIN = 109.771
F18_LAMBDA_PER_MIN = math.log(2.0) / F18_HALF_LIFE_MIN

# The paper's Biograph Vision Quadra protocol (De Benetti et al. 2023, Sec. 2.4), in
# the order of the published code: 2x10 s, 30x2 s, 4x10 s, 8x30 s, 4x60 s, 5x120 s, 9x300 s.
PAPER_DURATIONS_S = (10.0,) * 2 + (2.0,) * 30 + (10.0,) * 4 + (30.0,) * 8
PAPER_DURATIONS_S += (60.0,) * 4 + (120.0,) * 5 + (300.0,) * 9
