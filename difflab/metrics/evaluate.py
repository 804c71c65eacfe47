"""Library entry points behind ``difflab fid``: make a reference, score a set of images or a network.

Every function here is collective under ``torch.distributed``: each rank extracts its share and all
ranks return the same numbers (issue 3, item 4).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from difflab.distributed import barrier, rank_world
from difflab.errors import UserError
from difflab.metrics.fid import (
    accumulate_features,
    default_detector,
    fid_from_stats,
    inception_score,
    kid_from_features,
    load_ref,
    precision_recall,
    save_ref,
)
from difflab.metrics.sources import (
    FEATURE_CHUNK,
    dataset_stats,
    iter_dataset_batches,
    open_images,
    ref_cache,
    resume_cache,
    select_indices,
    shard,
    unshard,
)
from difflab.metrics.stats import FeatureStats
from difflab.options import check_value
from difflab.runio import check_file_arg, remove_stale_temps

METRICS = ("fid", "kid", "pr", "is")
IMAGES_OF_ONE_SIZE = ("--images needs images of one size: remove the odd ones or resize them all with "
                      "`difflab dataset convert --resolution`")


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    """``"fid,kid"`` -> ``["fid", "kid"]``; unknown names -> UserError."""
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise UserError(f"--metrics {spec!r}: choose from {', '.join(METRICS)} (comma separated)")
    return list(dict.fromkeys(names))


def make_ref(
    data: str | os.PathLike,
    dest: str | os.PathLike,
    detector=None,
    batch: int = 64,
    keep_features: bool = False,
    use_cache: bool = True,
    progress: bool = False,
    resolution: int | None = None,
    nan_to: float | None = None,
    chunk: int = FEATURE_CHUNK,
) -> dict:
    """Reference statistics of every image in ``data`` (resized to ``resolution`` if given) -> ``dest``
    (.npz: mu, sigma[, features]). Resumable: features are cached per chunk of ``chunk`` images
    (:func:`~difflab.metrics.sources.dataset_stats`), so a killed run loses at most one chunk."""
    if not str(dest).endswith(".npz"):
        raise UserError(f"--dest {dest}: the reference file name must end in .npz")
    check_file_arg(dest, "--dest")
    batch = check_value("--batch", batch, min=1)
    detector = default_detector(detector)
    dataset = open_images(data, what="--data", resolution=resolution, nan_to=nan_to)
    indices = np.arange(len(dataset))
    rank, world = rank_world()
    if rank == 0:
        remove_stale_temps(Path(dest).parent, Path(dest).name)  # left by a run killed while writing dest
    cache = ref_cache(detector) if use_cache else None
    stats, feats = dataset_stats(dataset, indices, detector, batch=batch, cache=cache, keep_features=keep_features,
                                 progress=progress, chunk=chunk)
    mu, sigma = stats.mu_sigma()
    extra = {"detector": np.array(detector.name), "num": np.array(len(indices))}
    if keep_features:
        extra["features"] = feats.astype(np.float32)
    if rank == 0:
        save_ref(dest, mu, sigma, **extra)
    barrier()  # the file exists for every rank once make_ref returns
    return {"mu": mu, "sigma": sigma, "num": len(indices)}


def _reference(ref, metrics: Sequence[str], detector) -> tuple[list[str], dict, object]:
    """Validated metric names, reference statistics and detector for :func:`score` and :func:`calc_images`."""
    metrics = parse_metrics(metrics)
    need_feats = "kid" in metrics or "pr" in metrics
    ref_stats = ref if isinstance(ref, dict) else load_ref(ref, with_features=need_feats)
    if need_feats and "features" not in ref_stats:
        raise UserError("kid/pr need reference features; recreate the reference with `difflab fid ref --features`")
    detector = default_detector(detector)
    ref_name = str(ref_stats.get("detector", "")) or None
    if ref_name and ref_name != detector.name:
        raise UserError(f"--ref was computed with detector {ref_name!r} but this run uses {detector.name!r}; "
                        f"pass the matching --resize/--detector or recompute the reference")
    if "is" in metrics and not detector.has_logits:
        detector.logits(None)  # raises the detector's own explanation
    return metrics, ref_stats, detector


def _results(stats: FeatureStats, feats: np.ndarray | None, logits: torch.Tensor | None, ref_stats: dict,
             metrics: Sequence[str], kid_subsets: int, kid_subset_size: int, pr_k: int, seed: int,
             fid_method: str, is_splits: int = 10) -> dict[str, float]:
    """The requested metrics from generated-image statistics (``feats`` and ``logits`` in image order)."""
    results: dict[str, float] = {"num_images": stats.count}
    if "fid" in metrics:
        mu, sigma = stats.mu_sigma()
        results["fid"] = fid_from_stats(mu, sigma, ref_stats["mu"], ref_stats["sigma"], method=fid_method)
    if "kid" in metrics:
        results["kid"], results["kid_std"] = kid_from_features(
            ref_stats["features"], feats, num_subsets=kid_subsets, max_subset_size=kid_subset_size, seed=seed)
    if "pr" in metrics:
        results["precision"], results["recall"] = precision_recall(ref_stats["features"], feats, k=pr_k)
    if "is" in metrics:
        results["is"], results["is_std"] = inception_score(torch.softmax(logits.double(), dim=1), splits=is_splits)
    return results


def image_order(chunks: Sequence[torch.Tensor], order: Sequence[int] | None = None) -> torch.Tensor:
    """Per-rank rows (rank order) -> image order. ``order[j]`` is the image index of gathered row ``j``;
    None means :func:`shard`'s round robin."""
    if order is None:
        return unshard(chunks)
    rows = torch.cat(chunks)
    if sorted(order) != list(range(rows.shape[0])):
        raise ValueError(f"order must be a permutation of {rows.shape[0]} rows")
    out = torch.empty_like(rows)
    out[torch.as_tensor(list(order))] = rows
    return out


def score(
    batches: Iterable[torch.Tensor],
    ref: str | os.PathLike | tuple | dict,
    metrics: Sequence[str] = ("fid",),
    detector=None,
    total: int | None = None,
    progress: bool = False,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    seed: int = 0,
    fid_method: str = "sqrtm",
    order: Sequence[int] | None = None,
    is_splits: int = 10,
) -> dict[str, float]:
    """Score this rank's uint8 NCHW ``batches`` (all ranks together) against ``ref``.

    Returns ``{"fid": .., "kid": .., "kid_std": .., "precision": .., "recall": .., "is": .., "is_std": ..,
    "num_images": ..}`` for the requested metrics. ``order``: the image index of each row of the
    rank-major gathered features (default: ranks hold every ``world``-th image, as :func:`shard` deals
    them); rows are put back in image order, so KID subsets and IS splits do not depend on ``world``.
    ``is``: softmax over the detector's 1008 logits, :func:`inception_score` with ``is_splits`` splits
    in image order.
    """
    metrics, ref_stats, detector = _reference(ref, metrics, detector)
    need_feats = "kid" in metrics or "pr" in metrics
    want_is = "is" in metrics
    logits = FeatureStats(getattr(detector, "logits_dim", 1), keep_features=True)

    def feature_fn(x: torch.Tensor) -> torch.Tensor:
        feats = detector.features(x)
        if want_is:  # the head is linear on pool3: one Inception pass serves FID and IS
            logits.update(detector.logits_from_features(feats))
        return feats

    stats = accumulate_features(batches, feature_fn, ref_stats["mu"].shape[0], keep_features=need_feats,
                                total=total, progress=progress)
    feats = image_order(stats.features_per_rank(), order).numpy() if need_feats else None
    all_logits = None
    if want_is:
        logits.all_reduce()
        all_logits = image_order(logits.features_per_rank(), order)
    return _results(stats, feats, all_logits, ref_stats, metrics, kid_subsets, kid_subset_size, pr_k, seed,
                    fid_method, is_splits)


def calc_images(
    images: str | os.PathLike,
    ref: str | os.PathLike | tuple | dict,
    metrics: Sequence[str] = ("fid",),
    num: int | None = 50000,
    seed: int = 0,
    batch: int = 64,
    detector=None,
    progress: bool = False,
    use_cache: bool = True,
    chunk: int = FEATURE_CHUNK,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    fid_method: str = "sqrtm",
    is_splits: int = 10,
) -> dict[str, float]:
    """Score ``num`` images of a folder/zip/NPZ (a seeded subset when there are more) against ``ref``.

    Resumable: finished chunks of features are kept in :func:`~difflab.metrics.sources.resume_cache`
    until the run completes (``use_cache=False`` keeps nothing). Inception Score needs logits, which
    the streaming :func:`score` collects, so ``"is"`` takes that path instead.
    """
    batch = check_value("--batch", batch, min=1)
    metrics, ref_stats, detector = _reference(ref, metrics, detector)
    what = f"--images {images}"
    dataset = open_images(images, what="--images", mixed_sizes_fix=IMAGES_OF_ONE_SIZE)
    indices = select_indices(len(dataset), num, seed, what=what)
    kw = dict(kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, pr_k=pr_k, seed=seed, fid_method=fid_method)
    if "is" in metrics:
        mine = shard(indices)
        return score(iter_dataset_batches(dataset, mine, batch, what=what), ref_stats, metrics, detector=detector,
                     total=len(mine), progress=progress, is_splits=is_splits, **kw)
    cache = resume_cache(detector) if use_cache else None
    stats, feats = dataset_stats(dataset, indices, detector, batch=batch, cache=cache,
                                 keep_features="kid" in metrics or "pr" in metrics, progress=progress, what=what,
                                 chunk=chunk)
    results = _results(stats, feats, None, ref_stats, metrics, **kw)
    if cache is not None:
        cache.discard_used()  # finished: the resume points are no longer needed
    return results


def calc_network(
    network: str | os.PathLike,
    ref: str | os.PathLike | tuple | dict,
    seeds: Sequence[int],
    metrics: Sequence[str] = ("fid",),
    batch: int = 64,
    detector=None,
    progress: bool = False,
    sampler_overrides: dict | None = None,
    device: str | None = None,
    flags: dict[str, str] | None = None,
    compile: bool = False,
    **score_kwargs,
) -> dict[str, float]:
    """Generate the images of ``seeds`` with ``network`` (a run dir or checkpoint) and score them in one
    pass, without writing PNGs. Each rank generates its share of the seeds; the sampler overrides are checked
    first (:func:`difflab.generate.check_sampler_options`; ``flags`` names them as typed). ``compile``:
    :func:`difflab.generate.compile_backbone`."""
    import difflab.generate as gen

    seeds = gen.check_seeds(seeds)
    batch = check_value("--gen-batch", batch, min=1)
    model, cfg, _ = gen.load_run(network, device=device)
    if compile:
        gen.compile_backbone(model)
    overrides = gen.check_sampler_options(model, cfg.sampler, sampler_overrides or {}, flags)
    sampler_kwargs = gen.sampler_kwargs(model, cfg.sampler, overrides)  # the run's defaults, then overrides
    return calc_model(model, ref, seeds, metrics=metrics, batch=batch, detector=detector, progress=progress,
                      sampler_kwargs=sampler_kwargs, device=device, **score_kwargs)


def calc_model(
    model,
    ref: str | os.PathLike | tuple | dict,
    seeds: Sequence[int],
    metrics: Sequence[str] = ("fid",),
    batch: int = 64,
    detector=None,
    progress: bool = False,
    sampler_kwargs: dict | None = None,
    device: str | None = None,
    **score_kwargs,
) -> dict[str, float]:
    """Score the samples of an in-memory ``Method`` (e.g. the EMA model inside the training loop) for
    ``seeds``; every rank generates and extracts its share. No PNG is written."""
    import difflab.generate as gen

    rank, world = rank_world()
    mine = [s for b in gen.rank_batches(seeds, batch, rank, world) for s in b]
    batches = (images for _, images in gen.generate_batches(model, seeds, batch, sampler_kwargs or {}, device,
                                                             rank, world, progress=False))
    # generate_batches deals whole batches to ranks, not single seeds: gathered rows are in this order
    order = [i for r in range(world) for b in gen.rank_batches(range(len(seeds)), batch, r, world) for i in b]
    return score(batches, ref, metrics, detector=detector, total=len(mine), progress=progress, order=order,
                 **score_kwargs)


PAIR_METRICS = ("psnr", "ssim", "lpips")


def pair_metrics(
    a: str | os.PathLike,
    b: str | os.PathLike,
    metrics: str | Sequence[str] = PAIR_METRICS,
    batch: int = 16,
    lpips_net: str = "alex",
    lpips_weights: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and LPIPS between image ``k`` of ``a`` and image ``k`` of ``b``."""
    from difflab.metrics.image_metrics import psnr, ssim

    names = [s.strip().lower() for s in (metrics.split(",") if isinstance(metrics, str) else metrics) if s.strip()]
    bad = [n for n in names if n not in PAIR_METRICS]
    if bad or not names:
        raise UserError(f"--metrics {metrics!r}: choose from {', '.join(PAIR_METRICS)} (comma separated)")
    batch = check_value("--batch", batch, min=1)
    set_a, set_b = open_images(a, what="--a"), open_images(b, what="--b")
    if len(set_a) != len(set_b):
        raise UserError(f"--a {a} has {len(set_a)} images but --b {b} has {len(set_b)}; pairs need equal counts")
    lpips_model = None
    if "lpips" in names:
        from difflab.nets.lpips import LPIPS, uint8_to_lpips_range

        lpips_model = LPIPS(lpips_net, lpips_weights)
    sums = dict.fromkeys(names, 0.0)
    indices = np.arange(len(set_a))
    for xa, xb in zip(iter_dataset_batches(set_a, indices, batch, what=f"--a {a}"),
                      iter_dataset_batches(set_b, indices, batch, what=f"--b {b}")):
        if xa.shape != xb.shape:
            raise UserError(f"--a/--b: image shapes differ ({list(xa.shape[1:])} vs {list(xb.shape[1:])})")
        if "psnr" in names:
            sums["psnr"] += float(psnr(xa, xb).clamp(max=1e3).sum())  # identical pairs count as 1000 dB
        if "ssim" in names:
            sums["ssim"] += float(ssim(xa, xb).sum())
        if lpips_model is not None:
            with torch.no_grad():
                sums["lpips"] += float(lpips_model(uint8_to_lpips_range(xa), uint8_to_lpips_range(xb)).sum())
    return {k: v / len(indices) for k, v in sums.items()} | {"num_images": len(indices)}
