"""``difflab dataset convert|info`` (docs/data.md). Thin: parses and calls :mod:`difflab.data.dataset_tool`.

:func:`add_source_arguments` and :func:`source_kwargs` are shared with other commands that read a
dataset (e.g. ``train --data``), so every command spells the NPY/label options the same way.
"""

from __future__ import annotations

import argparse
import json

from difflab.cli.options import at_least
from difflab.data.images import TRANSFORMS
from difflab.data.labels import LABEL_RULES
from difflab.data.sources import NPY_LAYOUTS
from difflab.errors import UserError


def parse_range(text: str | None) -> tuple[float, float] | None:
    """``"-1000,1000"`` -> ``(-1000.0, 1000.0)``."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in str(text).replace(":", ",").split(","))
    except ValueError:
        raise UserError(f"--npy-range {text!r}: use LO,HI, e.g. --npy-range=-1000,1000") from None
    if not hi > lo:
        raise UserError(f"--npy-range {text!r}: need LO < HI")
    return lo, hi


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that say how to read a source: channels, labels and the NPY/NPZ rules."""
    g = parser.add_argument_group("source reading")
    g.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="convert to 1 (gray, ITU-R 601 luma) or 3 (RGB) channels; default: as the source",
    )
    g.add_argument(
        "--labels",
        dest="label_rule",
        choices=LABEL_RULES,
        default="auto",
        help="where class labels come from (default auto: dataset.json, folders, name prefix)",
    )
    g.add_argument(
        "--npy-axis",
        "--npy_slice_axis",
        "--npy-slice-axis",
        dest="npy_axis",
        type=int,
        default=0,
        metavar="AXIS",
        help="axis along which 3-D volumes are sliced into 2-D images (default 0)",
    )
    g.add_argument(
        "--npy-key",
        "--npy_key",
        dest="npy_key",
        default=None,
        metavar="KEY",
        help="array to read from .npz files (default: the first non-label array)",
    )
    g.add_argument(
        "--npy-range",
        "--npy_range",
        dest="npy_range",
        default=None,
        metavar="LO,HI",
        help="fixed intensity window mapped to 0..255 (e.g. a CT window -1000,1000); "
        "default: per-volume min/max for non-uint8 data",
    )
    g.add_argument(
        "--npy-layout",
        "--npy_layout",
        dest="npy_layout",
        choices=NPY_LAYOUTS,
        default="auto",
        help="how arrays split into images (default auto: 2-D image, 3-D volume, 4-D stack)",
    )
    g.add_argument(
        "--nan-to",
        dest="nan_to",
        type=float,
        default=None,
        metavar="NUMBER",
        help="replace NaN, +inf and -inf in float data by NUMBER (default: refuse such data)",
    )
    g.add_argument(
        "--npy-label-key",
        dest="npy_label_key",
        default=None,
        metavar="KEY",
        help="label array in .npz files (default: 1-D integer 'labels', 'label', 'y' or 'arr_1')",
    )


def source_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for :func:`difflab.data.open_source` / :func:`~difflab.data.open_dataset`."""
    return dict(
        label_rule=args.label_rule,
        npy_axis=args.npy_axis,
        npy_key=args.npy_key,
        npy_range=parse_range(args.npy_range),
        npy_layout=args.npy_layout,
        npy_label_key=args.npy_label_key,
        nan_to=args.nan_to,
    )


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
