"""``difflab generate``: images from a run directory or checkpoint, every setting taken from the run.

The sampler flags are derived from :class:`difflab.generate.SamplerOptions`; ``-o KEY=VALUE`` sets any of them
(or another keyword the run's sampler takes) through the same checks.
"""

from __future__ import annotations

import argparse

from difflab.cli.options import add_schema_arguments, parse_assignments
from difflab.generate import SamplerOptions
from difflab.options import specs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a trained run",
                       description="Generate {seed:06d}.png (or images.npz) plus grid.png. Every setting not "
                                   "given is read from the run's training_options.json. A rerun into the same "
                                   "--outdir generates only the seeds that are missing.")
    p.add_argument("--network", required=True, help="run directory (latest checkpoint) or checkpoint file")
    p.add_argument("--outdir", required=True)
    p.add_argument("--seeds", default="0-63", help="e.g. 0-63,100 (default 0-63; each seed once, at most 10^7)")
    p.add_argument("--subdirs", action="store_true", help="one folder per 1000 seeds")
    p.add_argument("--class", dest="class_idx", type=int, help="class label (default: random per seed)")
    p.add_argument("--batch", type=int, default=64, help="images per batch per rank")
    p.add_argument("--net-batch", type=int, default=16,
                   help="rows per network call; images are identical for any --batch at a fixed --net-batch")
    p.add_argument("--npz", action="store_true", help="write images.npz (uint8 NHWC + seeds) instead of PNGs")
    p.add_argument("--no-grid", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="regenerate every seed (default: keep finished images and generate only the missing ones)")
    p.add_argument("--device", default=None)
    p.add_argument("--tf32", action="store_true", help="allow TF32 on Ampere+ GPUs (faster; off by default)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone (faster after a one-off compile; pixels may differ from an "
                        "eager run by one level; on CPU needs a C++ compiler)")
    p.add_argument("--no-progress", action="store_true")
    add_schema_arguments(p.add_argument_group("sampler (defaults from the run)"), SamplerOptions)
    p.add_argument("-o", "--set", dest="sampler_set", action="append", default=[], metavar="KEY=VALUE",
                   help="any sampler keyword, e.g. -o steps=40")
    p.set_defaults(func=run)


SAMPLER_KEYS = tuple(specs(SamplerOptions))


def run(args: argparse.Namespace) -> None:
    from difflab.generate import generate
    from difflab.rng import parse_seeds

    overrides = {k: getattr(args, k) for k in SAMPLER_KEYS if getattr(args, k) is not None}
    flags = {k: f"{specs(SamplerOptions)[k].flag} {overrides[k]}" for k in overrides}
    for key, value in parse_assignments(args.sampler_set, "-o", "steps=40"):
        overrides[key] = value
        flags[key] = f"-o {key}={value}"
    sampler_grid = overrides.pop("grid", None)  # generate()'s own ``grid`` is the montage
    out = generate(args.network, parse_seeds(args.seeds), args.outdir, sampler_grid=sampler_grid,
                   batch=args.batch, subdirs=args.subdirs,
                   class_idx=args.class_idx, npz=args.npz, grid=not args.no_grid, device=args.device,
                   net_batch=args.net_batch, progress=not args.no_progress, overwrite=args.overwrite,
                   tf32=args.tf32, flags=flags, compile=args.compile, **overrides)
    print(f"wrote {out}")
