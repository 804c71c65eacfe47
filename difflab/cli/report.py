"""``difflab report RUN [RUN ...] --out DIR``: an HTML page with plots comparing runs (:func:`difflab.report`,
docs/report.md)."""

from __future__ import annotations

import argparse

from difflab.cli.options import at_least


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="HTML page + PNG plots of one or more runs (needs the report extra)",
                       description="Loss, learning rate and img/s against kimg, FID against kimg when recorded, the "
                                   "sample grids over training and (with --nfe) FID against NFE; several runs "
                                   "overlay on one plot per quantity.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories written by difflab train")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for index.html and the PNGs")
    p.add_argument("--nfe", metavar="N,N,...", help="also FID against NFE for each run's sampler, e.g. 5,10,20,35")
    p.add_argument("--num", type=at_least(2, "--num"), default=256,
                   help="--nfe: samples per FID (default 256: for comparing, not for papers)")
    p.add_argument("--ref", metavar="REF.npz", help="--nfe: reference statistics (default: the run's --fid-ref, "
                                                    "else its training data)")
    p.add_argument("--batch", type=at_least(1, "--batch"), default=64, help="--nfe: images per generation batch")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: best available)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from difflab.reporting import report

    rep = report(args.runs, args.out, nfe=args.nfe, num=args.num, ref=args.ref, batch=args.batch,
                 device=args.device, progress=not args.no_progress)
    print(f"report: {rep.index} ({len(rep.pngs)} PNGs)")
