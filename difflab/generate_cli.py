"""``difflab generate``: images from a run directory or checkpoint, every setting taken from the run."""

from __future__ import annotations

import argparse

from difflab.rng import parse_seeds


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a trained run",
                       description="Generate {seed:06d}.png (or images.npz) plus grid.png. Every setting not "
                                   "given is read from the run's training_options.json. A rerun into the same "
                                   "--outdir generates only the seeds that are missing.")
    p.add_argument("--network", required=True, help="run directory (latest checkpoint) or checkpoint file")
    p.add_argument("--outdir", required=True)
    p.add_argument("--seeds", default="0-63", help="e.g. 0-63,100 (default 0-63)")
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
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("sampler (defaults from the run)")
    g.add_argument("--sampler", help="any Gaussian run: heun | euler | ablation | ancestral | deterministic | ddim | "
                                     "pc | ode; SDD/Beta runs: sdd; DDDM runs: dddm (see `difflab info methods`)")
    g.add_argument("--steps", "--sample_steps", "--sample-steps", dest="steps", type=int,
                   help="sampler steps (pc/ode: discretisation levels N; dddm: fixed-point steps K = NFE)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    g.add_argument("--grid", help="sigma grid of heun/euler/ancestral/deterministic/ddim: karras | time-uniform | "
                                  "table (a DDPM run's own spacing)")
    for name in ("S_churn", "S_min", "S_max", "S_noise", "sigma_min", "sigma_max", "rho", "eta", "alpha",
                 "epsilon_s", "snr", "rtol", "atol", "t_eps"):
        g.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, type=float) if "_" in name else \
            g.add_argument(f"--{name}", type=float)
    for name in ("solver", "discretization", "schedule", "scaling", "skip", "respacing", "var_type", "predictor",
                 "corrector", "order", "norm"):
        g.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name) if "_" in name else \
            g.add_argument(f"--{name}")
    g.add_argument("--corrector-steps", "--corrector_steps", dest="corrector_steps", type=int,
                   help="pc: Langevin steps per level")
    g.add_argument("--disc", dest="discretization", help=argparse.SUPPRESS)
    p.add_argument("-o", "--set", dest="sampler_set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sampler keyword")
    p.set_defaults(func=run)


SAMPLER_KEYS = ("sampler", "steps", "guidance", "grid", "S_churn", "S_min", "S_max", "S_noise", "sigma_min",
                "sigma_max", "rho", "eta", "alpha", "epsilon_s", "snr", "rtol", "atol", "t_eps", "solver",
                "discretization", "schedule", "scaling", "skip", "respacing", "var_type", "predictor", "corrector",
                "order", "norm", "corrector_steps")


def run(args: argparse.Namespace) -> None:
    from difflab.config import parse_value
    from difflab.errors import UserError
    from difflab.generate import generate

    overrides = {k: getattr(args, k) for k in SAMPLER_KEYS if getattr(args, k) is not None}
    for kv in args.sampler_set:
        if "=" not in kv:
            raise UserError(f"--set {kv!r}: use KEY=VALUE")
        k, v = kv.split("=", 1)
        overrides[k] = parse_value(v)
    out = generate(args.network, parse_seeds(args.seeds), args.outdir, batch=args.batch, subdirs=args.subdirs,
                   class_idx=args.class_idx, npz=args.npz, grid=not args.no_grid, device=args.device,
                   net_batch=args.net_batch, progress=not args.no_progress, overwrite=args.overwrite,
                   tf32=args.tf32, **overrides)
    print(f"wrote {out}")
