"""``difflab fit-grid``: fit a few-step sampler's sigma grid to a trained Gaussian run
(:mod:`difflab.methods.gaussian.grid_fit`); ``generate --grid fitted`` then uses it."""

from __future__ import annotations

import argparse

from difflab.cli.options import at_least, parse_assignments


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit-grid", help="fit a sampler's sigma grid to a run (then: generate --grid fitted)",
                       description="Choose the N levels of a deterministic sampler's grid that bring its output "
                                   "closest to the run's own probability-flow ODE solved tightly, on pilot "
                                   "latents (Nelder-Mead over the log-sigma gaps, from the Karras grid), and store "
                                   "them in the run's grids.json. Prints the held-out error of the Karras and the "
                                   "fitted grid. docs/samplers.md, 'Fitted grids'.")
    p.add_argument("--network", required=True, help="run directory (latest checkpoint) or checkpoint file")
    p.add_argument("--sampler", required=True, help="heun | euler | dpmpp_2m | dpmpp_3m | dpmpp_2s | unipc | ipndm "
                                                     "| deis")
    p.add_argument("--steps", required=True, type=at_least(1, "--steps"), help="grid levels N (as generate's)")
    p.add_argument("--pilots", type=at_least(1, "--pilots"), default=64, help="latents the grid is fitted on")
    p.add_argument("--holdout", type=at_least(1, "--holdout"), default=64,
                   help="further latents the fitted grid is scored on")
    p.add_argument("--seed", type=at_least(0, "--seed"), default=0, help="first pilot seed")
    p.add_argument("--max-evals", type=at_least(1, "--max-evals"), default=500,
                   help="sampler runs the search may make (each costs NFE x pilots network rows)")
    p.add_argument("--rtol", type=float, default=1e-5, help="tolerance of the reference ODE solve")
    p.add_argument("--sigma_min", "--sigma-min", dest="sigma_min", type=float, help="lowest level (default 0.002)")
    p.add_argument("--sigma_max", "--sigma-max", dest="sigma_max", type=float, help="top level (default 80)")
    p.add_argument("-o", "--set", dest="sampler_set", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampler option, e.g. -o order=3 (unipc)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from difflab import runio
    from difflab.api import fit_grid
    from difflab.errors import UserError
    from difflab.methods.gaussian.grid_fit import GRIDS_FILE

    if not (args.rtol > 0):
        raise UserError(f"--rtol {args.rtol}: must be a number > 0")
    options = dict(parse_assignments(args.sampler_set, "-o", "order=3"))
    e = fit_grid(args.network, args.sampler, args.steps, device=args.device, pilots=args.pilots,
                 holdout=args.holdout, seed=args.seed, rtol=args.rtol, max_evals=args.max_evals,
                 sigma_min=args.sigma_min, sigma_max=args.sigma_max, progress=not args.no_progress, **options)
    r = e["rmse"]
    print(f"{e['sampler']} at {e['steps']} steps: held-out rmse {r['holdout_default']:.3e} (karras) -> "
          f"{r['holdout_fitted']:.3e} (fitted), against the adaptive solve (rtol {args.rtol:g}, mean NFE "
          f"{e['reference']['nfe']:.0f})")
    print("sigmas: " + ", ".join(f"{s:.4g}" for s in e["sigmas"]))
    path = runio.resolve_checkpoint(args.network).parent / GRIDS_FILE
    print(f"wrote {path}; use it: difflab generate --network {args.network} --sampler {e['sampler']} "
          f"--steps {e['steps']} --grid fitted")
