"""Whole-step training and sampling throughput: difflab's loop vs a diffusers training loop, in one run.

The training step is the whole step, data to EMA: difflab's own loop (`difflab.training.loop.train`: data
loader -> encode -> per-example noise -> DDPM loss -> backward -> finite check -> Adam -> EMA; its img/s
is the loop's own tick figure, snapshots excluded) against the canonical diffusers step (the
`train_unconditional.py` example: DDPMScheduler.add_noise -> UNet2DModel -> MSE -> backward -> AdamW ->
EMAModel(foreach) -> zero_grad; data from a preloaded tensor, which favours the peer). Both train DDPM
(eps-prediction, L2, linear T = 1000) at matched parameter count on the same images (scikit-learn's digits
resized to the size), alternating so drifts of a shared machine hit both alike.

Sampling: image-NFE/s of a 10-step DDIM run, difflab's `Method.sample` at each `net_batch` (its fixed
backbone chunk: the batch-invariant default 16, and larger) against diffusers' DDIMScheduler loop.

Also printed: FLOPs per image of one training step (forward + backward, torch's FlopCounterMode), achieved
GFLOP/s against this machine's measured float32 matmul peak, and peak memory (CUDA: max allocated; CPU:
the growth of the process's peak RSS over one measurement run in a fresh child process).

    python bench/bench_train_step.py --sizes 4m --batch 64 --threads 1
    python bench/bench_train_step.py --sizes 4m,cifar --batch 64 --threads 2

Needs ``diffusers`` (the ``[bench]`` extra). Prints figures only; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from difflab.build import build_model, resolve_image
from difflab.config import RunConfig
from difflab.generate import compile_backbone
from difflab.rng import StackedRandomGenerator

# Matched sizes. "4m": 32x32x1, the issue's ~4M-parameter pair; "cifar": the DDPM CIFAR-10 U-Net (35.7M).
SIZES = {
    "4m": dict(res=32, ch=1,
               ours=dict(model_channels=64, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[16]),
               theirs=dict(block_out_channels=(64, 128), layers_per_block=2,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"))),
    "cifar": dict(res=32, ch=3,
                  ours=dict(model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=2, attn_resolutions=[16]),
                  theirs=dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                              down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))),
}


def our_config(size: str, batch: int, steps: int, **train) -> RunConfig:
    s = SIZES[size]
    return RunConfig.from_dict({
        "data": {"source": "digits", "resolution": s["res"], "channels": s["ch"]},
        "method": {"name": "ddpm", "schedule": "linear", "num_timesteps": 1000, "prediction": "eps",
                   "loss": "l2"},
        "network": {"name": "ddpmpp", "dropout": 0.0, **s["ours"]},
        "train": {"batch": batch, "duration_kimg": steps * batch / 1000, "lr": 2e-4, "lr_rampup_kimg": 0,
                  "ema_decay": 0.9999, "ema_halflife_kimg": None, "tick_kimg": 4 * batch / 1000,
                  "snapshot_ticks": 10 ** 6, "workers": 0, "grid_seeds": "0", **train},
        "sampler": {"sampler": "ddim", "steps": 1},
    })


def our_network_kwargs(size: str, dropout: float = 0.0) -> dict:
    """``build_network("ddpmpp", **...)`` arguments of the size's difflab network."""
    s = SIZES[size]
    return dict(img_resolution=s["res"], in_channels=s["ch"], out_channels=s["ch"], dropout=dropout, **s["ours"])


def their_unet(size: str, dropout: float = 0.0):
    """diffusers' UNet2DModel of the size (for "cifar": google/ddpm-cifar10-32's configuration)."""
    from diffusers import UNet2DModel

    s = SIZES[size]
    return UNet2DModel(sample_size=s["res"], in_channels=s["ch"], out_channels=s["ch"], attention_head_dim=None,
                       norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, dropout=dropout,
                       **s["theirs"])


def digits(size: str) -> torch.Tensor:
    """The digits as float images in [-1, 1] at the size's shape (what both loops train on)."""
    from difflab.data import open_dataset

    s = SIZES[size]
    ds = open_dataset("digits", resolution=s["res"], channels=s["ch"])
    x = np.stack([ds[i][0] for i in range(len(ds))])
    return torch.from_numpy(x).float() / 127.5 - 1


# ---- training -------------------------------------------------------------------------------------

def ours_train(size: str, batch: int, steps: int, **train_options) -> float:
    """img/s of difflab's loop: the median of its tick figures after the first tick (4 steps per tick)."""
    from difflab.training.loop import read_stats, train

    with tempfile.TemporaryDirectory() as tmp:
        run = train(our_config(size, batch, steps, **train_options), run_dir=Path(tmp) / "run", progress=False)
        rates = [r["img_per_sec"] for r in read_stats(run)][1:]
    return statistics.median(rates)


def theirs_train(size: str, batch: int, steps: int, data: torch.Tensor, channels_last: bool = False,
                 compile: bool = False) -> float:
    """img/s of the diffusers example's step, timed after 4 untimed steps (``compile``: ``unet.compile()``)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    unet = their_unet(size)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile:
        unet.compile()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-4)
    ema = EMAModel(unet.parameters(), decay=0.9999, foreach=True)
    g = torch.Generator().manual_seed(0)
    unet.train()

    def step() -> None:
        x0 = data[torch.randint(len(data), (batch,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        pred = unet(sched.add_noise(x0, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        ema.step(unet.parameters())
        opt.zero_grad(set_to_none=True)

    for _ in range(4):
        step()
    start = time.perf_counter()
    for _ in range(steps - 4):
        step()
    return batch * (steps - 4) / (time.perf_counter() - start)


# ---- sampling -------------------------------------------------------------------------------------

def ours_sample(size: str, batch: int, steps: int, net_batch: int, compile: bool = False) -> float:
    """image-NFE/s of difflab's DDIM sampler (Method.sample) with the backbone in fixed net_batch chunks
    (``compile``: as ``generate --compile``; the warm-up call compiles)."""
    torch.manual_seed(0)
    cfg = our_config(size, batch, 1)
    resolve_image(cfg)  # the image shape, from the data, as the loop does
    model = build_model(cfg).eval()
    if compile:
        compile_backbone(model)
    rng = StackedRandomGenerator("cpu", range(batch))
    with torch.no_grad(), model.batch_invariant(net_batch):
        model.sample(rng, sampler="ddim", steps=1)  # warm-up
        start = time.perf_counter()
        model.sample(rng, sampler="ddim", steps=steps)
    return batch * steps / (time.perf_counter() - start)


def theirs_sample(size: str, batch: int, steps: int, compile: bool = False) -> float:
    """image-NFE/s of diffusers' DDIMScheduler loop over UNet2DModel (the DDIMPipeline's loop)."""
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    unet = their_unet(size).eval()
    if compile:
        unet.compile()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    s = SIZES[size]
    x = torch.randn(batch, s["ch"], s["res"], s["res"])
    with torch.no_grad():
        unet(x, 999)  # warm-up
        sched.set_timesteps(steps)
        start = time.perf_counter()
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    return batch * steps / (time.perf_counter() - start)


# ---- FLOPs, peak, memory --------------------------------------------------------------------------

def train_flops(net: torch.nn.Module, call, size: str, batch: int) -> float:
    """FLOPs of one forward + backward at ``batch`` (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    s = SIZES[size]
    x = torch.randn(batch, s["ch"], s["res"], s["res"])
    t = torch.rand(batch) * 999
    with FlopCounterMode(display=False) as counter:
        call(net, x, t).square().mean().backward()
    return float(counter.get_total_flops())


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Measured float32 GFLOP/s of an n x n matmul on this machine (the best of ``reps``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def child_memory(which: str, size: str, batch: int, threads: int) -> float:
    """Peak-RSS growth (MB) of a fresh process over 6 training steps of ``which``."""
    out = subprocess.run([sys.executable, __file__, "--child", which, "--sizes", size, "--batch", str(batch),
                          "--threads", str(threads)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _peak_rss_mb() -> float:
    """This process's peak RSS in MB: Linux's ``VmHWM`` (per address space, so it starts afresh in an exec'd
    child), else ``ru_maxrss``, which Linux carries over from the parent across fork + exec: a child started
    by a big parent would read the parent's peak and show no growth."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(which: str, size: str, batch: int) -> None:
    data = digits(size)
    base = _peak_rss_mb()
    if which == "ours":
        ours_train(size, batch, 8)
    else:
        theirs_train(size, batch, 6, data)
    print(json.dumps({"peak_mb": _peak_rss_mb() - base}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4m", help="comma list of " + ", ".join(SIZES))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=24,
                    help="training steps per measurement (default 24; at least 8: the first 4-step tick is warm-up)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating measurements; the median is printed")
    ap.add_argument("--sample-batch", type=int, default=64)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--net-batches", default="16,64", help="difflab net_batch values to time when sampling")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="also time difflab's loop and sampler with --compile")
    ap.add_argument("--channels-last", action="store_true",
                    help="also time both loops with the backbone in the channels-last layout")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--child", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 8:
        ap.error(f"--steps {args.steps}: need at least 8 (difflab's rate is the median of its 4-step ticks after "
                 "the first, which is warm-up)")
    torch.set_num_threads(args.threads)
    if args.child:
        return _child(args.child, args.sizes, args.batch)

    from difflab.nets import build_network

    peak = matmul_peak()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.steps} steps x {args.repeats} repeats; measured float32 matmul peak {peak:.1f} GFLOP/s")
    for size in args.sizes.split(","):
        s = SIZES[size]
        data = digits(size)
        ours_net = build_network("ddpmpp", **our_network_kwargs(size))
        theirs_net = their_unet(size)
        n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours_net, theirs_net))
        f_ours = train_flops(ours_net, lambda n, x, t: n(x, t), size, args.batch) / args.batch
        f_theirs = train_flops(theirs_net, lambda n, x, t: n(x, t).sample, size, args.batch) / args.batch
        runs = {"difflab": (ours_train, {}), "diffusers": (theirs_train, {"data": data})}
        if args.compile:
            runs["difflab --compile"] = (ours_train, {"compile": True})
            runs["diffusers, torch.compile"] = (theirs_train, {"data": data, "compile": True})
        if args.channels_last:
            runs["difflab --channels-last"] = (ours_train, {"channels_last": True})
            runs["diffusers, channels_last"] = (theirs_train, {"data": data, "channels_last": True})
        rates: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for key, (run, kwargs) in runs.items():
                rates[key].append(run(size, args.batch, args.steps, **kwargs))
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"\n## {size}: {s['res']}x{s['res']}x{s['ch']}, batch {args.batch}")
        print("| | params | train FLOPs/img | whole-step img/s | GFLOP/s (% of matmul peak) | ratio to diffusers |")
        print("|---|---|---|---|---|---|")
        for key in runs:
            n, f = (n_ours, f_ours) if key.startswith("difflab") else (n_theirs, f_theirs)
            gf = med[key] * f / 1e9
            print(f"| {key} | {n / 1e6:.2f}M | {f / 1e9:.2f} G | {med[key]:.1f} | {gf:.1f} "
                  f"({100 * gf / peak:.0f}%) | {med[key] / med['diffusers']:.2f} |")
        print(f"(all repeats: {json.dumps({k: [round(r, 1) for r in v] for k, v in rates.items() if v})})")

        samp = {f"net_batch {nb}": statistics.median(
            ours_sample(size, args.sample_batch, args.sample_steps, int(nb)) for _ in range(args.repeats))
            for nb in args.net_batches.split(",")}
        if args.compile:
            nb = int(args.net_batches.split(",")[0])
            samp[f"net_batch {nb} --compile"] = statistics.median(
                ours_sample(size, args.sample_batch, args.sample_steps, nb, compile=True) for _ in range(args.repeats))
        samp["diffusers"] = statistics.median(theirs_sample(size, args.sample_batch, args.sample_steps)
                                              for _ in range(args.repeats))
        if args.compile:
            samp["diffusers, torch.compile"] = statistics.median(
                theirs_sample(size, args.sample_batch, args.sample_steps, compile=True) for _ in range(args.repeats))
        print(f"\nsampling, batch {args.sample_batch}, DDIM {args.sample_steps} steps: image-NFE/s")
        print("| | image-NFE/s | ratio |")
        print("|---|---|---|")
        for key, v in samp.items():
            name = key if key.startswith("diffusers") else f"difflab {key}"
            print(f"| {name} | {v:.1f} | {v / samp['diffusers']:.2f} |")
        if not args.no_memory:
            mem = {w: child_memory(w, size, args.batch, args.threads) for w in ("ours", "theirs")}
            print(f"\npeak RSS growth over a training run: difflab {mem['ours']:.0f} MB, diffusers "
                  f"{mem['theirs']:.0f} MB")


if __name__ == "__main__":
    main()
