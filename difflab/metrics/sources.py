"""Where evaluated images come from: datasets (folder, zip, NPZ via ``difflab.data``), seeded subsets,
per-rank shards, and chunked feature extraction with a content-addressed, checksummed cache that makes
``fid ref`` / ``fid calc`` resumable (docs/evaluation.md "Feature cache").
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from difflab.distributed import progress as progress_bar
from difflab.distributed import rank_world
from difflab.errors import UserError, warn
from difflab.metrics.inception import cache_dir
from difflab.metrics.stats import FeatureStats
from difflab.runio import atomic_write_bytes, npz_bytes, remove_stale_temps


def open_images(source: str | os.PathLike, what: str = "--images", resolution: int | None = None,
                nan_to: float | None = None, mixed_sizes_fix: str | None = None):
    """Open any source ``difflab.data.open_dataset`` accepts (folders, zips, NPZ, ``digits``, ...),
    optionally resized to ``resolution``; an empty source is an error, and so are images of different
    sizes without ``resolution`` (``mixed_sizes_fix`` says what to do). In a ``difflab generate`` folder
    the montage ``grid.png`` is not one of the images."""
    from difflab.data import open_source
    from difflab.data.datasets import ImageDataset

    if not os.path.exists(source) and str(source) != "digits":
        raise UserError(f"{what} {source}: no such file or directory")
    src = open_source(str(source), use_labels=False, nan_to=nan_to)
    if resolution is None:
        src.uniform_shape(fix=mixed_sizes_fix)
    dataset = ImageDataset(src, size=None if resolution is None else (resolution, resolution), use_labels=False)
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
        rank, world = rank_world()
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


FEATURE_CHUNK = 512  # images per cache entry: the most extraction work a killed run can lose


class FeatureCache:
    """Detector features on disk, one checksummed ``.npz`` per chunk of images, addressed by a sha256 of
    the chunk's pixels and the detector (docs/evaluation.md "Feature cache"). Entries are written
    atomically (temp file, fsync, rename); a damaged entry is rebuilt with a one-line warning."""

    def __init__(self, folder: str | os.PathLike, detector):
        self.folder = Path(folder)
        self.detector_id = getattr(detector, "cache_id", None) or detector.name
        self.used: list[str] = []
        remove_stale_temps(self.folder, "*.npz", older_than=3600)  # spare a concurrent writer's temp files

    def key(self, images: torch.Tensor) -> str:
        h = hashlib.sha256(f"difflab-features-1|{self.detector_id}|{list(images.shape)}|".encode())
        h.update(np.ascontiguousarray(images.numpy()).tobytes())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / f"{key[:40]}.npz"

    def load(self, key: str, shape: tuple[int, int]) -> np.ndarray | None:
        """The stored features, or None when absent; a torn, foreign or corrupted entry is deleted."""
        path = self.path(key)
        self.used.append(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                feats, stored_key, digest = z["features"], str(z["key"]), str(z["sha256"])
            problem = ("holds another chunk" if stored_key != key
                       else f"has shape {feats.shape}" if feats.shape != shape or feats.dtype != np.float32
                       else "fails its checksum" if hashlib.sha256(feats.tobytes()).hexdigest() != digest
                       else None)
        except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, it gets rebuilt
            problem = f"is unreadable ({e.__class__.__name__})"
        if problem is None:
            return feats
        warn(f"feature cache entry {path} {problem}; recomputing it")
        path.unlink(missing_ok=True)
        return None

    def save(self, key: str, feats: np.ndarray) -> None:
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        digest = hashlib.sha256(feats.tobytes()).hexdigest()
        atomic_write_bytes(self.path(key), npz_bytes(features=feats, key=np.array(key), sha256=np.array(digest)))

    def discard_used(self) -> None:
        """Delete the entries this process read or wrote (a finished run's resume points)."""
        for key in self.used:
            self.path(key).unlink(missing_ok=True)
        self.used = []


def ref_cache(detector) -> FeatureCache:
    """The lasting cache of reference features (``fid ref``, the in-training FID's training-set features)."""
    return FeatureCache(cache_dir() / "features", detector)


def resume_cache(detector) -> FeatureCache:
    """Resume points of ``fid calc --images``: kept while a run is incomplete, deleted when it finishes."""
    return FeatureCache(cache_dir() / "features" / "resume", detector)


def dataset_stats(
    dataset,
    indices: Sequence[int],
    detector,
    batch: int = 64,
    cache: FeatureCache | None = None,
    keep_features: bool = False,
    progress: bool = False,
    what: str = "--data",
    chunk: int = FEATURE_CHUNK,
) -> tuple[FeatureStats, np.ndarray | None]:
    """Feature statistics of ``dataset[indices]`` and, with ``keep_features``, the features in index order.

    The indices are cut into chunks of ``chunk`` images; rank ``r`` extracts chunks ``r, r + world, ...``
    in batches of ``batch``, so a chunk's features do not depend on the number of ranks. With a
    ``cache``, finished chunks are stored and found again by content: a killed run resumes from its
    last finished chunk and ends with the statistics an uninterrupted run gets. Collective.
    """
    rank, world = rank_world()
    indices = np.asarray(indices)
    chunks = [indices[i : i + chunk] for i in range(0, len(indices), chunk)]
    mine = chunks[rank::world]
    dim = detector.feature_dim
    stats = FeatureStats(dim, keep_features=keep_features)
    bar = progress_bar(sum(len(c) for c in mine), "features", enabled=progress)
    shape = None
    for idx in mine:
        images = next(iter_dataset_batches(dataset, idx, len(idx), what))
        if shape is None:
            shape = images.shape[1:]
        elif images.shape[1:] != shape:
            raise UserError(f"{what}: images of mixed sizes ({list(shape)} and {list(images.shape[1:])}); "
                            "convert them to one size with `difflab dataset convert --resolution`")
        key = cache.key(images) if cache is not None else None
        feats = cache.load(key, (len(idx), dim)) if cache is not None else None
        if feats is None:
            feats = torch.cat([detector.features(images[j : j + batch]).float().cpu()
                               for j in range(0, len(idx), batch)]).numpy()
            if cache is not None:
                cache.save(key, feats)
        stats.update(torch.from_numpy(feats))
        bar.update(len(idx))
    bar.close()
    stats.all_reduce()
    if not keep_features:
        return stats, None
    # rank r holds chunks r, r + world, ... in that order: deal them back into index order
    per_rank = [list(t.split([len(c) for c in chunks[r::world]])) for r, t in enumerate(stats.features_per_rank())]
    ordered = [per_rank[k % world][k // world] for k in range(len(chunks))]
    return stats, (torch.cat(ordered).numpy() if ordered else np.zeros((0, dim), np.float32))


def stats_from_features(feats: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """mu, sigma of a feature matrix with the same float64-sum arithmetic as streaming extraction."""
    feats = torch.as_tensor(np.asarray(feats))
    stats = FeatureStats(feats.shape[1])
    stats.update(feats)
    return stats.mu_sigma()
