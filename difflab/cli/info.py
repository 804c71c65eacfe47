"""``difflab info``: what is available (presets, methods, networks, samplers) and what a run holds."""

from __future__ import annotations

import argparse
import json
import textwrap


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="list presets, methods, networks, samplers; print a preset; describe a run")
    p.add_argument("what", nargs="?", default="presets",
                   help="presets | preset NAME | methods | networks | samplers | RUN_DIR | a preset name")
    p.add_argument("name", nargs="?", help="with `preset`: the preset to print in full (JSON)")
    p.set_defaults(func=run)


def _short(text: str, width: int = 96) -> str:
    return textwrap.shorten(text, width=width, placeholder=" ...")


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from difflab.config import list_presets, load_preset
    from difflab.errors import UserError

    what = args.what
    if what == "preset" or (what in list_presets() and args.name is None):
        name = args.name if what == "preset" else what
        if not name:
            raise UserError("difflab info preset NAME: give the preset's name (`difflab info presets` lists them)")
        print(json.dumps(load_preset(name).to_dict(), indent=2))
    elif what == "presets":
        for name in list_presets():
            cfg = load_preset(name)
            print(f"{name:26s} {cfg.method['name']:9s} {cfg.network['name']:16s} {_short(cfg.description)}")
        print("\n`difflab info preset NAME` prints one in full.")
    elif what == "methods":
        from difflab.methods.registry import METHODS, method_class

        for name in sorted(METHODS):
            cls = method_class(name)
            print(f"{name:10s} default sampler {cls.default_sampler:10s} samplers: {', '.join(cls.samplers)}")
    elif what == "networks":
        from difflab.nets import NETWORKS

        for name, spec in sorted(NETWORKS.items()):
            print(f"{name:16s} {spec.summary}")
    elif what == "samplers":
        from difflab.methods.gaussian import samplers as S

        for name in S.SAMPLERS:
            doc = (getattr(S, f"sample_{name}").__doc__ or "").strip().split("\n\n")[0]
            print(f"{name:16s} {_short(' '.join(doc.split()), 100)}")
            print(f"{'':16s} options: {', '.join(sorted(S.allowed_options(name))) or '-'}")
    else:
        from difflab.config import RunConfig
        from difflab.runio import list_checkpoints, read_checkpoint, read_stats

        run_dir = Path(what)
        if not run_dir.is_dir():
            raise UserError(f"difflab info {what}: not a run directory, a preset or one of presets, preset NAME, "
                            "methods, networks, samplers")
        cfg = RunConfig.load(run_dir / "training_options.json")
        d = cfg.to_dict()
        print(json.dumps({k: d[k] for k in ("preset", "data", "method", "network", "image", "sampler")}, indent=2))
        ckpts = list_checkpoints(run_dir)
        for c in ckpts:
            meta, _ = read_checkpoint(c)
            print(f"checkpoint {c.name}: step {meta['step']}, {meta['kimg']:.1f} kimg")
        stats = [s for s in read_stats(run_dir) if "loss" in s]
        if stats:
            print(f"last loss: {stats[-1]['loss']:.4f} at {stats[-1]['kimg']:.1f} kimg")
        from difflab.methods.gaussian.grid_fit import read_grids

        for name, e in read_grids(run_dir).items():  # difflab fit-grid's; --grid fitted uses them
            r = e.get("rmse", {})
            print(f"fitted grid {name} (--grid fitted): " + ", ".join(f"{v:.4g}" for v in e["sigmas"])
                  + (f"; held-out rmse {r['holdout_default']:.3e} (karras) -> {r['holdout_fitted']:.3e}"
                     if "holdout_fitted" in r else ""))
