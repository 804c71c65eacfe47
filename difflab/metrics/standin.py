"""A tiny deterministic feature detector for tests and smoke runs (numbers NOT comparable to FID).

Same interface as :class:`difflab.metrics.inception.InceptionDetector` (``features``, ``feature_dim``,
``name``, ``has_logits``) but thousands of times faster: images are average-pooled to 8x8, projected
by a fixed random matrix and squashed by ``tanh``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difflab.metrics.inception import check_images


class PixelProjectionDetector:
    """``features(uint8 NCHW) -> float32 [N, dim]``: tanh of a seeded random projection of 8x8 pools."""

    has_logits = False

    def __init__(self, dim: int = 64, seed: int = 0, pool: int = 8):
        self.feature_dim = int(dim)
        self.pool = int(pool)
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(3 * pool * pool, dim, generator=g, dtype=torch.float64) / (3 * pool * pool) ** 0.5
        self.name = f"pixel-projection-{dim}-{seed}-{pool}"

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        x = images.to(torch.float64) / 127.5 - 1
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.adaptive_avg_pool2d(x, self.pool).flatten(1)
        return torch.tanh(2 * x @ self.weight).float()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        from difflab.errors import UserError

        raise UserError("the pixel-projection stand-in detector has no logits; Inception Score is unavailable")
