"""The spatio-temporal UNet of De Benetti et al. (2023, Sec. 2.2) with its ablation switches.

Input: a batch of slices with their frames as depth, shape [B, 1, T, H, W] (T = 64: the
62 frames padded by one frame on each side). Output: one map per parameter of the kinetic
model after the final activation, [B, n, H, W]: four (K1, k2, k3, Vb) for the paper's
irreversible model, five (K1, k2, k3, k4, Vb) for the reversible one (its bounds from
:mod:`kinpet.models`).

Architecture (docs/network.md): depth 4, 8 root feature maps doubling per level, ELU,
no batch normalisation. Each block applies two convolution units; a unit is either one
3-D convolution [3, 3, 3] or, for ``space_time``, a spatial [1, 3, 3] convolution followed
by a temporal [3, 1, 1] one (the (2+1)-D factorisation of Kuestner et al.). Short skips
concatenate a block's input with its output; long skips carry that concatenation to the
decoder. Pooling is max-pooling [2, 2, 2] (``3d``) or [1, 2, 2] (``space``); the decoder's
transposed convolutions undo exactly what the pooling did. The head is a [3, 3, 3]
convolution to n channels and a [T, 1, 1] convolution that collapses time.

Differences from the published code, on purpose (each has a switch that restores the
published layout, set by the ``paper`` training recipe): its (2+1)-D blocks apply the *same*
temporal convolution in both units of a block (``shared_temporal``); here each unit has its
own. Its ``space`` pooling uses kernel [1, 2, 2] with stride 2 in every axis, so it still
halves time by skipping every other frame, and its decoder always doubles time
(``decimate_time``); here ``space`` pooling keeps every frame and the decoder does not
upsample time. Its head starts from PyTorch's default initialisation (``head_init``); here
the head's bias starts at typical FDG values.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kinpet.kinetics import PAPER_LOWER, PAPER_UPPER

CONVOLUTIONS = ("3d", "space_time")
POOLINGS = ("3d", "space")
ACTIVATIONS = ("abs", "clamp", "multi_clamp", "sigmoid", "log_beta")
HEAD_INITS = ("kinpet", "pytorch")
# The published code's single clamp (all four channels to one range).
SINGLE_CLAMP = (0.01, 3.0)
PADDED_FRAMES = 64
# Initial bias of the head's last layer (K1, k2, k3, Vb): typical FDG tissue values.
INITIAL_PARAMETERS = (0.3, 0.5, 0.05, 0.1)
# The same by name, for any model of kinpet.models (k4: FDG's is 0-0.05 1/min in most tissue).
INITIAL_VALUES = {
    **dict(zip(("K1", "k2", "k3", "Vb"), INITIAL_PARAMETERS, strict=True)),
    "k4": 0.01,
}


class _StraightThroughClamp(torch.autograd.Function):
    """Clamp in the forward pass (exact values), identity in the backward pass."""

    @staticmethod
    def forward(ctx, logits, lower, upper):
        return torch.maximum(torch.minimum(logits, upper), lower)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class ConvUnit(nn.Sequential):
    """One convolution unit: [3,3,3], or [1,3,3] then [3,1,1] for ``space_time``."""

    def __init__(self, in_channels: int, out_channels: int, convolution: str):
        if convolution == "3d":
            super().__init__(nn.Conv3d(in_channels, out_channels, 3, padding=1))
        else:
            super().__init__(
                nn.Conv3d(in_channels, out_channels, (1, 3, 3), padding=(0, 1, 1)),
                nn.Conv3d(out_channels, out_channels, (3, 1, 1), padding=(1, 0, 0)),
            )


class SharedTemporalBlock(nn.Module):
    """Two (2+1)-D units that share one temporal [3, 1, 1] convolution, each followed by ELU.

    The published code's layout: a block owns two spatial convolutions but one temporal
    one, applied after each of them.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.space_first = nn.Conv3d(in_channels, out_channels, (1, 3, 3), padding=(0, 1, 1))
        self.space_second = nn.Conv3d(out_channels, out_channels, (1, 3, 3), padding=(0, 1, 1))
        self.time_shared = nn.Conv3d(out_channels, out_channels, (3, 1, 1), padding=(1, 0, 0))
        self.elu = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.elu(self.time_shared(self.space_first(x)))
        return self.elu(self.time_shared(self.space_second(x)))


def make_block(in_channels: int, out_channels: int, convolution: str, shared_temporal: bool):
    """A block of two units: :class:`SharedTemporalBlock` for a shared temporal convolution
    of ``space_time`` units, else :class:`Block`."""
    if shared_temporal and convolution == "space_time":
        return SharedTemporalBlock(in_channels, out_channels)
    return Block(in_channels, out_channels, convolution)


class Block(nn.Sequential):
    """Two convolution units, each followed by ELU."""

    def __init__(self, in_channels: int, out_channels: int, convolution: str):
        super().__init__(
            ConvUnit(in_channels, out_channels, convolution),
            nn.ELU(),
            ConvUnit(out_channels, out_channels, convolution),
            nn.ELU(),
        )


class Upsample(nn.Sequential):
    """Transposed convolution that undoes one pooling step, keeping the channel count."""

    def __init__(self, channels: int, convolution: str, time_factor: int):
        if convolution == "3d":
            super().__init__(
                nn.ConvTranspose3d(
                    channels,
                    channels,
                    3,
                    stride=(time_factor, 2, 2),
                    padding=1,
                    output_padding=(time_factor - 1, 1, 1),
                )
            )
            return
        layers = [
            nn.ConvTranspose3d(
                channels,
                channels,
                (1, 3, 3),
                stride=(1, 2, 2),
                padding=(0, 1, 1),
                output_padding=(0, 1, 1),
            )
        ]
        if time_factor == 2:
            layers.append(
                nn.ConvTranspose3d(
                    channels,
                    channels,
                    (3, 1, 1),
                    stride=(2, 1, 1),
                    padding=(1, 0, 0),
                    output_padding=(1, 0, 0),
                )
            )
        super().__init__(*layers)


class KineticUNet(nn.Module):
    """The paper's UNet mapping dynamic slices to kinetic parameter maps.

    Parameters
    ----------
    convolution : {"3d", "space_time"}
        Plain 3-D convolutions or the (2+1)-D spatial-then-temporal factorisation.
    pooling : {"3d", "space"}
        Max-pooling over space and time [2, 2, 2] or over space only [1, 2, 2].
    activation : {"abs", "clamp", "multi_clamp", "sigmoid", "log_beta"}
        Final activation: absolute value, one clamp of all channels to [0.01, 3], a
        clamp of each channel to its parameter bounds, or a logistic map of each channel
        onto its bounds (:func:`bounded_sigmoid`: geometric for K1, k2, k3, linear for Vb),
        which keeps a gradient everywhere and puts small rate constants such as k3 = 0.01
        as close to the logits' origin as large ones; or, for networks trained with
        projection, log(k2 + k3) alone (:func:`log_beta_parameters`).
    depth : int
        Number of pooling levels (4 in the paper).
    root_features : int
        Feature maps of the first level (8 in the paper), doubling per level.
    n_frames : int
        Frames of the (padded) input, collapsed by the head (64 in the paper).
    lower, upper : sequence of n floats
        Bounds of the n parameters (the output channels) for ``multi_clamp`` and
        ``sigmoid``: the paper's of K1, k2, k3, Vb by default; another model's from
        :mod:`kinpet.models` (:func:`kinpet.training.build_model`).
    initial : sequence of n floats
        ``head_init="kinpet"``: the parameters the head's bias starts at (default
        :data:`INITIAL_PARAMETERS`, of K1, k2, k3, Vb).
    straight_through : bool
        Pass gradients through the clamps unchanged (the forward values are the clamped
        ones either way). A plain clamp has zero gradient outside its bounds; in our demo
        training the multi-clamp network then sank to its K1, k2, k3 floors and stayed
        there. False reproduces the published code's plain clamp.
    head_init : {"kinpet", "pytorch"}
        "kinpet": the bias of the head's last layer starts at ``initial`` (by default
        :data:`INITIAL_PARAMETERS`: K1 0.3 ml/cm^3/min, k2 0.5 1/min, k3 0.05 1/min, Vb 0.1;
        through
        :func:`bounded_logit` for ``sigmoid``), so that a clamped network does not start
        below its floors. "pytorch": PyTorch's default initialisation of every layer, as
        published.
    shared_temporal : bool
        ``space_time`` only: both units of a block apply one shared temporal convolution
        (:class:`SharedTemporalBlock`, as published) instead of one each.
    decimate_time : bool
        ``space`` pooling only: pool with window [1, 2, 2] but stride 2 in time too, which
        keeps every other frame, and let the decoder double time back (as published).
        False: ``space`` pooling keeps every frame.
    channels_last : bool
        Keep activations in the channels-last (NDHWC) layout: same arithmetic, several
        times faster on CPU for slices of 64 pixels and more (benchmarks/network.py).
    """

    def __init__(
        self,
        convolution: str = "space_time",
        pooling: str = "3d",
        activation: str = "multi_clamp",
        depth: int = 4,
        root_features: int = 8,
        n_frames: int = PADDED_FRAMES,
        lower=PAPER_LOWER,
        upper=PAPER_UPPER,
        channels_last: bool = True,
        straight_through: bool = True,
        head_init: str = "kinpet",
        shared_temporal: bool = False,
        decimate_time: bool = False,
        initial=INITIAL_PARAMETERS,
    ):
        super().__init__()
        n_out = len(lower)
        if len(upper) != n_out or len(initial) != n_out:
            raise ValueError(
                f"lower, upper and initial must have one value per output, got {len(lower)}, "
                f"{len(upper)} and {len(initial)}"
            )
        if activation == "log_beta" and n_out != 4:
            raise ValueError("activation 'log_beta' is for the four outputs K1, k2, k3, Vb only")
        self.n_outputs = n_out
        self.straight_through = straight_through
        for name, value, allowed in (
            ("convolution", convolution, CONVOLUTIONS),
            ("pooling", pooling, POOLINGS),
            ("activation", activation, ACTIVATIONS),
            ("head_init", head_init, HEAD_INITS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {value!r}")
        # Time halves per level with 3-D pooling and with decimating space pooling.
        time_factor = 2 if pooling == "3d" or decimate_time else 1
        if time_factor == 2 and n_frames % 2**depth:
            raise ValueError(f"n_frames={n_frames} must be divisible by 2**depth={2**depth}")
        self.convolution, self.pooling, self.activation = convolution, pooling, activation
        self.depth, self.n_frames = depth, n_frames
        self.spatial_multiple = 2**depth
        kernel = (2, 2, 2) if pooling == "3d" else (1, 2, 2)
        # A [1, 2, 2] window with stride 2 in time reads only every other frame.
        self.pool = nn.MaxPool3d(kernel, stride=(time_factor, 2, 2))
        self.encoders = nn.ModuleList()
        skip_channels = []
        channels = 1
        for level in range(depth):
            out = root_features * 2**level
            self.encoders.append(make_block(channels, out, convolution, shared_temporal))
            skip_channels.append(channels + out)  # short skip: input beside output
            channels = out
        self.bottleneck = make_block(
            channels, root_features * 2**depth, convolution, shared_temporal
        )
        channels = root_features * 2**depth
        self.upsamples = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            out = root_features * 2**level
            self.upsamples.append(Upsample(channels, convolution, time_factor))
            self.decoders.append(
                make_block(channels + skip_channels[level], out, convolution, shared_temporal)
            )
            channels = out
        self.head = nn.Sequential(
            nn.Conv3d(channels, n_out, 3, padding=1),
            nn.Conv3d(n_out, n_out, (n_frames, 1, 1)),
        )
        bound = {"dtype": torch.float32}
        self.register_buffer("lower", torch.tensor(lower, **bound).view(1, n_out, 1, 1))
        self.register_buffer("upper", torch.tensor(upper, **bound).view(1, n_out, 1, 1))
        if head_init == "kinpet":
            # Start the outputs at typical FDG values instead of near 0: below the K1, k2,
            # k3 floors a clamp passes no gradient, and a multi-clamp network started there
            # stayed at its floors in our demo training.
            start = torch.tensor(initial)
            if activation == "sigmoid":
                start = bounded_logit(start, self.lower.view(n_out), self.upper.view(n_out))
            if activation == "log_beta":
                start = torch.zeros(4)
                start[1] = math.log(initial[1] + initial[2])
            with torch.no_grad():
                self.head[1].bias.copy_(start)
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        for module in self.modules():
            if isinstance(module, nn.Conv3d | nn.ConvTranspose3d):
                module.to(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map [B, 1, T, H, W] to parameters [B, n, H, W] (K1, k2, k3, Vb by default)."""
        if x.ndim != 5 or x.shape[1] != 1 or x.shape[2] != self.n_frames:
            raise ValueError(f"expected input [B, 1, {self.n_frames}, H, W], got {tuple(x.shape)}")
        if x.shape[-1] % self.spatial_multiple or x.shape[-2] % self.spatial_multiple:
            raise ValueError(
                f"slice size {tuple(x.shape[-2:])} must be divisible by {self.spatial_multiple}"
            )
        x = x.contiguous(memory_format=self.memory_format)
        skips = []
        for encoder in self.encoders:
            out = encoder(x)
            skips.append(torch.cat([x, out], dim=1))
            x = self.pool(out)
        x = self.bottleneck(x)
        for upsample, decoder, skip in zip(
            self.upsamples, self.decoders, reversed(skips), strict=True
        ):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        logits = self.head(x)[:, :, 0]
        return self.final_activation(logits)

    def final_activation(self, logits: torch.Tensor) -> torch.Tensor:
        if self.activation == "abs":
            return logits.abs()
        if self.activation == "log_beta":
            return log_beta_parameters(logits, self.lower, self.upper)
        if self.activation == "sigmoid":
            return bounded_sigmoid(logits, self.lower, self.upper)
        if self.activation == "clamp":
            lower, upper = (torch.full_like(self.lower, b) for b in SINGLE_CLAMP)
        else:
            lower, upper = self.lower, self.upper
        if not self.straight_through:
            return torch.maximum(torch.minimum(logits, upper), lower)
        # Forward: the clamp. Backward: the identity (straight-through), so that a pixel
        # pushed past a bound still feels the loss and can come back.
        return _StraightThroughClamp.apply(logits, lower, upper)


def _bound_geometry(lower: torch.Tensor, upper: torch.Tensor):
    """Which channels map geometrically (lower > 0), their lower bounds (1 elsewhere, to
    keep the logarithms finite) and log(upper / lower)."""
    positive = lower > 0
    safe_lower = torch.where(positive, lower, torch.ones_like(lower))
    return positive, safe_lower, torch.log(upper / safe_lower)


def bounded_sigmoid(logits: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor):
    """Map logits onto (lower, upper) with a logistic function, per channel.

    A channel whose lower bound is > 0 is mapped geometrically,
    ``lower * (upper / lower) ** sigmoid(z)``, so that equal steps of the logit are equal
    relative steps of the parameter (k3 spans two decades, [0.01, 1]); a channel whose
    lower bound is 0 (Vb) linearly, ``lower + (upper - lower) * sigmoid(z)``.
    ``lower`` and ``upper`` broadcast against ``logits`` (channels on dim 1).
    """
    s = torch.sigmoid(logits)
    positive, safe_lower, log_span = _bound_geometry(lower, upper)
    geometric = safe_lower * torch.exp(s * log_span)
    linear = lower + (upper - lower) * s
    # The exact map is inside the bounds; the clamp only removes float rounding at them.
    return torch.minimum(torch.maximum(torch.where(positive, geometric, linear), lower), upper)


def bounded_logit(values: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor):
    """The inverse of :func:`bounded_sigmoid` for values strictly inside the bounds."""
    positive, safe_lower, log_span = _bound_geometry(lower, upper)
    geometric = torch.log(values / safe_lower) / log_span
    linear = (values - lower) / (upper - lower)
    s = torch.where(positive, geometric, linear)
    return torch.log(s) - torch.log1p(-s)


def log_beta_parameters(logits: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor):
    """Parameters [B, 4, H, W] whose k2 + k3 is beta = exp(z), z the second logit: for
    networks trained with projection, which takes only beta from the network.

    The map has the same slope in log beta everywhere (a sigmoid flattens towards its
    bounds, and the spleen's beta of ~2.8 /min sits near the top of k2 + k3's range):
    beta is clamped to [k2_lo + k3_lo, k2_hi + k3_hi] with a straight-through gradient,
    k3 is held at its lower bound and k2 = beta - k3; K1 and Vb are placeholders that the
    projection replaces (sigmoids of the other logits, inside their bounds).
    """
    lo = lower[:, 1] + lower[:, 2]
    hi = upper[:, 1] + upper[:, 2]
    # Clamped in log space: the gradient is beta times the loss's, bounded by hi.
    beta = torch.exp(_StraightThroughClamp.apply(logits[:, 1], torch.log(lo), torch.log(hi)))
    others = bounded_sigmoid(logits, lower, upper)
    k3 = lower[:, 2].expand_as(beta)
    return torch.stack([others[:, 0], beta - k3, k3, others[:, 3]], dim=1)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def pad_frames(
    tacs: torch.Tensor, n_frames: int = PADDED_FRAMES, mode: str = "replicate"
) -> torch.Tensor:
    """Pad [B, T, H, W] slices symmetrically in time to [B, 1, n_frames, H, W].

    The paper pads 62 frames to 64 with one frame on each side (zeros in training,
    replicated edge frames in validation and test).
    """
    extra = n_frames - tacs.shape[1]
    if extra < 0:
        raise ValueError(f"{tacs.shape[1]} frames do not fit in {n_frames}")
    before, after = extra // 2, extra - extra // 2
    x = tacs.unsqueeze(1)
    if extra == 0:
        return x
    if mode == "zeros":
        return nn.functional.pad(x, (0, 0, 0, 0, before, after))
    # replicate-pad needs a 5-D input with the padded axis among the last three.
    return nn.functional.pad(x, (0, 0, 0, 0, before, after), mode="replicate")


def slices_to_parameters(model: KineticUNet, tacs: torch.Tensor, time_padding="replicate"):
    """Run the network on slices [B, T, H, W] of any size; parameters [B, n, H, W].

    Time is padded to the network's frames; space is zero-padded to a multiple of
    2**depth and cropped back (zero pixels fall outside the activity mask).
    """
    h, w = tacs.shape[-2:]
    m = model.spatial_multiple
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        tacs = nn.functional.pad(tacs, (0, pw, 0, ph))
    return model(pad_frames(tacs, model.n_frames, time_padding))[:, :, :h, :w]
