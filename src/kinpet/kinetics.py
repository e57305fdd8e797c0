"""The irreversible two-tissue compartment model (k4 = 0) with blood volume.

    C(t) = (1 - Vb) C_T(t) + Vb A(t),   C_T(t) = K1/beta [k3 I(t) + k2 E(t)],   beta = k2 + k3

with A the input function, I(t) = int_0^t A and E(t) = int_0^t A(s) exp(-beta (t - s)) ds
(Eq. 2 of De Benetti et al. 2023; docs/model.md). Time is in minutes inside the
model, K1 in ml/cm^3/min, k2 and k3 in 1/min; frame schedules and input functions keep
seconds and are converted here.

Because A is piecewise linear, every quantity is exact in closed form on the knots (the
input samples plus every frame start, end and, for ``mid``, mid-time). E follows a
recursion that only ever multiplies by exp(-beta h) <= 1, so it stays finite in float32.

Sampling modes:

``average`` (default)
    The exact average of the model over each frame, as a scanner reports it.
``mid``
    The exact model at each frame's mid-time.
``paper``
    The published code's discrete model: a 0.1-min grid from the first to the last
    frame start, the input linearly interpolated (and linearly extrapolated) onto it, a
    discrete convolution with a one-step delay, and linear interpolation at the frame
    starts (rounded to 0.01 min).
"""

from __future__ import annotations

import numpy as np
import torch

from kinpet.constants import PAPER_LOWER, PAPER_UPPER, PARAMETER_NAMES, PARAMETER_UNITS
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction

__all__ = ["PAPER_LOWER", "PAPER_UPPER", "PARAMETER_NAMES", "PARAMETER_UNITS"]  # and below
SAMPLING_MODES = ("average", "mid", "paper")

# Below this value of x = beta*h the phi functions use their Taylor series (8 terms,
# remainder < 1e-10); above it the closed forms lose < 2e-6 to cancellation in float32.
_SERIES_BELOW = 0.5
_SERIES_TERMS = 8
PAPER_STEP_MIN = 0.1
_CHUNK_VOXELS = 16384


def ki(params):
    """Net influx rate Ki = K1 k3 / (k2 + k3) in ml/cm^3/min; ``params`` has shape [..., 4]."""
    k1, k2, k3 = params[..., 0], params[..., 1], params[..., 2]
    return k1 * k3 / (k2 + k3)


def tacs(
    model: str,
    params,
    input_function: InputFunction,
    frames: FrameSchedule,
    sampling: str = "average",
    delay_s: float = 0.0,
    blood_function: InputFunction | None = None,
) -> np.ndarray:
    """Model curves of any known model (:data:`kinpet.models.MODELS`), one entry point.

    Parameters
    ----------
    model : str
        ``"irreversible_2tc"``, ``"reversible_2tc"`` or ``"one_tc"``.
    params : array_like, shape [..., n_parameters]
        In the order of the model's parameter names (``get_model(model).parameters``).
    input_function, frames, sampling
        As for :func:`irreversible_2tc`.
    delay_s : float
        The input shifted this much later (s), in the tissue and the blood term alike.
    blood_function : InputFunction, optional
        Whole blood for the Vb term (``input_function`` then is the plasma input); also
        delayed by ``delay_s``.

    Returns
    -------
    numpy.ndarray, shape [..., n_frames]
    """
    from kinpet.models import get_model

    spec = get_model(model)
    blood = None if blood_function is None else blood_function.delayed(delay_s)
    kinetic_model = KineticModel(input_function.delayed(delay_s), frames, sampling, blood)
    return spec.curves(params, kinetic_model)


def reversible_rates(k2, k3, k4):
    """The two rates (1/min) of the reversible two-tissue model's impulse response,
    alpha_1 <= alpha_2, the roots of a^2 - (k2 + k3 + k4) a + k2 k4; alpha_1 is computed
    as k2 k4 / alpha_2 (no cancellation when k4 is small; 0 when k4 = 0)."""
    s = k2 + k3 + k4
    disc = s * s - 4 * k2 * k4
    root = disc.clamp(min=0).sqrt() if torch.is_tensor(disc) else np.sqrt(np.maximum(disc, 0.0))
    alpha2 = (s + root) / 2
    return k2 * k4 / alpha2, alpha2


def reversible_2tc(
    params,
    input_function: InputFunction,
    frames: FrameSchedule,
    sampling="average",
    blood_function: InputFunction | None = None,
):
    """The reversible two-tissue model with blood volume, for many voxels at once.

        C = (1 - Vb) C_T + Vb A,
        C_T = K1 / (a2 - a1) [(k3 + k4 - a1) E_a1 + (a2 - k3 - k4) E_a2]

    with a1, a2 from :func:`reversible_rates` and E_a the input convolved with exp(-a t),
    exact like :func:`irreversible_2tc` (k4 = 0 gives that model: a1 = 0, E_0 = I).
    k3 must be > 0 (with k3 = 0 and k2 = k4 the two rates coincide).

    Parameters
    ----------
    params : numpy.ndarray or torch.Tensor, shape [..., 5]
        K1 (ml/cm^3/min), k2, k3, k4 (1/min), Vb per voxel.
    input_function, frames, sampling, blood_function
        As for :func:`irreversible_2tc`.
    """
    return _reversible_curves(
        params, KineticModel(input_function, frames, sampling, blood_function)
    )


def _reversible_curves(params, model: KineticModel):
    if not torch.is_tensor(params):
        p = torch.from_numpy(np.ascontiguousarray(np.asarray(params, dtype=np.float64)))
        with torch.no_grad():
            return _reversible_curves(p, model).numpy()
    if params.shape[-1:] != (5,):
        raise ValueError(
            f"params must have shape [..., 5] (K1, k2, k3, k4, Vb), got {tuple(params.shape)}"
        )
    k1, k2, k3, k4, vb = params.unbind(-1)
    a1, a2 = reversible_rates(k2, k3, k4)
    first, second = model.basis(a1), model.basis(a2)  # [..., T, 3]: A, I, E
    c1 = k1 * (k3 + k4 - a1) / (a2 - a1)
    c2 = k1 * (a2 - k3 - k4) / (a2 - a1)
    tissue = c1[..., None] * first[..., 2] + c2[..., None] * second[..., 2]
    return (1 - vb)[..., None] * tissue + vb[..., None] * first[..., 0]


def irreversible_2tc(
    params,
    input_function: InputFunction,
    frames: FrameSchedule,
    sampling="average",
    blood_function: InputFunction | None = None,
):
    """Model time-activity curves for many voxels at once.

    Parameters
    ----------
    params : numpy.ndarray or torch.Tensor, shape [..., 4]
        K1 (ml/cm^3/min), k2 (1/min), k3 (1/min), Vb (unitless) per voxel.
        ``k2 + k3`` must be > 0.
    input_function : InputFunction
        Arterial input, same concentration unit as the returned curves.
    frames : FrameSchedule
        The scan's frames (s).
    sampling : {"average", "mid", "paper"}
        How the continuous model is turned into one value per frame (module docstring).
    blood_function : InputFunction, optional
        Whole blood for the Vb term, when ``input_function`` is the plasma input of the
        tissue term (PET-BIDS ``plasma_radioactivity`` and ``whole_blood_radioactivity``).
        Default: ``input_function`` in both terms.

    Returns
    -------
    numpy.ndarray or torch.Tensor, shape [..., n_frames]
        Same kind as ``params``: numpy in, float64 numpy out; torch in, torch out on the
        same device and dtype (differentiable).
    """
    return KineticModel(input_function, frames, sampling, blood_function)(params)


class KineticModel:
    """The model for one input function and frame schedule, precomputed once.

    Calling it is what :func:`irreversible_2tc` does; keep an instance when the same
    input and frames are evaluated many times (training, fitting).
    """

    def __init__(
        self,
        input_function: InputFunction,
        frames: FrameSchedule,
        sampling="average",
        blood_function: InputFunction | None = None,
    ):
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, not {sampling!r}")
        if not isinstance(frames, FrameSchedule):
            raise TypeError("frames must be a kinpet.frames.FrameSchedule")
        if not isinstance(input_function, InputFunction):
            raise TypeError("input_function must be a kinpet.inputfunction.InputFunction")
        if blood_function is not None and not isinstance(blood_function, InputFunction):
            raise TypeError("blood_function must be a kinpet.inputfunction.InputFunction or None")
        self.input_function = input_function
        self.blood_function = blood_function
        self.frames = frames
        self.sampling = sampling
        self._plan = _plan(input_function, frames, sampling)
        if blood_function is not None:
            # Only the Vb term sees whole blood: its frame values replace the input's.
            blood_plan = _plan(blood_function, frames, sampling)
            key = "a_at_starts" if sampling == "paper" else "a_values"
            self._plan[key] = blood_plan[key]
        self._tensors = {}

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    def __call__(self, params):
        if torch.is_tensor(params):
            return self._evaluate(params)
        p = np.asarray(params, dtype=np.float64)
        with torch.no_grad():
            return self._evaluate(torch.from_numpy(np.ascontiguousarray(p))).numpy()

    def _constants(self, device, dtype):
        key = (device, dtype)
        if key not in self._tensors:
            # Cached constants made under inference mode could never enter autograd later
            # (a model evaluated first, then trained on), so they are made outside it.
            with torch.inference_mode(False):
                self._tensors[key] = {
                    k: _as_tensor(v, device, dtype) for k, v in self._plan.items()
                }
        return self._tensors[key]

    def _evaluate(self, params: torch.Tensor) -> torch.Tensor:
        if params.shape[-1:] != (4,):
            raise ValueError(
                f"params must have shape [..., 4] (K1, k2, k3, Vb), got {tuple(params.shape)}"
            )
        if not params.is_floating_point():
            params = params.double()
        batch_shape = params.shape[:-1]
        flat = params.reshape(-1, 4)
        c = self._constants(flat.device, flat.dtype)
        # Chunks keep the per-step work in cache; results are the same for any chunking.
        parts = [self._frames_by_voxel(chunk, c) for chunk in flat.split(_CHUNK_VOXELS)]
        tac = torch.cat(parts, dim=1) if len(parts) != 1 else parts[0]
        return tac.transpose(0, 1).reshape(*batch_shape, self.n_frames)

    def basis(self, beta: torch.Tensor) -> torch.Tensor:
        """The model's three curves A, I and E_beta per frame, shape [..., n_frames, 3].

        C = Vb A + (1 - Vb) K1/beta (k3 I + k2 E_beta) is linear in them for a given
        beta = k2 + k3 (used by :mod:`kinpet.projection`). ``beta`` (1/min) has any shape.
        """
        flat = beta.reshape(-1)
        c = self._constants(flat.device, flat.dtype)
        parts = []
        for chunk in flat.split(_CHUNK_VOXELS):
            blood, rate, conv = self._curves(chunk, c)
            shared = torch.stack([blood, rate], dim=1)[:, :, None].expand(-1, -1, chunk.shape[0])
            parts.append(torch.cat([shared, conv[:, None]], dim=1))  # [T, 3, n]
        curves = torch.cat(parts, dim=2) if len(parts) != 1 else parts[0]
        return curves.permute(2, 0, 1).reshape(*beta.shape, self.n_frames, 3)

    def _curves(self, beta: torch.Tensor, c: dict):
        """A [T], I [T] and E_beta [T, n] of the sampling mode."""
        if self.sampling == "paper":
            rate, conv = _paper_convolutions(beta, c)
            return c["a_at_starts"], rate, conv
        return c["a_values"], c["i_values"], _exponential_convolution(beta, c, self.sampling)

    def _frames_by_voxel(self, flat: torch.Tensor, c: dict) -> torch.Tensor:
        k1, k2, k3, vb = flat.unbind(-1)
        beta = k2 + k3
        tissue_scale = (1 - vb) * k1 / beta
        blood, rate, conv = self._curves(beta, c)
        # C = (1-Vb) K1/beta (k3 I + k2 E) + Vb A, with the voxel-independent I and A terms
        # as one outer product.
        shared = torch.stack([rate, blood], dim=1) @ torch.stack([tissue_scale * k3, vb])
        return torch.addcmul(shared, conv, tissue_scale * k2)


def _as_tensor(value, device, dtype):
    """Float arrays of the plan become tensors; index arrays and lists stay as they are."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return torch.as_tensor(value, device=device, dtype=dtype)
    return value


# -- exact model on knots --------------------------------------------------------------------


def _plan(input_function: InputFunction, frames: FrameSchedule, sampling: str) -> dict:
    if sampling == "paper":
        return _paper_plan(input_function, frames)
    input_function.check_covers(frames)
    return _knot_plan(input_function, frames, with_mids=sampling == "mid")


def _knot_plan(input_function: InputFunction, frames: FrameSchedule, with_mids: bool) -> dict:
    """Voxel-independent quantities of the exact model, in float64 (minutes)."""
    points = [input_function.knots_s, frames.starts_s, frames.ends_s]
    if with_mids:
        points.append(frames.mids_s)
    knots_s = np.unique(np.concatenate(points))
    knots_s = knots_s[knots_s <= frames.end_s]
    if knots_s[0] > 0:
        knots_s = np.concatenate([[0.0], knots_s])
    a = input_function(knots_s)
    t = knots_s / 60.0
    h = np.diff(t)
    # Steps of equal length share their phi functions: a schedule has few distinct lengths.
    h_unique, step_kind = np.unique(np.round(h, 12), return_inverse=True)
    da = np.diff(a)
    cum_i = np.concatenate([[0.0], np.cumsum(h * (a[:-1] + a[1:]) / 2)])  # I at knots
    # Exact integral of I over each step: I is piecewise quadratic.
    step_ii = h * cum_i[:-1] + h**2 * (2 * a[:-1] + a[1:]) / 6
    cum_ii = np.concatenate([[0.0], np.cumsum(step_ii)])
    start_k = np.searchsorted(knots_s, frames.starts_s)
    end_k = np.searchsorted(knots_s, frames.ends_s)
    # Which frame each step belongs to (-1: in no frame, e.g. a gap between frames).
    step_frame = np.full(h.size, -1)
    for f, (k0, k1) in enumerate(zip(start_k, end_k, strict=True)):
        step_frame[k0:k1] = f
    # Input terms of each step (and of each frame's integral) as weights on the distinct
    # step lengths: columns [0, U) multiply a_j, columns [U, 2U) multiply da_j.
    n_kinds = h_unique.size
    steps = np.arange(h.size)
    step_source = np.zeros((h.size, 2 * n_kinds))
    step_source[steps, step_kind] = a[:-1]
    step_source[steps, n_kinds + step_kind] = da
    frame_source = np.zeros((len(frames), 2 * n_kinds))
    inside = step_frame >= 0
    np.add.at(frame_source, (step_frame[inside], step_kind[inside]), a[:-1][inside])
    np.add.at(frame_source, (step_frame[inside], n_kinds + step_kind[inside]), da[inside])
    dur_min = frames.durations_min
    plan = {
        "h_unique": h_unique,
        "step_kind": step_kind.tolist(),
        "step_frame": step_frame.tolist(),
        "step_source": step_source,
        "frame_source": frame_source,
        "durations": dur_min,
        "mid_knots": np.searchsorted(knots_s, frames.mids_s) if with_mids else None,
    }
    if with_mids:
        plan["i_values"] = cum_i[plan["mid_knots"]]
        plan["a_values"] = a[plan["mid_knots"]]
    else:
        plan["i_values"] = (cum_ii[end_k] - cum_ii[start_k]) / dur_min
        plan["a_values"] = (cum_i[end_k] - cum_i[start_k]) / dur_min
    return plan


def phi_functions(x: torch.Tensor):
    """phi1 = (1-e^-x)/x, phi2 = (x-1+e^-x)/x^2, phi3 = (x^2/2-x+1-e^-x)/x^3, for x >= 0.

    phi_k(x) = sum_n (-x)^n / (n+k)!; the series is used for small x, where the closed
    forms cancel.
    """
    small = x < _SERIES_BELOW
    # phi3 by Horner on its series, then phi2 = 1/2 - x phi3 and phi1 = 1 - x phi2 (stable
    # for small x).
    s3 = torch.full_like(x, 1.0 / _factorial(_SERIES_TERMS + 2))
    for n in reversed(range(_SERIES_TERMS - 1)):
        s3 = 1.0 / _factorial(n + 3) - x * s3
    s2 = 0.5 - x * s3
    s1 = 1.0 - x * s2
    xs = torch.where(small, torch.ones_like(x), x)  # keeps the unused branch finite
    em = torch.expm1(-xs)
    d1 = -em / xs
    d2 = (xs + em) / xs**2
    d3 = (0.5 * xs**2 - xs - em) / xs**3
    return torch.where(small, s1, d1), torch.where(small, s2, d2), torch.where(small, s3, d3)


def _factorial(n: int) -> float:
    out = 1.0
    for k in range(2, n + 1):
        out *= k
    return float(out)


def _exponential_convolution(beta: torch.Tensor, c: dict, sampling: str) -> torch.Tensor:
    """E_beta per frame, shape [n_frames, n_voxels]: frame averages or mid-time values.

    Over a step of length h from knot j, with x = beta h and the input rising by da:
        E_{j+1} = e^-x E_j + a_j h phi1(x) + da h phi2(x)
        int E   = E_j h phi1(x) + a_j h^2 phi2(x) + da h^2 phi3(x).
    The input terms are linear in (a_j, da), so they are summed per step (and per frame)
    with one matrix product over the few distinct step lengths; only the E_j terms need
    the sequential recursion.
    """
    h = c["h_unique"][:, None]
    x = h * beta[None, :]
    phi1, phi2, phi3 = phi_functions(x)
    gain = h * phi1  # (1 - e^-x) / beta
    source = c["step_source"] @ torch.cat([gain, h * phi2])  # [n_steps, n_voxels]
    # Rows are taken by unbind, not indexing: the backward of an index into a [n_steps, n]
    # tensor is a full-size tensor per step, which made the loss's backward pass quadratic
    # in the number of steps.
    sources, decays, gains = source.unbind(0), torch.exp(-x).unbind(0), gain.unbind(0)
    e = torch.zeros_like(beta)
    if sampling == "mid":
        wanted = set(c["mid_knots"].tolist())
        at_mids = []
        for j, kind in enumerate(c["step_kind"]):
            e = torch.addcmul(sources[j], decays[kind], e)
            if j + 1 in wanted:
                at_mids.append(e)
        return torch.stack(at_mids)
    integrals = (c["frame_source"] @ torch.cat([h * h * phi2, h * h * phi3])).unbind(0)
    sums = []
    acc, current = None, -1
    for j, (kind, frame) in enumerate(zip(c["step_kind"], c["step_frame"], strict=True)):
        if frame != current:
            if acc is not None:
                sums.append(acc)
            acc, current = (integrals[frame] if frame >= 0 else None), frame
        if frame >= 0:
            acc = torch.addcmul(acc, gains[kind], e)
        e = torch.addcmul(sources[j], decays[kind], e)
    if acc is not None:
        sums.append(acc)
    return torch.stack(sums) / c["durations"][:, None]


# -- the paper's discrete model ----------------------------------------------------------------


def _interp_linear_extrapolate(x, xp, fp):
    """Linear interpolation that extends the first and last segments (as the paper's code)."""
    idx = np.clip(np.searchsorted(xp, x, side="right") - 1, 0, xp.size - 2)
    slope = (fp[idx + 1] - fp[idx]) / (xp[idx + 1] - xp[idx])
    return fp[idx] + slope * (x - xp[idx])


def _paper_plan(input_function: InputFunction, frames: FrameSchedule) -> dict:
    starts = np.round(frames.starts_min, 2)
    grid = np.arange(starts[0], starts[-1], PAPER_STEP_MIN)
    if grid.size < 2:
        raise ValueError("sampling='paper' needs frames spanning at least 0.2 min")
    a = _interp_linear_extrapolate(grid, input_function.times_s / 60.0, input_function.values)
    # Frame starts on the grid: the segment each falls in, extended at the ends.
    seg = np.clip(np.searchsorted(grid, starts, side="right") - 1, 0, grid.size - 2)
    weight = (starts - grid[seg]) / (grid[seg + 1] - grid[seg])
    # conv[i] = step * sum_{m<i} a[i-1-m] h[m]; its k3 part needs only the running sum of a.
    running = PAPER_STEP_MIN * np.concatenate([[0.0], np.cumsum(a)[:-1]])
    return {
        "grid_a": a,
        "t0": float(grid[0]),
        "seg": seg,
        "weight": weight,
        "rate_at_starts": running[seg] + weight * (running[seg + 1] - running[seg]),
        "a_at_starts": a[seg] + weight * (a[seg + 1] - a[seg]),
    }


def _paper_convolutions(beta: torch.Tensor, c: dict):
    """The k3 and k2 convolution terms of the paper's model at the frame starts."""
    seg = c["seg"].tolist()
    need = sorted(set(seg) | {s + 1 for s in seg})
    ratio = torch.exp(-PAPER_STEP_MIN * beta)
    # d[i] = sum_{m<i} a[i-1-m] ratio^m, by the recursion d[i] = a[i-1] + ratio d[i-1].
    a = c["grid_a"].tolist()
    d = torch.zeros_like(beta)
    at = {0: d}
    for i in range(1, need[-1] + 1):
        d = a[i - 1] + ratio * d
        if i in at or i in need:
            at[i] = d
    lo = torch.stack([at[s] for s in seg])
    hi = torch.stack([at[s + 1] for s in seg])
    w = c["weight"][:, None]
    tissue = PAPER_STEP_MIN * torch.exp(-beta * c["t0"]) * (lo + w * (hi - lo))
    return c["rate_at_starts"], tissue
