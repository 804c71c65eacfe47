"""``difflab dataset convert|info`` (docs/data.md). Thin: parses and calls :mod:`difflab.data.dataset_tool`.

:func:`add_source_arguments` and :func:`source_kwargs` are shared with other commands that read a
dataset (e.g. ``train --data``), so every command spells the NPY/label options the same way.
"""

from __future__ import annotations

import argparse
import json

from difflab.cli.options import add_schema_arguments, at_least
from difflab.config import DataOptions
from difflab.data.images import TRANSFORMS
from difflab.options import coerce, specs

SOURCE_OPTIONS = ("channels", "label_rule", "npy_axis", "npy_key", "npy_range", "npy_layout", "nan_to", "npy_label_key")


def parse_range(text: str | None) -> tuple[float, float] | None:
    """``"-1000,1000"`` -> ``(-1000.0, 1000.0)``."""
    return None if text is None else coerce(specs(DataOptions)["npy_range"], text)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that say how to read a source: channels, labels and the NPY/NPZ rules (from
    :class:`~difflab.config.DataOptions`, as ``train`` spells them)."""
    add_schema_arguments(parser.add_argument_group("source reading"), DataOptions, only=SOURCE_OPTIONS)


def source_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for :func:`difflab.data.open_source` / :func:`~difflab.data.open_dataset` (the
    options given; the others keep the function's defaults)."""
    return {k: getattr(args, k) for k in SOURCE_OPTIONS if k != "channels" and getattr(args, k) is not None}


def _convert(args: argparse.Namespace) -> None:
    from difflab.data.dataset_tool import convert_dataset

    n = convert_dataset(
        args.source,
        args.dest,
        resolution=args.resolution,
        transform=args.transform,
        max_images=args.max_images,
        channels=args.channels,
        progress=not args.quiet,
        **source_kwargs(args),
    )
    print(f"wrote {n} images to {args.dest}")


def _info(args: argparse.Namespace) -> None:
    from difflab.data.dataset_tool import dataset_info, format_info

    info = dataset_info(args.source, resolution=args.resolution, channels=args.channels, **source_kwargs(args))
    print(json.dumps(info, indent=2) if args.json else format_info(info))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "dataset",
        help="convert and inspect datasets",
        description="Convert datasets to EDM's layout and inspect them.",
    )
    sub = parser.add_subparsers(dest="dataset_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help())

    conv = sub.add_parser(
        "convert",
        help="write a source as PNGs + dataset.json (folder or .zip)",
        description="Convert a folder, zip, NPY/NPZ, MNIST IDX, cifar-10-python.tar.gz or 'digits' to "
        "EDM's layout: uncompressed PNGs 00000/img00000000.png plus dataset.json.",
    )
    conv.add_argument("--source", required=True, metavar="PATH", help="input dataset (or 'digits')")
    conv.add_argument("--dest", required=True, metavar="PATH", help="output folder or .zip (must not exist)")
    conv.add_argument(
        "--resolution",
        "--npy_resolution",
        dest="resolution",
        default=None,
        metavar="WxH",
        help="output size, e.g. 32x32 (LANCZOS when shrinking); square power of two",
    )
    conv.add_argument(
        "--transform",
        choices=TRANSFORMS,
        default=None,
        help="center-crop: central square; center-crop-wide: central WxH band padded to WxW",
    )
    conv.add_argument(
        "--max-images",
        "--max_images",
        dest="max_images",
        type=at_least(1, "--max-images"),
        default=None,
        metavar="N",
        help="convert only the first N images",
    )
    conv.add_argument("--quiet", action="store_true", help="no progress bar")
    add_source_arguments(conv)
    conv.set_defaults(func=_convert)

    info = sub.add_parser("info", help="print image count, shape and labels of a source")
    info.add_argument("source", metavar="SOURCE", help="dataset path or 'digits'")
    info.add_argument("--resolution", default=None, metavar="RES", help="report as if resized to RES")
    info.add_argument("--json", action="store_true", help="print JSON")
    add_source_arguments(info)
    info.set_defaults(func=_info)
