"""Feature statistics as sums: ``sum x``, ``sum x x^T`` and the count in float64, which every rank accumulates
for its share and :meth:`FeatureStats.all_reduce` combines (the torchmetrics pattern, STYLE.md). Used by
:mod:`difflab.metrics.sources` (extraction) and :mod:`difflab.metrics.fid` (the metrics)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from difflab.distributed import collective_device, rank_world
from difflab.errors import UserError


class FeatureStats:
    """Running float64 sums of features: ``sum x``, ``sum x x^T`` and the count.

    ``keep_features=True`` also keeps the raw features (needed by KID and precision/recall);
    :meth:`all_reduce` then gathers them from every rank in rank order.
    """

    def __init__(self, dim: int, keep_features: bool = False):
        self.dim = int(dim)
        self.count = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        self.keep_features = keep_features
        self._features: list[torch.Tensor] = []
        self._rank_sizes: list[int] | None = None  # set by all_reduce when features are gathered

    def update(self, feats: torch.Tensor) -> None:
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got {list(feats.shape)}")
        x = feats.detach().to(device="cpu", dtype=torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x
        if self.keep_features:
            self._features.append(feats.detach().to(device="cpu", dtype=torch.float32))

    def all_reduce(self) -> FeatureStats:
        """Sum the statistics over all ranks (no-op without an initialised process group). In place."""
        _, world = rank_world()
        if world == 1:
            return self
        dev = collective_device()  # the sums stay on CPU between collectives
        reduced = []
        for t in (torch.tensor([self.count], dtype=torch.float64), self.sum, self.sum_outer):
            t = t.to(dev)
            dist.all_reduce(t)
            reduced.append(t.cpu())
        count, self.sum, self.sum_outer = reduced
        self.count = int(count.item())
        if self.keep_features:
            local = self.features()
            sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.int64, device=dev))
            sizes = [int(s.item()) for s in sizes]
            padded = torch.zeros(max(sizes), self.dim, dtype=torch.float32, device=dev)
            padded[: local.shape[0]] = local.to(dev)
            chunks = [torch.zeros_like(padded) for _ in range(world)]
            dist.all_gather(chunks, padded)
            self._features = [c[:n].cpu() for c, n in zip(chunks, sizes)]
            self._rank_sizes = sizes
        return self

    def features_per_rank(self) -> list[torch.Tensor]:
        """Kept features split by the rank that extracted them (one chunk without a process group)."""
        feats = self.features()
        return list(feats.split(self._rank_sizes)) if self._rank_sizes else [feats]

    def features(self) -> torch.Tensor:
        if not self.keep_features:
            raise ValueError("FeatureStats was created with keep_features=False")
        if not self._features:
            return torch.zeros(0, self.dim)
        return torch.cat(self._features)

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance in float64."""
        if self.count < 2:
            raise UserError(f"need at least 2 images for mean/covariance statistics, got {self.count}")
        n = self.count
        mu = self.sum / n
        sigma = (self.sum_outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.numpy(), sigma.numpy()
