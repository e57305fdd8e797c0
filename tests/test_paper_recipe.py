"""The ``paper`` training recipe: the published network weight for weight, its plain clamp,
its MultiStepLR schedule and early stopping, its activity mask over frame starts, and the
expansion of the recipe (explicit settings win)."""

import csv
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from snakemake.common.configfile import load_configfile
from snakemake.utils import update_config, validate

from kinpet import training
from kinpet.frames import FrameSchedule
from kinpet.inputfunction import InputFunction
from kinpet.metrics import activity_mask
from kinpet.network import INITIAL_PARAMETERS, count_parameters
from kinpet.training import (
    RECIPES,
    SliceSet,
    TrainSettings,
    build_model,
    learning_rate_schedule,
    load_checkpoint,
    settings_from_config,
    stop_early,
    train,
    training_loss,
)

FRAMES = FrameSchedule.paper()
# The published multi-clamp bounds (main.py, SpaceTempUNet.__init__: multi_clamp_params).
PUBLISHED_BOUNDS = [(0.01, 2.0), (0.01, 3.0), (0.01, 1.0), (0.0, 1.0)]
DEPTH, ROOT = 4, 8


# -- The published network, restated from reading network/unet_blocks{,_ST}.py ----------


def published_layout(convolution):
    """Name -> shape of every convolution weight and bias the published UNet declares
    (UNet_ST for ``space_time``, UNet for ``3d``; depth 4, 8 root features, 1 input and 4
    output channels). Its BatchNorm3d modules are left out: with ``batch_norm: False``
    (its config.yaml) its forward never applies them."""
    st = convolution == "space_time"
    space, temp, cube = (1, 3, 3), (3, 1, 1), (3, 3, 3)
    layout = {}

    def conv(name, c_out, c_in, kernel):
        layout[f"{name}.weight"] = (c_out, c_in, *kernel)
        layout[f"{name}.bias"] = (c_out,)

    def encoder_block(prefix, c_in, c_out):
        if st:
            conv(f"{prefix}.conv3d_space_in", c_out, c_in, space)
            conv(f"{prefix}.conv3d_space", c_out, c_out, space)
            conv(f"{prefix}.conv3d_temp", c_out, c_out, temp)  # one, used twice
        else:
            conv(f"{prefix}.conv3d_in", c_out, c_in, cube)
            conv(f"{prefix}.conv3d", c_out, c_out, cube)

    ins = [1] + [ROOT * 2**d for d in range(DEPTH - 1)]
    outs = [ROOT * 2**d for d in range(DEPTH)]
    for d in range(DEPTH):
        encoder_block(f"encoder.module_dict.encoder_block_{d + 1}", ins[d], outs[d])
    encoder_block("encoder.module_dict.bottle_neck", outs[-1], ROOT * 2**DEPTH)
    for k in range(DEPTH, 0, -1):
        prefix = f"decoder.module_dict.decoder_block_{k}"
        c_in, c_out, skip = ROOT * 2**k, ROOT * 2 ** (k - 1), ins[k - 1] + outs[k - 1]
        # A transposed convolution's weight is [in, out, kernel].
        if st:
            conv(f"{prefix}.upconv3d_space", c_in, c_in, space)
            conv(f"{prefix}.upconv3d_temp", c_in, c_in, temp)
            conv(f"{prefix}.conv3d_space_skip", c_out, c_in + skip, space)
            conv(f"{prefix}.conv3d_space", c_out, c_out, space)
            conv(f"{prefix}.conv3d_temp", c_out, c_out, temp)
        else:
            conv(f"{prefix}.upconv3d", c_in, c_in, cube)
            conv(f"{prefix}.conv3d_skip", c_out, c_in + skip, cube)
            conv(f"{prefix}.conv3d", c_out, c_out, cube)
        if k == 1:
            conv(f"{prefix}.final_conv_1", 4, c_out, cube)
            conv(f"{prefix}.final_conv_2", 4, 4, (64, 1, 1))
    return layout


def published_to_kinpet(name, convolution):
    """Our state-dict name of a published parameter name (written from reading both)."""
    module, leaf = name.rsplit(".", 1)
    parts = module.split(".")
    block, layer = parts[2], parts[3]
    if block == "bottle_neck":
        ours = "bottleneck"
    elif block.startswith("encoder_block_"):
        ours = f"encoders.{int(block.rsplit('_', 1)[1]) - 1}"
    else:  # decoder_block_k runs deepest first: our decoders[DEPTH - k]
        index = DEPTH - int(block.rsplit("_", 1)[1])
        ours = f"decoders.{index}"
        ups = {"upconv3d_space": 0, "upconv3d_temp": 1, "upconv3d": 0}
        if layer in ups:
            return f"upsamples.{index}.{ups[layer]}.{leaf}"
        if layer in ("final_conv_1", "final_conv_2"):
            return f"head.{int(layer[-1]) - 1}.{leaf}"
    if convolution == "space_time":  # SharedTemporalBlock
        layer = {
            "conv3d_space_in": "space_first",
            "conv3d_space_skip": "space_first",
            "conv3d_space": "space_second",
            "conv3d_temp": "time_shared",
        }[layer]
    else:  # Block: units 0 and 2 of a Sequential, each a Sequential of one Conv3d
        layer = {"conv3d_in": "0.0", "conv3d_skip": "0.0", "conv3d": "2.0"}[layer]
    return f"{ours}.{layer}.{leaf}"


def seeded_weights(layout, seed=0):
    """Random published-layout weights, scaled by 1/sqrt(fan in) to keep activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in layout.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 16
        weights[name] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return weights


def published_forward(w, x, convolution, pooling):
    """The published forward written with torch.nn.functional from its description:
    encoder blocks (two units, ELU after each; a (2+1)-D unit is a [1,3,3] then the
    block's one [3,1,1] convolution), short+long skips cat(input, output), max-pooling
    with stride 2 in all axes (window [2,2,2], or [1,2,2] without time pooling), decoder
    blocks (transposed convolutions doubling space and time, cat with the skip, two
    units), then final_conv_1 and final_conv_2, then the multi-clamp."""
    st = convolution == "space_time"

    def c(p, name, h, padding):
        return F.conv3d(h, w[f"{p}.{name}.weight"], w[f"{p}.{name}.bias"], padding=padding)

    def units(p, h, first):
        if st:
            h = F.elu(c(p, "conv3d_temp", c(p, first, h, (0, 1, 1)), (1, 0, 0)))
            return F.elu(c(p, "conv3d_temp", c(p, "conv3d_space", h, (0, 1, 1)), (1, 0, 0)))
        h = F.elu(c(p, first, h, 1))
        return F.elu(c(p, "conv3d", h, 1))

    def up(p, name, h, stride, padding, output_padding):
        return F.conv_transpose3d(
            h,
            w[f"{p}.{name}.weight"],
            w[f"{p}.{name}.bias"],
            stride=stride,
            padding=padding,
            output_padding=output_padding,
        )

    window = (2, 2, 2) if pooling == "3d" else (1, 2, 2)
    skips, h = [], x
    for d in range(1, DEPTH + 1):
        out = units(
            f"encoder.module_dict.encoder_block_{d}", h, "conv3d_space_in" if st else "conv3d_in"
        )
        skips.append(torch.cat([h, out], 1))
        h = F.max_pool3d(out, window, stride=2)
    h = units("encoder.module_dict.bottle_neck", h, "conv3d_space_in" if st else "conv3d_in")
    for k in range(DEPTH, 0, -1):
        p = f"decoder.module_dict.decoder_block_{k}"
        if st:
            h = up(p, "upconv3d_space", h, (1, 2, 2), (0, 1, 1), (0, 1, 1))
            h = up(p, "upconv3d_temp", h, (2, 1, 1), (1, 0, 0), (1, 0, 0))
        else:
            h = up(p, "upconv3d", h, 2, 1, 1)
        h = units(p, torch.cat([h, skips[k - 1]], 1), "conv3d_space_skip" if st else "conv3d_skip")
    p = "decoder.module_dict.decoder_block_1"
    logits = c(p, "final_conv_2", c(p, "final_conv_1", h, 1), 0)[:, :, 0]  # [B, 4, H, W]
    lower = torch.tensor([b[0] for b in PUBLISHED_BOUNDS]).view(1, 4, 1, 1)
    upper = torch.tensor([b[1] for b in PUBLISHED_BOUNDS]).view(1, 4, 1, 1)
    return torch.clamp(logits, lower, upper), logits


@pytest.mark.parametrize(
    "convolution, pooling",
    [("space_time", "3d"), ("space_time", "space"), ("3d", "3d"), ("3d", "space")],
)
def test_paper_network_equals_the_published_one_weight_for_weight(convolution, pooling):
    """What is checked: (1) the names the published UNet declares (restated above from its
    code) map one to one onto our state dict under the paper recipe, with equal shapes
    and equal parameter counts; (2) with the same seeded random weights, our forward
    equals an independent functional forward of the published description, logits
    clamped, to float rounding (the convolution algorithms differ); (3) some outputs
    sit at the bounds, so the clamp is exercised."""
    settings = TrainSettings(
        recipe="paper", convolution=convolution, pooling=pooling, activation="multi_clamp"
    )
    ours = build_model(settings).eval()
    layout = published_layout(convolution)
    mapping = {name: published_to_kinpet(name, convolution) for name in layout}
    our_state = ours.state_dict()
    our_params = {k for k in our_state if k not in ("lower", "upper")}
    assert sorted(mapping.values()) == sorted(our_params)  # a bijection onto ours
    assert len(set(mapping.values())) == len(mapping)
    for name, shape in layout.items():
        assert tuple(our_state[mapping[name]].shape) == shape, name
    assert count_parameters(ours) == sum(math.prod(s) for s in layout.values())

    weights = seeded_weights(layout)
    missing, unexpected = ours.load_state_dict(
        {mapping[k]: v for k, v in weights.items()}, strict=False
    )
    assert missing == ["lower", "upper"] and unexpected == []  # buffers: our bounds
    torch.testing.assert_close(ours.lower.flatten(), torch.tensor([b[0] for b in PUBLISHED_BOUNDS]))
    torch.testing.assert_close(ours.upper.flatten(), torch.tensor([b[1] for b in PUBLISHED_BOUNDS]))
    x = torch.rand(2, 1, 64, 16, 16, generator=torch.Generator().manual_seed(1)) * 5
    with torch.no_grad():
        expected, logits = published_forward(weights, x, convolution, pooling)
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    inside = (logits > ours.lower) & (logits < ours.upper)
    assert 0.05 < inside.float().mean().item() < 0.95


def test_paper_recipe_keeps_pytorchs_initialisation_of_the_head():
    torch.manual_seed(0)
    net = build_model(TrainSettings(recipe="paper"))
    bias = net.head[1].bias.detach()
    bound = 1 / math.sqrt(4 * 64)  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert bias.abs().max().item() <= bound
    assert not torch.allclose(bias, torch.tensor(INITIAL_PARAMETERS))
    torch.manual_seed(0)
    kinpet = build_model(TrainSettings())
    torch.testing.assert_close(kinpet.head[1].bias.detach(), torch.tensor(INITIAL_PARAMETERS))


@pytest.mark.parametrize("activation", ["multi_clamp", "clamp"])
def test_plain_clamp_passes_no_gradient_outside_the_bounds(activation):
    net = build_model(TrainSettings(recipe="paper", activation=activation))
    assert net.straight_through is False
    lower, upper = (0.01, 0.01, 0.01, 0.0), (2.0, 3.0, 1.0, 1.0)
    if activation == "clamp":
        lower, upper = (0.01,) * 4, (3.0,) * 4
    # Per channel: below, inside, above its bounds.
    values = torch.tensor(
        [[lo - 0.5, (lo + hi) / 2, hi + 0.5] for lo, hi in zip(lower, upper, strict=True)]
    )
    logits = values.view(1, 4, 1, 3).clone().requires_grad_(True)
    out = net.final_activation(logits)
    expected = torch.tensor([[lo, (lo + hi) / 2, hi] for lo, hi in zip(lower, upper, strict=True)])
    torch.testing.assert_close(out.detach().view(4, 3), expected)
    out.sum().backward()
    assert logits.grad.view(4, 3).tolist() == [[0.0, 1.0, 0.0]] * 4
    # kinpet's default: the same forward, the identity's gradient everywhere.
    straight = build_model(TrainSettings(activation=activation))
    logits.grad = None
    straight.final_activation(logits).sum().backward()
    assert logits.grad.view(4, 3).tolist() == [[1.0, 1.0, 1.0]] * 4


def test_multistep_schedule_halves_at_the_milestones_then_stays():
    lr = 1e-4
    settings = TrainSettings(recipe="paper")
    assert (settings.schedule, settings.milestones, settings.gamma) == (
        "multistep",
        [25, 50, 75, 100],
        0.5,
    )
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=settings.learning_rate)
    schedule = learning_rate_schedule(optimizer, settings)
    seen = []
    for _ in range(160):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [lr] * 25 + [lr / 2] * 25 + [lr / 4] * 25 + [lr / 8] * 25 + [lr / 16] * 60
    assert seen == pytest.approx(expected, rel=1e-12)
    # kinpet's step schedule halves for ever.
    optimizer = torch.optim.AdamW([param], lr=lr)
    step = learning_rate_schedule(optimizer, TrainSettings())
    for _ in range(150):
        optimizer.step()
        step.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr / 2**6)


def tiny_set(seed, sampling="paper"):
    """Two random slices, with the paper recipe's model sampling unless told otherwise."""
    rng = np.random.default_rng(seed)
    tacs = rng.uniform(0.0, 5.0, (2, len(FRAMES), 16, 16)).astype(np.float32)
    return SliceSet.from_subjects([tacs], [InputFunction.feng()], FRAMES, sampling=sampling)


def cheap_loss(model, meas, rows, data, settings, weights):
    """A stand-in for the self-supervised loss: no forward pass, gradients on every
    weight (the toy runs check the training loop, not the loss)."""
    return 1e-6 * sum((p**2).sum() for p in model.parameters())


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_toy_run_follows_the_multistep_schedule(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "training_loss", cheap_loss)
    monkeypatch.setattr(training, "evaluate", lambda *a, **k: (1.0, np.ones(2), np.ones(2)))
    settings = TrainSettings(
        recipe="paper", epochs=110, validate_every=1000, early_stopping_patience=0, device="cpu"
    )
    train(tiny_set(0), tiny_set(1), settings, tmp_path, stream=open("/dev/null", "w"))
    lrs = [float(row["lr"]) for row in read_log(tmp_path / "log.csv")]
    lr = 1e-4
    assert lrs == pytest.approx(
        [lr] * 25 + [lr / 2] * 25 + [lr / 4] * 25 + [lr / 8] * 25 + [lr / 16] * 10
    )


def test_early_stopping_after_patience_checks_and_best_is_the_best(tmp_path, monkeypatch):
    # Validation every 2 epochs; the best at epoch 6 (3.0); 3.0 again at epoch 10 is no
    # improvement (strictly lower is, as in the published EarlyStopping, min_delta 0).
    scripted = iter([5.0, 4.0, 3.0, 3.5, 3.0, 3.2, 0.1, 0.1])
    snapshots = []

    def fake_evaluate(model, data, settings, device=None, batch_size=None):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(scripted), np.ones(2), np.ones(2)

    monkeypatch.setattr(training, "training_loss", cheap_loss)
    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    settings = TrainSettings(
        recipe="paper", epochs=40, validate_every=2, early_stopping_patience=3, device="cpu"
    )
    sink = open("/dev/null", "w")
    result = train(tiny_set(0), tiny_set(1), settings, tmp_path, stream=sink)
    log = read_log(tmp_path / "log.csv")
    assert [int(r["epoch"]) for r in log] == list(range(1, 13))  # 3 checks after epoch 6
    assert result["epoch"] == 6 and result["val_loss"] == 3.0
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["best"] == {"val_loss": 3.0, "epoch": 6} and best["epoch"] == 5
    assert len(snapshots) == 6
    for key, value in best["model"].items():
        assert torch.equal(value, snapshots[2][key]), key  # the weights validated at epoch 6
    assert not torch.equal(best["model"]["head.1.weight"], snapshots[5]["head.1.weight"])
    # A resumed run stops where it stopped: nothing more is trained.
    train(tiny_set(0), tiny_set(1), settings, tmp_path, resume=True, stream=sink)
    assert len(read_log(tmp_path / "log.csv")) == 12


def test_stop_early_counts_validation_checks():
    s = TrainSettings(validate_every=5, early_stopping_patience=2, epochs=23)
    assert not stop_early(-1, 0, s)
    assert not stop_early(5, 14, s)  # one check (epoch 10) since the best
    assert stop_early(5, 15, s)  # epochs 10 and 15
    assert stop_early(20, 23, s) is False  # epoch 23 (the last) is one check
    assert not stop_early(5, 500, TrainSettings(early_stopping_patience=0))


def test_mask_auc_over_frame_starts_by_hand():
    # Frames of 1, 2 and 3 min: starts 0, 1, 3 min; mid-times 0.5, 2, 4.5 min.
    frames = FrameSchedule.from_durations([60.0, 120.0, 180.0])
    tac = np.array([10.0, 4.0, 2.0])
    by_start = (10 + 4) / 2 * 1 + (4 + 2) / 2 * 2  # 13 kBq/ml min
    by_mid = (10 + 4) / 2 * 1.5 + (4 + 2) / 2 * 2.5  # 18 kBq/ml min
    curves = np.stack([tac, tac * 14.5 / by_start, tac * 12.5 / by_start], -1)[:, None, :]
    # Areas over starts: 13, 14.5, 12.5; threshold 14 keeps the middle one only.
    mask = activity_mask(curves, frames, 14.0, auc_times="start")
    assert mask.tolist() == [[False, True, False]]
    assert activity_mask(torch.from_numpy(curves), frames, 14.0, "start").tolist() == [
        [False, True, False]
    ]
    assert activity_mask(tac[:, None, None], frames, by_mid - 0.01, "mid").item()
    assert not activity_mask(tac[:, None, None], frames, by_mid - 0.01, "start").item()
    assert not activity_mask(tac[:, None, None], frames, by_start + 0.01, "start").item()
    with pytest.raises(ValueError, match="auc_times"):
        activity_mask(curves, frames, 14.0, auc_times="end")


def test_training_loss_uses_the_recipes_mask():
    # A flat curve of 1 kBq/ml: area 60 over the paper's starts (0 .. 60 min), 62.4 over
    # its mid-times; with threshold 61 only the mid-time mask keeps it.
    data = SliceSet.from_subjects(
        [np.ones((1, len(FRAMES), 16, 16), np.float32)], [InputFunction.feng()], FRAMES
    )
    rows = torch.arange(1)
    losses = {}
    for auc in ("mid", "start"):
        settings = TrainSettings(recipe="paper", mask_auc=auc, mask_threshold=61.0)
        torch.manual_seed(0)
        net = build_model(settings)
        with torch.no_grad():
            losses[auc] = training_loss(net, data.tacs, rows, data, settings, None).item()
    assert losses["mid"] > 0 and losses["start"] == 0.0


def test_recipe_expansion_and_explicit_settings():
    kinpet = TrainSettings()
    assert {k: getattr(kinpet, k) for k in RECIPES["kinpet"]} == RECIPES["kinpet"]
    # Today's defaults, unchanged.
    assert (kinpet.schedule, kinpet.sampling, kinpet.mask_auc, kinpet.head_init) == (
        "step",
        "average",
        "mid",
        "kinpet",
    )
    assert kinpet.straight_through and not kinpet.shared_temporal and not kinpet.decimate_time
    assert kinpet.early_stopping_patience == 0
    paper = TrainSettings(recipe="paper")
    assert {k: getattr(paper, k) for k in RECIPES["paper"]} == RECIPES["paper"]
    assert paper.milestones is not RECIPES["paper"]["milestones"]
    assert TrainSettings(recipe="paper", learning_rate=3e-4).learning_rate == 3e-4
    # Through the pipeline's layers: config/config.yaml's keys yield to a later recipe,
    # keys given with the recipe win, the ablation wins over everything.
    underneath = {"learning_rate": 1e-3, "schedule": "cosine", "epochs": 10, "flips": True}
    s = settings_from_config(
        {"recipe": "paper", "batch_size": 2}, underneath, activation="clamp", threads=1
    )
    assert (s.learning_rate, s.schedule, s.flips) == (1e-4, "multistep", False)
    assert (s.epochs, s.batch_size, s.activation, s.threads) == (10, 2, "clamp", 1)
    # No recipe named: every given key stands, as before.
    s = settings_from_config(underneath)
    assert (s.recipe, s.learning_rate, s.schedule, s.flips) == ("kinpet", 1e-3, "cosine", True)
    # A checkpoint's settings (all explicit) load back equal.
    assert TrainSettings(**asdict(paper)) == paper
    with pytest.raises(ValueError, match="recipe must be one of"):
        TrainSettings(recipe="published")


def test_the_readme_example_of_the_paper_recipe_is_a_valid_config():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    start = readme.index("```yaml\n# published.yaml")
    example = yaml.safe_load(readme[start + len("```yaml\n") : readme.index("```", start + 3)])
    assert example["training"]["recipe"] == "paper"
    config = load_configfile(root / "config/config.yaml")
    update_config(config, example)
    validate(config, str(root / "workflow/schemas/config.schema.yaml"))
    # As workflow/rules/common.smk layers it: config.yaml's training keys under the recipe.
    given = {
        k: v for k, v in example["training"].items() if k in TrainSettings.__dataclass_fields__
    }
    underneath = {
        k: v
        for k, v in load_configfile(root / "config/config.yaml")["training"].items()
        if k in TrainSettings.__dataclass_fields__ and k not in given
    }
    s = settings_from_config(given, underneath, **config["training"]["ablations"]["4.1"])
    assert {k: getattr(s, k) for k in RECIPES["paper"]} == RECIPES["paper"]
    assert (s.epochs, s.activation, s.pooling) == (100, "multi_clamp", "3d")


def test_paper_recipe_loss_equals_the_published_loss_on_one_batch():
    """The loss of one batch under ``recipe: paper`` against the published training step
    restated here from its description (main.py, training_step and accumulate_func): the
    62 frames zero-padded to 64 (one each side), the published network (its functional
    restatement above, same seeded weights), the discrete 0.1-min model read at frame
    starts (``paper_reference`` of test_kinetics, written from the same description),
    the pixels whose trapezoidal area over frame starts exceeds 10 kBq/ml x min, and the
    plain mean of the squared errors over those pixels' frames. Our loss runs in float32,
    the restatement in float64: rel 1e-4."""
    from test_kinetics import paper_reference

    from kinpet.kinetics import irreversible_2tc
    from kinpet.training import loss_weights

    settings = TrainSettings(
        recipe="paper", convolution="space_time", pooling="space", activation="multi_clamp"
    )
    inp = InputFunction.feng()
    rng = np.random.default_rng(3)
    truth = np.column_stack(
        [
            rng.uniform(0.2, 1.2, 512),
            rng.uniform(0.2, 1.5, 512),
            rng.uniform(0.01, 0.2, 512),
            rng.uniform(0.0, 0.2, 512),
        ]
    )
    curves = irreversible_2tc(truth, inp, FRAMES) + rng.normal(0, 2.0, (512, len(FRAMES)))
    curves[:100] *= 0.002  # pixels below the activity threshold
    tacs = curves.reshape(2, 16, 16, len(FRAMES)).transpose(0, 3, 1, 2).astype(np.float32)
    data = SliceSet.from_subjects([tacs], [inp], FRAMES, sampling=settings.sampling)

    ours = build_model(settings)
    layout = published_layout(settings.convolution)
    weights = seeded_weights(layout, seed=4)
    ours.load_state_dict(
        {published_to_kinpet(k, "space_time"): v for k, v in weights.items()}, strict=False
    )
    rows = torch.arange(2)
    got = training_loss(
        ours, data.tacs, rows, data, settings, loss_weights(FRAMES, settings, "cpu")
    )

    x = F.pad(torch.from_numpy(tacs)[:, None], (0, 0, 0, 0, 1, 1))  # zeros, 62 -> 64 frames
    with torch.no_grad():
        params, _ = published_forward(weights, x, settings.convolution, settings.pooling)
    params = params.permute(0, 2, 3, 1).reshape(-1, 4).double().numpy()
    model = paper_reference(params, inp, FRAMES)  # [512, 62]
    starts = FRAMES.starts_s / 60.0
    area = ((curves[:, 1:] + curves[:, :-1]) / 2 * np.diff(starts)).sum(axis=1)
    keep = area > 10.0
    assert 0 < (~keep).sum() < 512  # the mask is exercised
    expected = np.mean((model[keep] - tacs.transpose(0, 2, 3, 1).reshape(-1, 62)[keep]) ** 2)
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_training_refuses_a_slice_set_of_another_model_sampling(tmp_path):
    data = tiny_set(0, sampling="average")
    with pytest.raises(ValueError, match="sampling 'average' but the settings ask for 'paper'"):
        train(data, data, TrainSettings(recipe="paper", epochs=1), tmp_path)
    assert not any(tmp_path.iterdir())
