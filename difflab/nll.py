"""Negative log-likelihood of a dataset under a trained run, in bits/dim (the library behind ``difflab nll``).

Every Gaussian method gets the exact likelihood of its probability-flow ODE (specs/gaussian_and_dddm.md §4.6:
uniform dequantisation, Hutchinson-Skilling trace with per-image probes, ``repeats`` dequantisations per
image); DDPM runs also report their variational bound (§2.3 ``calc_bpd_loop``). Each image's randomness comes
from its own seed, so the per-image values do not depend on ``batch`` or on the number of ranks, which split
the images between them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from difflab.errors import UserError
from difflab.options import check_value

ESTIMATORS = ("auto", "ode", "vlb", "both")


def image_seed(seed: int, repeat: int, index: int) -> int:
    """The seed of one (image, dequantisation) pair."""
    return seed * (1 << 40) + repeat * (1 << 32) + index


def nll(network: str, data: str | None = None, num: int = 256, batch: int = 64, seed: int = 0,
        device: str | None = None, estimator: str = "auto", repeats: int = 1, probe: str = "rademacher",
        exact: bool = False, rtol: float = 1e-5, atol: float = 1e-5, t_eps: float = 1e-5,
        progress: bool = False) -> dict[str, dict[str, float]]:
    """Bits/dim of ``num`` images (a seeded random subset of ``data``, default the run's training data).

    Returns ``{"ode": {"mean", "sem", "nfe", "count"}, "vlb": {"mean", "sem", "count"}}`` with the estimators
    asked for (``auto``: both for DDPM runs, the ODE otherwise). A class-conditional model is scored under each
    image's own label.
    """
    from difflab import distributed as dist
    from difflab.data import open_dataset
    from difflab.generate import load_run
    from difflab.methods.gaussian.base import GaussianMethod
    from difflab.rng import StackedRandomGenerator

    if estimator not in ESTIMATORS:
        raise UserError(f"--estimator {estimator!r}: choose one of {', '.join(ESTIMATORS)}")
    num, repeats, batch = (check_value(f, v, min=1) for f, v in (("--num", num), ("--repeats", repeats),
                                                                  ("--batch", batch)))
    seed = check_value("--seed", seed, min=0)
    rtol, atol = (check_value(f, v, float, gt=0) for f, v in (("--rtol", rtol), ("--atol", atol)))
    t_eps = check_value("--t-eps", t_eps, float, gt=0, lt=1)
    if probe not in ("rademacher", "gaussian"):
        raise UserError(f"--probe {probe}: choose one of rademacher, gaussian")
    dev = dist.init(device)
    model, cfg, _ = load_run(network, dev)
    if not isinstance(model, GaussianMethod):
        raise UserError(f"method {cfg.method['name']!r} has no likelihood; bits/dim exist for the Gaussian methods "
                        "(edm, vp, ve, iddpm, ddpm, sde-ve, sde-vp, sde-subvp)")
    has_vlb = hasattr(model, "vlb_bpd")
    wanted = {"auto": ["ode"] + (["vlb"] if has_vlb else []), "ode": ["ode"], "vlb": ["vlb"],
              "both": ["ode", "vlb"]}[estimator]
    if "vlb" in wanted and not has_vlb:
        raise UserError(f"--estimator {estimator}: the variational bound exists for ddpm runs only; "
                        "use --estimator ode")
    conditional = model.label_dim > 0
    data_kwargs = dict(cfg.data)
    if data:
        data_kwargs = {"source": data, "resolution": cfg.image["resolution"], "channels": cfg.image["channels"],
                       "use_labels": conditional}
    ds = open_dataset(**data_kwargs)
    if conditional and not ds.has_labels:
        raise UserError(f"--data {data_kwargs.get('source')}: the model is class-conditional but these images have no "
                        "labels; pass labelled data (dataset.json or class folders)")
    idx = np.random.default_rng(seed).permutation(len(ds))[:num]
    rank, world = dist.rank(), dist.world_size()
    mine = [int(i) for i in idx[rank::world]]
    sums = {k: torch.zeros(4, dtype=torch.float64) for k in wanted}  # sum, sum of squares, count, nfe sum
    bar = dist.progress(len(mine) * repeats, "nll", enabled=progress)
    for start in range(0, len(mine), batch):
        chunk = mine[start:start + batch]
        items = [ds[i] for i in chunk]
        images = torch.from_numpy(np.stack([it[0] for it in items])).to(dev)
        labels = torch.tensor([int(it[1]) for it in items], device=dev) if conditional else None
        for r in range(repeats):
            rng = StackedRandomGenerator(dev, [image_seed(seed, r, i) for i in chunk])
            if "ode" in wanted:
                info: dict[str, Any] = {}
                with model.batch_invariant(16):
                    v = model.ode_bpd(images, rng, class_labels=labels, probe=probe, exact=exact, rtol=rtol,
                                      atol=atol, t_eps=t_eps, info=info).double().cpu()
                sums["ode"] += torch.tensor([v.sum(), (v**2).sum(), len(v), info.get("nfe", 0.0) * len(v)],
                                            dtype=torch.float64)
            if "vlb" in wanted and r == 0:  # the bound draws fresh noise per step; one pass per image
                rng = StackedRandomGenerator(dev, [image_seed(seed, r, i) for i in chunk])
                with torch.no_grad():
                    v = model.vlb_bpd(model.encode(images), rng, class_labels=labels).double().cpu()
                sums["vlb"] += torch.tensor([v.sum(), (v**2).sum(), len(v), 0.0], dtype=torch.float64)
            bar.update(len(chunk))
    bar.close()
    out: dict[str, dict[str, float]] = {}
    for k, s in sums.items():
        s = dist.all_reduce_sum(s.to(dev)).cpu()
        n = max(float(s[2]), 1.0)
        mean = float(s[0] / n)
        var = max(float(s[1] / n) - mean**2, 0.0) * n / max(n - 1, 1)
        out[k] = {"mean": mean, "sem": math.sqrt(var / n), "count": int(s[2])}
        if k == "ode":
            out[k]["nfe"] = float(s[3] / n)
    return out
