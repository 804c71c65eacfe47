"""Where evaluated images come from: datasets (folder, zip, NPZ via ``difflab.data``), seeded subsets,
per-rank shards, and the content-hash cache of reference features (issue 3, item 2).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from difflab.errors import UserError
from difflab.metrics.fid import FeatureStats, _dist_info, accumulate_features
from difflab.metrics.inception import cache_dir


def open_images(source: str | os.PathLike, what: str = "--images", resolution: int | None = None):
    """Open any source ``difflab.data.open_dataset`` accepts (folders, zips, NPZ, ``digits``, ...),
    optionally resized to ``resolution``; an empty source is an error."""
    from difflab.data import open_dataset

    if not os.path.exists(source) and str(source) != "digits":
        raise UserError(f"{what} {source}: no such file or directory")
    dataset = open_dataset(str(source), resolution=resolution, use_labels=False)
    if len(dataset) == 0:
        raise UserError(f"{what} {source}: contains no images")
    return dataset


def select_indices(n: int, num: int | None, seed: int = 0, what: str = "--images") -> np.ndarray:
    """EDM's rule: all images if ``num`` is None; fewer than ``num`` is an error; more -> a subset of
    ``num`` chosen by ``seed`` (kept in index order)."""
    if num is None or num == n:
        return np.arange(n)
    if num < 1:
        raise UserError(f"--num {num}: must be at least 1")
    if n < num:
        raise UserError(f"{what}: found {n} images but --num {num} were requested; pass --num {n} or add images")
    return np.sort(np.random.default_rng(seed).choice(n, num, replace=False))


def shard(items: Sequence | np.ndarray, rank: int | None = None, world: int | None = None):
    """This rank's share: every ``world``-th item starting at ``rank`` (round robin keeps shares even)."""
    if rank is None or world is None:
        rank, world = _dist_info()
    return items[rank::world]


def unshard(chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard` for per-rank results gathered in rank order: back to index order."""
    world = len(chunks)
    total = sum(c.shape[0] for c in chunks)
    out = torch.empty((total, *chunks[0].shape[1:]), dtype=chunks[0].dtype)
    for r, c in enumerate(chunks):
        out[r::world] = c
    return out


def iter_dataset_batches(dataset, indices: Sequence[int], batch: int, what: str = "--images") -> Iterator[torch.Tensor]:
    """Yield uint8 NCHW tensors of ``dataset[i][0]`` for ``indices``; mixed sizes -> UserError."""
    shape = None
    for start in range(0, len(indices), batch):
        images = []
        for i in indices[start : start + batch]:
            img = np.asarray(dataset[int(i)][0])
            if img.dtype != np.uint8 or img.ndim != 3:
                raise UserError(f"{what}: item {int(i)} is {img.dtype} {list(img.shape)}, expected uint8 [C,H,W]")
            if shape is None:
                shape = img.shape
            elif img.shape != shape:
                raise UserError(f"{what}: images of mixed sizes ({list(shape)} and {list(img.shape)} at item "
                                f"{int(i)}); convert them to one size with `difflab dataset --resolution`")
            images.append(img)
        yield torch.from_numpy(np.stack(images))


def content_hash(dataset, indices: Sequence[int]) -> str:
    """sha256 over the shapes and pixels of the selected images, in order."""
    h = hashlib.sha256()
    for i in indices:
        img = np.ascontiguousarray(dataset[int(i)][0])
        h.update(str(img.shape).encode())
        h.update(img.tobytes())
    return h.hexdigest()


def features_cache_path(digest: str, detector_name: str) -> Path:
    tag = hashlib.sha256(detector_name.encode()).hexdigest()[:12]
    return cache_dir() / "features" / f"{digest[:40]}-{tag}.npy"


def dataset_features(
    dataset,
    indices: Sequence[int],
    detector,
    batch: int = 64,
    use_cache: bool = True,
    progress: bool = False,
    what: str = "--data",
) -> np.ndarray:
    """Features ``[len(indices), D]`` in index order; every rank extracts its share, every rank gets all.

    Cached under ``~/.cache/difflab/features`` by the images' content hash and the detector's name.
    """
    rank, world = _dist_info()
    path = None
    if use_cache:
        path = features_cache_path(content_hash(dataset, indices), detector.name)
        if path.is_file():
            cached = np.load(path, allow_pickle=False)
            if cached.shape == (len(indices), detector.feature_dim):
                return cached
    mine = shard(np.asarray(indices), rank, world)
    stats = accumulate_features(iter_dataset_batches(dataset, mine, batch, what), detector.features,
                                detector.feature_dim, keep_features=True, total=len(mine), progress=progress)
    feats = unshard(stats.features_per_rank()).numpy()
    if path is not None and rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npy")
        np.save(tmp, feats)
        os.replace(tmp, path)
    return feats


def stats_from_features(feats: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """mu, sigma of a feature matrix with the same float64-sum arithmetic as streaming extraction."""
    feats = torch.as_tensor(np.asarray(feats))
    stats = FeatureStats(feats.shape[1])
    stats.update(feats)
    return stats.mu_sigma()
