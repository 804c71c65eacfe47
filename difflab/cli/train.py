"""``difflab train``: preset + flags -> :class:`RunConfig` -> :func:`difflab.training.loop.train`.

Familiar flags of the systems difflab replaces are accepted: ``--precond``/``--method``, ``--arch``,
``--cond``, ``--duration`` (kimg), ``--ema`` (half-life, kimg), ``--augment``, ``--fp16``. Any other
``--some-option VALUE`` is routed to the method or the network that takes ``some_option``
(e.g. ``--eta 10000 --sigmoid-start 9`` for SDD, ``--dropout 0.1`` for the backbone).
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from difflab.config import RunConfig, apply_override, load_preset, parse_value
from difflab.errors import UserError

DEFAULT_PRESET = "digits-quick"

# flag -> (section, key)
DATA_FLAGS = {"data": "source", "resolution": "resolution", "channels": "channels", "xflip": "xflip",
              "npy_axis": "npy_axis", "npy_key": "npy_key", "npy_range": "npy_range", "npy_layout": "npy_layout",
              "label_rule": "label_rule", "max_size": "max_size", "cond": "use_labels", "nan_to": "nan_to"}
TRAIN_FLAGS = {"batch": "batch", "batch_gpu": "batch_gpu", "duration": "duration_kimg", "lr": "lr",
               "lr_rampup": "lr_rampup_kimg", "lr_schedule": "lr_schedule", "ema": "ema_halflife_kimg",
               "ema_decay": "ema_decay", "ema_start": "ema_start_step", "ema_every": "ema_every",
               "grad_clip": "grad_clip", "augment": "augment_p", "precision": "precision", "tick": "tick_kimg",
               "snap": "snapshot_ticks", "seed": "seed", "workers": "workers", "holdout": "holdout",
               "early_stop_delta": "early_stop_delta", "fid_every": "fid_every", "fid_num": "fid_num",
               "fid_ref": "fid_ref", "stop_after_steps": "stop_after_steps", "optimizer": "optimizer",
               "keep_checkpoints": "keep_checkpoints", "tf32": "tf32"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (presets: `difflab info presets`)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help=f"preset name or JSON path (default {DEFAULT_PRESET})")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="image folder, zip, .npy/.npz (folder), digits, MNIST idx, CIFAR-10 tarball")
    g.add_argument("--resolution", "--npy_resolution", "--npy-resolution", dest="resolution", type=int)
    g.add_argument("--channels", type=int, choices=[1, 3])
    g.add_argument("--cond", type=_bool, metavar="BOOL", help="class-conditional (labels from the dataset)")
    g.add_argument("--xflip", type=_bool, metavar="BOOL", help="add mirrored images")
    g.add_argument("--npy-axis", "--npy_slice_axis", dest="npy_axis", type=int, help="slicing axis of 3-D volumes")
    g.add_argument("--npy-key", help="array name inside .npz files")
    g.add_argument("--npy-range", type=float, nargs=2, metavar=("LO", "HI"),
                   help="intensity window mapped to 0..255 (default: min/max of each array)")
    g.add_argument("--npy-layout", help="4-D stacks: auto | nchw | nhwc")
    g.add_argument("--nan-to", type=float, metavar="NUMBER",
                   help="replace NaN/inf in float data by NUMBER (default: refuse such data)")
    g.add_argument("--labels", dest="label_rule", help="label rule: auto | json | folders | prefix | none")
    g.add_argument("--max-size", type=int, help="use a reproducible random subset of this many images")
    g = p.add_argument_group("model")
    g.add_argument("--method", "--precond", dest="method", help="edm | vp | ve | iddpm | ddpm | sdd | betadiff")
    g.add_argument("--arch", "--network", dest="arch",
                   help="ddpmpp | ncsnpp | ddpmpp-sde[-deep] | ncsnpp-sde[-deep] | adm | unetmini | ddpm_unet | "
                        "dit | dit-s | dit-b | dit-l | dit-xl")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch", type=int, help="global batch size")
    g.add_argument("--batch-gpu", type=int, help="per-device batch; gradient accumulation follows")
    g.add_argument("--duration", type=float, help="training length in kimg")
    g.add_argument("--lr", type=float)
    g.add_argument("--lr-rampup", type=float, help="linear LR warm-up, kimg")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"])
    g.add_argument("--optimizer", choices=["adam", "adamw"])
    g.add_argument("--ema", type=float, help="EMA half-life in kimg")
    g.add_argument("--ema-decay", type=float, help="plain EMA decay (e.g. 0.9999) instead of a half-life")
    g.add_argument("--ema-start", type=int, help="plain decay: first step of averaging")
    g.add_argument("--ema-every", type=int, help="plain decay: update interval in steps")
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--augment", type=float, help="non-leaky augmentation probability")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    g.add_argument("--fp16", action="store_true", help="same as --precision fp16")
    g.add_argument("--tf32", action="store_true", default=None,
                   help="allow TF32 matmuls/convolutions on Ampere+ GPUs (faster; off by default: fp32 means fp32)")
    g.add_argument("--seed", type=int)
    g.add_argument("--holdout", type=int, help="images held out for a validation loss and checkpoint-best")
    g.add_argument("--early-stop-delta", type=float, help="stop when tick losses change less than this")
    g = p.add_argument_group("run")
    g.add_argument("--outdir", default="runs", help="parent of new run directories")
    g.add_argument("--run-dir", help="exact run directory (resumes automatically if it holds a checkpoint)")
    g.add_argument("--resume", help="run directory or checkpoint to continue")
    g.add_argument("--device", default=None, help="cpu | cuda | mps | auto")
    g.add_argument("--tick", type=float, help="kimg between log lines")
    g.add_argument("--snap", type=int, help="ticks between checkpoints + sample grids")
    g.add_argument("--workers", type=int)
    g.add_argument("--keep-checkpoints", type=int, help="keep only the newest N checkpoints")
    g.add_argument("--fid-every", type=int, help="small FID every N snapshots")
    g.add_argument("--fid-num", type=int)
    g.add_argument("--fid-ref", help="reference statistics .npz for --fid-every")
    g.add_argument("--stop-after-steps", type=int, help="end at this step (resume later)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any config value, e.g. -o train.lr=2e-4 -o method.eta=10000")
    p.set_defaults(func=run, parse_known=True)


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _snake(key: str) -> str:
    """``sigmoid-start`` / ``lossType`` / ``Shift`` (the SDD and EDM spellings) -> ``sigmoid_start`` etc."""
    out = []
    for i, ch in enumerate(key.replace("-", "_")):
        if ch.isupper() and i > 0 and key[i - 1].islower():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def _route_extra(cfg: RunConfig, extra: list[str]) -> None:
    """``--some-option VALUE`` -> method or network kwarg named ``some_option``."""
    from difflab.methods.registry import method_class
    from difflab.nets import NETWORKS

    mparams = inspect.signature(method_class(cfg.method["name"]).__init__).parameters
    nfactory = NETWORKS[cfg.network["name"]].factory if cfg.network["name"] in NETWORKS else None
    nparams = inspect.signature(nfactory).parameters if nfactory else {}
    i = 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--"):
            raise UserError(f"unexpected argument {tok!r}")
        if "=" in tok:
            key, value = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise UserError(f"option {tok} needs a value")
            key, value = tok[2:], extra[i + 1]
            i += 2
        name = _snake(key)
        if name in mparams and name not in ("self", "net", "variant"):
            cfg.method[name] = parse_value(value)
        elif name in nparams:
            cfg.network[name] = parse_value(value)
        else:
            raise UserError(f"unknown option --{key}: not a difflab flag, nor an option of method "
                            f"{cfg.method['name']!r} or network {cfg.network['name']!r} (see difflab train --help)")


def config_from_args(args: argparse.Namespace, extra: list[str]) -> RunConfig:
    cfg = load_preset(args.preset or DEFAULT_PRESET)
    if args.method and args.method != cfg.method["name"]:
        cfg.method = {"name": args.method}
    if args.arch and args.arch != cfg.network["name"]:
        cfg.network = {"name": args.arch}
    if args.data and args.data != cfg.data.get("source"):
        # a new data source keeps only the generic data settings of the preset
        cfg.data = {k: v for k, v in cfg.data.items() if k in ("resolution", "channels", "use_labels")}
    for flag, key in DATA_FLAGS.items():
        if getattr(args, flag) is not None:
            cfg.data[key] = getattr(args, flag)
    for flag, key in TRAIN_FLAGS.items():
        if getattr(args, flag, None) is not None:
            setattr(cfg.train, key, getattr(args, flag))
    if args.fp16:
        cfg.train.precision = "fp16"
    for ov in args.overrides:
        if "=" not in ov:
            raise UserError(f"--set {ov!r}: use SECTION.KEY=VALUE, e.g. train.lr=2e-4")
        k, v = ov.split("=", 1)
        apply_override(cfg, k, parse_value(v))
    _route_extra(cfg, extra)
    return cfg


def run(args: argparse.Namespace, extra: list[str] | None = None) -> Path:
    from difflab.training.loop import train

    extra = extra or []
    run_dir, resume_from = args.run_dir, None
    if args.resume:
        from difflab.runio import resolve_checkpoint

        ckpt = resolve_checkpoint(args.resume)
        run_dir, resume_from = str(ckpt.parent), ckpt
        if args.preset or extra:
            raise UserError("--resume continues a run with its stored options; drop --preset and method flags")
        cfg = RunConfig.load(ckpt.parent / "training_options.json")
        if args.duration is not None:
            cfg.train.duration_kimg = args.duration
        if args.stop_after_steps is not None:
            cfg.train.stop_after_steps = args.stop_after_steps
    else:
        cfg = config_from_args(args, extra)
    return train(cfg, run_dir=run_dir, outdir=args.outdir, device=args.device, progress=not args.no_progress,
                 resume_from=resume_from)
