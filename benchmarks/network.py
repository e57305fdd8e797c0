"""Benchmark (not a test): training throughput and whole-body inference time of the UNet.

Measures, in one run so that ratios are fair, the paper's space+time network (batch 5,
64 frames) in two set-ups with the same architecture and arithmetic:

- baseline: the default NCDHW layout, autograd on at inference, one slice per pass
  (how the published code runs);
- kinpet: channels-last layout, ``torch.inference_mode``, batched inference.

Training: slices/s of a full step (forward, backward, AdamW) at 112x112 and 64x64.
Inference: seconds per 112x112 slice, and the time for a 400-slice body.

    .venv/bin/python benchmarks/network.py [--device cpu|cuda] [--repeats 2]
"""

import argparse
import time

import torch

from kinpet.network import KineticUNet
from kinpet.training import pick_device


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_rate(model, size, device, batch=5, repeats=2):
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.randn(batch, 1, 64, size, size, device=device)
    best = float("inf")
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        _sync(device)
        if i:  # the first step warms up
            best = min(best, time.perf_counter() - t0)
    return batch / best


def seconds_per_slice(model, device, batch, fast, slices=16, size=112):
    model.eval()
    x = torch.randn(batch, 1, 64, size, size, device=device)
    ctx = torch.inference_mode if fast else torch.enable_grad
    with ctx():
        model(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(max(1, slices // batch)):
            model(x)
        _sync(device)
    return (time.perf_counter() - t0) / (max(1, slices // batch) * batch)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads")
    nets = {
        "baseline": KineticUNet("space_time", "3d", channels_last=False).to(device),
        "kinpet": KineticUNet("space_time", "3d", channels_last=True).to(device),
    }
    rates = {}
    for size in (112, 64):
        for name, net in nets.items():
            net.train()
            rates[name, size] = train_rate(net, size, device, repeats=args.repeats)
            print(f"training {size}x{size} {name:<9} {rates[name, size]:8.2f} slices/s")
        print(
            f"training {size}x{size} speed-up   "
            f"{rates['kinpet', size] / rates['baseline', size]:8.2f}x"
        )
    slices = 16 if device.type == "cpu" else 128
    base = seconds_per_slice(nets["baseline"], device, 1, fast=False, slices=slices // 4)
    print(
        f"inference 112x112 baseline (batch 1)  {base:.3f} s/slice = "
        f"{400 * base:.0f} s per 400-slice body"
    )
    for batch in (4, 8, 16) if device.type == "cpu" else (16, 32, 64):
        fast = seconds_per_slice(nets["kinpet"], device, batch, fast=True, slices=slices)
        print(
            f"inference 112x112 kinpet (batch {batch:>2})   {fast:.3f} s/slice = "
            f"{400 * fast:.1f} s per 400-slice body ({base / fast:.2f}x)"
        )
    print(
        "figures to beat on 2 CPU cores (published code): training 0.4 slices/s at 112, "
        "1.0 at 64; inference 1.2 s/slice (~490 s per body); targets: 2x those; GPU < 5 s/body"
    )


if __name__ == "__main__":
    main()
