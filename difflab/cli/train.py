"""``difflab train``: preset + flags -> :class:`RunConfig` -> :func:`difflab.training.loop.train`.

Every training option (:class:`~difflab.config.TrainOptions`) and data option
(:class:`~difflab.config.DataOptions`) is a flag derived from its schema, with the spellings users of the
systems difflab replaces know: ``--precond``/``--method``, ``--arch``, ``--cond``, ``--duration`` (kimg),
``--ema`` (half-life, kimg), ``--augment``, ``--batch-gpu``, ``--npy_resolution``, ``--fp16``. Any other
``--some-option VALUE`` is routed to the method or the network that takes ``some_option``
(e.g. ``--eta 10000 --sigmoid-start 9`` or ``--lossType KLUB`` for SDD, ``--dropout 0.1`` for the backbone)
and checked against that parameter's type. Bad values stop with one line before anything is written.

Resuming (``--resume RUN``, or ``--run-dir RUN`` that holds a checkpoint) starts from the run's stored
``training_options.json`` and applies only the flags typed: ``--duration``, ``--stop-after-steps``,
``--workers``, ``--keep-checkpoints`` and ``--snap-minutes`` may change; any other typed flag whose value
differs from the stored one is refused in one line (docs/training.md "Resume").
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from difflab.cli.options import add_schema_arguments, parse_assignments, snake, split_extra
from difflab.config import (
    DataOptions,
    RunConfig,
    TrainOptions,
    apply_override,
    load_preset,
    parse_value,
    set_data,
)
from difflab.errors import UserError, echo
from difflab.options import check_value, specs

DEFAULT_PRESET = "digits-quick"
# old names: flag dest -> (section) key
DATA_FLAGS = {s.flag[2:].replace("-", "_"): name for name, s in specs(DataOptions).items()}
TRAIN_FLAGS = {s.flag[2:].replace("-", "_"): name for name, s in specs(TrainOptions).items()}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (presets: `difflab info presets`)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help=f"preset name or JSON path (default {DEFAULT_PRESET})")
    add_schema_arguments(p.add_argument_group("data"), DataOptions, skip=("crop_to",))
    g = p.add_argument_group("model")
    g.add_argument("--method", "--precond", dest="method", help="edm | vp | ve | iddpm | ddpm | sdd | betadiff "
                                                               "(`difflab info methods`)")
    g.add_argument("--arch", "--network", dest="arch",
                   help="backbone (`difflab info networks`): the preset's own name keeps the preset's network "
                        "settings, another name starts from that network's defaults (see --dry-run)")
    g = p.add_argument_group("training (TrainOptions)")
    add_schema_arguments(g, TrainOptions)
    g.add_argument("--fp16", action="store_true", help="same as --precision fp16")
    g.add_argument("--log_to_wandb", "--log-to-wandb", type=lambda t: check_value("--log_to_wandb", t, bool),
                   metavar="BOOL", help="DDPM-CIFAR spelling: true = --wandb (project --project_name, default difflab)")
    g = p.add_argument_group("run")
    g.add_argument("--outdir", default="runs", help="parent of new run directories")
    g.add_argument("--run-dir", help="exact run directory (resumes automatically if it holds a checkpoint)")
    g.add_argument("--resume", help="run directory or checkpoint to continue")
    g.add_argument("--from-scratch", "--training_from_scratch", dest="from_scratch", action="store_true",
                   help="start anew in an existing --run-dir: its contents move to RUN_DIR/previous-*/ first")
    g.add_argument("--device", default=None, help="cpu | cuda | mps | auto")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--dry-run", action="store_true",
                   help="print the resolved config (JSON) and the parameter count, then exit without writing")
    g.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any config value, e.g. -o train.lr=2e-4 -o method.eta=10000")
    p.set_defaults(func=run, parse_known=True)


def _route_extra(cfg: RunConfig, extra: list[str]) -> dict[str, str]:
    """``--some-option VALUE`` -> method or network kwarg named ``some_option``; returns name -> the flag as
    typed (for error messages)."""
    from difflab.build import named_parameters
    from difflab.methods.registry import method_class
    from difflab.nets import NETWORKS

    mparams = named_parameters(method_class(cfg.method["name"]).__init__) - {"self", "net", "variant"}
    nfactory = NETWORKS[cfg.network["name"]].factory if cfg.network["name"] in NETWORKS else None
    nparams = named_parameters(nfactory) if nfactory else set()
    shown = {}
    for key, value in split_extra(extra):
        name = snake(key)
        if name in mparams:
            cfg.method[name] = parse_value(value)
        elif name in nparams:
            cfg.network[name] = parse_value(value)
        else:
            raise UserError(f"unknown option --{key}: not a difflab flag, nor an option of method "
                            f"{cfg.method['name']!r} or network {cfg.network['name']!r} (see difflab train --help)")
        shown[name] = f"--{key} {value}"
    return shown


def config_from_args(args: argparse.Namespace, extra: list[str], base: RunConfig | None = None) -> RunConfig:
    """The run config the flags describe, every value checked (a UserError of one line otherwise): the
    preset (or ``base``, a resumed run's stored config) with the flags the user typed applied."""
    from difflab.build import check_config

    cfg = copy.deepcopy(base) if base is not None else load_preset(args.preset or DEFAULT_PRESET)
    if args.method and args.method != cfg.method["name"]:
        cfg.method = {"name": args.method}
    if args.arch and args.arch != cfg.network["name"]:
        echo(f"--arch {args.arch}: the network starts from {args.arch}'s own defaults, not the preset's "
             f"{cfg.network['name']} settings (--dry-run prints the result)")
        cfg.network = {"name": args.arch}
    dropped = set_data(cfg, {name: getattr(args, name) for name in specs(DataOptions)
                             if getattr(args, name, None) is not None})
    if dropped:
        shown = ", ".join(f"{k} {v}" for k, v in dropped.items())
        echo(f"--data {args.source}: the preset's data settings ({shown}) are not applied to other data")
    for name in specs(TrainOptions):
        if getattr(args, name, None) is not None:
            setattr(cfg.train, name, getattr(args, name))
    if args.fp16:
        cfg.train.precision = "fp16"
    if args.log_to_wandb is not None:
        cfg.train.wandb = (cfg.train.wandb or "difflab") if args.log_to_wandb else None
    for key, value in parse_assignments(args.overrides, "-o", "train.lr=2e-4"):
        apply_override(cfg, key, value, where=f"-o {key}={value}")
    check_config(cfg, _route_extra(cfg, extra))
    return cfg


def dry_run(cfg: RunConfig) -> None:
    """``--dry-run``: the config the run would store (``training_options.json``, its ``image`` and ``data``
    filled from the data as training would) and the parameter count; nothing is written."""
    import json

    from difflab.build import build_model, resolve_image

    dataset = resolve_image(cfg)
    model = build_model(cfg)
    print(json.dumps(cfg.to_dict(), indent=2))
    nparams = sum(p.numel() for p in model.parameters())
    print(f"dataset {dataset.name}: {len(dataset)} images {dataset.image_shape}; {cfg.method['name']} on "
          f"{cfg.network['name']}: {nparams:,} parameters ({nparams / 1e6:.2f}M)")


def run(args: argparse.Namespace, extra: list[str] | None = None) -> Path | None:
    from difflab.runio import check_folder_arg, list_checkpoints, resolve_checkpoint
    from difflab.training.loop import train

    extra = extra or []
    run_dir, resume_from = args.run_dir, None
    if args.run_dir:
        check_folder_arg(args.run_dir, "--run-dir")
    check_folder_arg(args.outdir, "--outdir")
    resuming = False
    if args.resume and not args.from_scratch:
        ckpt = resolve_checkpoint(args.resume)
        run_dir, resume_from, resuming = str(ckpt.parent), ckpt, True
    elif args.run_dir and not args.from_scratch and Path(args.run_dir).is_dir() and list_checkpoints(args.run_dir):
        resuming = True
    if resuming:
        # the stored options plus what was typed; the loop refuses a typed value that differs from the stored
        stored = RunConfig.load(Path(run_dir) / "training_options.json")
        cfg = config_from_args(args, extra, base=None if args.preset else stored)
        if args.stop_after_steps is None:
            cfg.train.stop_after_steps = None  # a job limit of the earlier invocation, not of this one
    else:
        cfg = config_from_args(args, extra)
    if args.dry_run:
        return dry_run(cfg)
    return train(cfg, run_dir=run_dir, outdir=args.outdir, device=args.device, progress=not args.no_progress,
                 resume_from=resume_from, from_scratch=args.from_scratch)
