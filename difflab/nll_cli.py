"""``difflab nll``: negative log-likelihood in bits/dim of a dataset under a trained run."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("nll", help="bits/dim of a dataset under a trained model")
    p.add_argument("--network", required=True, help="run directory or checkpoint")
    p.add_argument("--data", help="dataset (default: the run's training data)")
    p.add_argument("--num", type=int, default=256, help="number of images to evaluate")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=run)


def nll(network: str, data: str | None = None, num: int = 256, batch: int = 64, seed: int = 0,
        device: str | None = None) -> tuple[float, float]:
    """Mean and standard error of bits/dim over ``num`` images (the method's own bound or estimator)."""
    import numpy as np
    import torch

    from difflab.data import open_dataset
    from difflab.errors import UserError
    from difflab.generate import load_run
    from difflab.rng import StackedRandomGenerator

    model, cfg, _ = load_run(network, device)
    if not hasattr(model, "nll_bpd"):
        raise UserError(f"method {cfg.method['name']!r} has no likelihood computation; use a ddpm run")
    data_kwargs = dict(cfg.data)
    if data:
        data_kwargs = {"source": data, "resolution": cfg.image["resolution"], "channels": cfg.image["channels"],
                       "use_labels": model.label_dim > 0}
    ds = open_dataset(**data_kwargs)
    conditional = model.label_dim > 0
    if conditional and not ds.has_labels:
        raise UserError(f"--data {data_kwargs.get('source')}: the model is class-conditional but these images have no "
                        "labels; pass labelled data (dataset.json or class folders)")
    idx = np.random.default_rng(seed).permutation(len(ds))[:num]
    dev = next(model.parameters()).device
    values = []
    for start in range(0, len(idx), batch):
        chunk = [int(i) for i in idx[start:start + batch]]
        items = [ds[i] for i in chunk]
        images = torch.from_numpy(np.stack([it[0] for it in items])).to(dev)
        # a conditional model is scored on each image's own label, not on the null label
        labels = torch.tensor([int(it[1]) for it in items], device=dev) if conditional else None
        rng = StackedRandomGenerator(dev, [seed * (1 << 32) + i for i in chunk])
        with torch.no_grad():
            values.append(model.nll_bpd(model.encode(images), rng, class_labels=labels).double().cpu())
    v = torch.cat(values)
    return float(v.mean()), float(v.std() / max(len(v), 1) ** 0.5)


def run(args: argparse.Namespace) -> None:
    mean, sem = nll(args.network, args.data, args.num, args.batch, args.seed, args.device)
    print(f"NLL: {mean:.4f} +- {sem:.4f} bits/dim ({args.num} images)")
