"""``difflab nll``: negative log-likelihood in bits/dim of a dataset under a trained run (:func:`difflab.nll.nll`)."""

from __future__ import annotations

import argparse

from difflab.cli.options import at_least


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("nll", help="bits/dim of a dataset under a trained model (any Gaussian method)",
                       description="Exact likelihood through the probability-flow ODE for every Gaussian method; "
                                   "DDPM runs also report their variational bound.")
    p.add_argument("--network", required=True, help="run directory or checkpoint")
    p.add_argument("--data", help="dataset (default: the run's training data)")
    p.add_argument("--num", type=at_least(1, "--num"), default=256,
                   help="number of images to evaluate (a seeded random subset)")
    p.add_argument("--batch", type=at_least(1, "--batch"), default=64)
    p.add_argument("--seed", type=at_least(0, "--seed"), default=0)
    p.add_argument("--repeats", type=at_least(1, "--repeats"), default=1,
                   help="uniform dequantisations per image (score SDE: 5 on test)")
    p.add_argument("--estimator", choices=("auto", "ode", "vlb", "both"), default="auto",
                   help="auto: ODE, plus the variational bound for ddpm runs")
    p.add_argument("--probe", choices=("rademacher", "gaussian"), default="rademacher",
                   help="Hutchinson-Skilling probe distribution")
    p.add_argument("--exact", action="store_true", help="exact divergence instead of the Hutchinson estimate "
                                                        "(one backward pass per dimension: small data only)")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--t-eps", "--t_eps", dest="t_eps", type=float, default=1e-5,
                   help="integrate from this time (score SDE's eps)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from difflab.nll import nll

    res = nll(args.network, args.data, args.num, args.batch, args.seed, args.device, args.estimator, args.repeats,
              args.probe, args.exact, args.rtol, args.atol, args.t_eps, progress=not args.no_progress)
    if "ode" in res:
        r = res["ode"]
        print(f"NLL (probability-flow ODE): {r['mean']:.4f} +- {r['sem']:.4f} bits/dim "
              f"({r['count']} image evaluations, mean NFE {r['nfe']:.0f})")
    if "vlb" in res:
        r = res["vlb"]
        print(f"NLL (variational bound):    {r['mean']:.4f} +- {r['sem']:.4f} bits/dim ({r['count']} images)")
