"""Generation from a run: per-seed noise, batching across ranks, PNG/NPZ output and montages
(DESIGN.md "Seeds", "Run directory"; EDM's generate.py conventions, specs/gaussian_and_dddm.md §5.7).

An image depends on its seed alone: every draw comes from the seed's own generator, and the backbone
runs in fixed chunks of ``net_batch`` rows (:meth:`Method.batch_invariant`), so ``--batch`` and the
number of ranks never change a pixel.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab.build import build_model
from difflab.config import RunConfig
from difflab.errors import UserError
from difflab.methods.base import Method
from difflab.rng import StackedRandomGenerator
from difflab.train import checkpoint as ck
from difflab.train import distributed as dist
from difflab.utils import atomic_write_bytes, fp32_precision, make_grid, resolve_device, save_png

NET_BATCH = 16


def load_run(network: str | Path, device: str | torch.device | None = None, which: str = "ema"
             ) -> tuple[Method, RunConfig, dict[str, Any]]:
    """A run directory (latest checkpoint) or a checkpoint file -> (model in eval mode, config, metadata)."""
    json_path = ck.resolve_checkpoint(network)
    opts_path = json_path.parent / "training_options.json"
    cfg = RunConfig.load(opts_path)
    model = build_model(cfg)
    meta, tensors = ck.read_checkpoint(json_path)
    prefix = which if any(k.startswith(which + ".") for k in tensors) else "model"
    ck.load_module(model, tensors, prefix, str(json_path))
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return model.to(dev).eval().requires_grad_(False), cfg, meta


def rank_batches(seeds: Sequence[int], batch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Split seeds into batches of at most ``batch`` and deal them to ranks round-robin."""
    if batch < 1:
        raise UserError(f"--batch {batch}: must be at least 1")
    seeds = list(seeds)
    num = max((len(seeds) + batch * world - 1) // (batch * world) * world, 1)
    chunks = np.array_split(np.asarray(seeds, dtype=np.int64), num)
    return [c.tolist() for c in chunks[rank::world] if len(c)]


def generate_batches(model: Method, seeds: Sequence[int], batch: int = 64, sampler_kwargs: dict | None = None,
                     device: str | torch.device | None = None, rank: int = 0, world: int = 1,
                     class_idx: int | None = None, net_batch: int = NET_BATCH, progress: bool = True,
                     tf32: bool = False, info: dict | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(seeds, uint8 images [n,C,H,W])`` for this rank's share of ``seeds`` (TF32 off unless ``tf32``).
    ``info["nfe"]`` collects the network evaluations per image that adaptive samplers report."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    kw = dict(sampler_kwargs or {})
    if class_idx is not None:
        if model.label_dim == 0:
            raise UserError("--class: this model is unconditional; drop --class")
        if not 0 <= class_idx < model.label_dim:
            raise UserError(f"--class {class_idx}: must be in 0..{model.label_dim - 1}")
    mine = rank_batches(seeds, batch, rank, world)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(b) for b in mine), unit="img", desc="generate", dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        for batch_seeds in mine:
            rng = StackedRandomGenerator(dev, batch_seeds)
            labels = None if class_idx is None else torch.full((len(batch_seeds),), class_idx, device=dev)
            extra = {"info": {}} if info is not None and "info" in inspect.signature(model.sample).parameters else {}
            with torch.no_grad(), model.batch_invariant(net_batch), fp32_precision(tf32):
                x = model.sample(rng, class_labels=labels, **kw, **extra)
            if extra.get("info", {}).get("nfe") is not None:
                info.setdefault("nfe", []).append(extra["info"]["nfe"])
            if bar is not None:
                bar.update(len(batch_seeds))
            yield batch_seeds, model.decode(x).cpu()
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()


def generate(network: str | Path, seeds: Sequence[int], outdir: str | Path, batch: int = 64,
             subdirs: bool = False, class_idx: int | None = None, npz: bool = False, grid: bool = True,
             device: str | None = None, net_batch: int = NET_BATCH, progress: bool = True,
             tf32: bool = False, **sampler_overrides: Any) -> Path:
    """Write ``{seed:06d}.png`` (or ``images.npz``) plus a montage ``grid.png`` for ``seeds`` into ``outdir``.

    Sampler settings default to the run's ``sampler`` section; ``sampler_overrides`` (``sampler``,
    ``steps``, ``S_churn``, ...) replace them. Seeds are split across ranks under torchrun.
    """
    dev = resolve_device(device)
    dist.init(dev)
    rank, world = dist.rank(), dist.world_size()
    model, cfg, _ = load_run(network, dev)
    kw = dict(cfg.sampler)
    kw.update({k: v for k, v in sampler_overrides.items() if v is not None})
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    collected: list[tuple[int, np.ndarray]] = []
    stats: dict[str, Any] = {}
    for batch_seeds, images in generate_batches(model, seeds, batch, kw, dev, rank, world, class_idx, net_batch,
                                                progress, tf32, info=stats):
        for seed, img in zip(batch_seeds, images.numpy()):
            if npz:
                collected.append((seed, img))
            else:
                folder = outdir / f"{seed - seed % 1000:06d}" if subdirs else outdir
                save_png(folder / f"{seed:06d}.png", img)
    if npz:
        gathered = [collected]
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, collected)
        if rank == 0:
            items = sorted(x for part in gathered for x in part)
            arr = np.stack([img.transpose(1, 2, 0) for _, img in items])  # NHWC uint8 like DDDM/improved-diffusion
            import io

            buf = io.BytesIO()
            np.savez(buf, images=arr, seeds=np.asarray([s for s, _ in items]))
            atomic_write_bytes(outdir / "images.npz", buf.getvalue())
            collected = items
    dist.barrier()
    if grid and rank == 0:
        first = list(seeds)[:64]
        if npz:
            lookup = dict(collected)
            imgs = [lookup[s] for s in first]
        else:
            from PIL import Image

            imgs = []
            for s in first:
                folder = outdir / f"{s - s % 1000:06d}" if subdirs else outdir
                a = np.asarray(Image.open(folder / f"{s:06d}.png"))
                imgs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        save_png(outdir / "grid.png", make_grid(np.stack(imgs)))
    if stats.get("nfe") and rank == 0:
        print(f"mean NFE per image: {float(np.mean(stats['nfe'])):.1f}")
    return outdir
