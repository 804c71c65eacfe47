"""Backbone throughput: our DDPM++ SongUNet vs diffusers' UNet2DModel at the DDPM CIFAR-10 size.

Both networks are configured as the DDPM CIFAR-10 U-Net (about 36M parameters at 32x32: base 128
channels, multipliers 1,2,2,2, two residual blocks per level, attention at 16x16, dropout 0.1) and
timed in one process with the same batch, threads and inputs. Prints training img/s (forward +
backward + Adam step) and sampling img/s (forward under no_grad) and the ratio ours/diffusers.

    python bench/bench_backbone.py --batch 32 --iters 5

Needs ``diffusers`` (the ``[bench]`` extra). Prints figures only; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from bench_train_step import our_network_kwargs, their_unet
from torch import nn

from difflab.nets import build_network

# The DDPM CIFAR-10 pair of bench_train_step.py (one configuration in one place), with its dropout 0.1.
OUR_CONFIG = our_network_kwargs("cifar", dropout=0.1)


def diffusers_unet() -> nn.Module:
    """The DDPM CIFAR-10 configuration (google/ddpm-cifar10-32) of diffusers' UNet2DModel."""
    return their_unet("cifar", dropout=0.1)


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def time_loop(step: Callable[[], None], iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``step`` (mean over ``iters`` after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def make_steps(net: nn.Module, call: Callable, x: torch.Tensor, t: torch.Tensor):
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    target = torch.randn_like(x)

    def train_step() -> None:
        net.train()
        loss = (call(net, x, t) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sample_step() -> None:
        net.eval()
        with torch.no_grad():
            call(net, x, t)

    return train_step, sample_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per measurement (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating measurements per network; the median is reported (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="use channels_last memory format")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    ours = build_network("ddpmpp", **OUR_CONFIG).to(device, memory_format=fmt)
    theirs = diffusers_unet().to(device, memory_format=fmt)
    x = torch.randn(args.batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    t = torch.rand(args.batch, device=device) * 999

    nets = {
        "ours (difflab ddpmpp)": make_steps(ours, lambda n, x, t: n(x, t), x, t),
        "diffusers UNet2DModel": make_steps(theirs, lambda n, x, t: n(x, t).sample, x, t),
    }
    params = {"ours (difflab ddpmpp)": count_params(ours), "diffusers UNet2DModel": count_params(theirs)}
    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "sample": []} for k in nets}
    for _ in range(args.repeats):  # alternate so slow drifts of the machine hit both alike
        for name, (train_step, sample_step) in nets.items():
            times[name]["train"].append(time_loop(train_step, args.iters, args.warmup, device))
            times[name]["sample"].append(time_loop(sample_step, args.iters, args.warmup, device))

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, iters {args.iters} x {args.repeats} repeats, "
          f"channels_last {args.channels_last}")
    rates = {}
    for name in nets:
        train = args.batch / statistics.median(times[name]["train"])
        sample = args.batch / statistics.median(times[name]["sample"])
        rates[name] = (train, sample)
        print(f"{name:24s} params {params[name] / 1e6:7.2f}M   train {train:8.1f} img/s   "
              f"sample {sample:8.1f} img/s")
    (ot, os_), (dt, ds) = rates.values()
    print(f"{'ratio ours/diffusers':24s} {'':16s}train {ot / dt:8.2f}         sample {os_ / ds:8.2f}")


if __name__ == "__main__":
    main()
