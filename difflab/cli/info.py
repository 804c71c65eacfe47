"""``difflab info``: what is available (presets, methods, networks) and what a run holds."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="list presets, methods, networks, or describe a run")
    p.add_argument("what", nargs="?", default="presets", help="presets | methods | networks | RUN_DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from difflab.config import list_presets, load_preset

    if args.what == "presets":
        for name in list_presets():
            cfg = load_preset(name)
            summary = cfg.description.split(". ")[0][:90]
            print(f"{name:22s} {cfg.method['name']:9s} {cfg.network['name']:10s} {summary}")
    elif args.what == "methods":
        from difflab.methods.registry import METHODS, method_class

        for name in sorted(METHODS):
            try:
                cls = method_class(name)
                print(f"{name:10s} samplers: {', '.join(cls.samplers)} (default {cls.default_sampler})")
            except ImportError as e:
                print(f"{name:10s} unavailable ({e})")
    elif args.what == "networks":
        from difflab.nets import NETWORKS

        for name, spec in sorted(NETWORKS.items()):
            print(f"{name:16s} {spec.summary}")
    else:
        from pathlib import Path

        from difflab.config import RunConfig
        from difflab.runio import list_checkpoints, read_checkpoint, read_stats

        run_dir = Path(args.what)
        cfg = RunConfig.load(run_dir / "training_options.json")
        d = cfg.to_dict()
        print(json.dumps({k: d[k] for k in ("preset", "data", "method", "network", "image", "sampler")}, indent=2))
        ckpts = list_checkpoints(run_dir)
        if ckpts:
            meta, _ = read_checkpoint(ckpts[-1])
            print(f"latest checkpoint: {ckpts[-1].name} (step {meta['step']}, {meta['kimg']:.1f} kimg)")
        stats = [s for s in read_stats(run_dir) if "loss" in s]
        if stats:
            print(f"last loss: {stats[-1]['loss']:.4f} at {stats[-1]['kimg']:.1f} kimg")
