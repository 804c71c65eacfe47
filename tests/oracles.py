"""Closed-form denoisers (specs/gaussian_and_dddm.md §7) shared by the sampler tests."""

from __future__ import annotations

import torch


def gaussian_denoiser(mu: torch.Tensor, s: float):
    """E[x0 | x0 + sigma n] for x0 ~ N(mu, s^2 I) (VE form, a = 1)."""

    def D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = _per_row(sigma, x)
        return mu.to(x.dtype) + s**2 / (s**2 + sigma**2) * (x - mu.to(x.dtype))

    return D


def _per_row(sigma, x: torch.Tensor) -> torch.Tensor:
    """A scalar sigma, or one per row of ``x`` (as difflab's samplers and the likelihood pass it)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim == 1 and sigma.numel() == x.shape[0] else sigma


def finite_denoiser(points: torch.Tensor, weights: torch.Tensor | None = None):
    """Posterior mean of a finite dataset ``points`` [K, ...] (§7 B, a = 1)."""
    K = points.shape[0]
    logpi = torch.zeros(K, dtype=torch.float64) if weights is None else weights.log().to(torch.float64)

    def D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        pts = points.to(x.dtype).reshape(1, K, -1)
        d2 = ((x.reshape(x.shape[0], 1, -1) - pts) ** 2).sum(-1)
        sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) if torch.as_tensor(sigma).ndim else sigma
        w = torch.softmax(logpi.to(x.dtype) - d2 / (2 * torch.as_tensor(sig, dtype=x.dtype) ** 2), dim=1)
        return (w @ pts.squeeze(0)).reshape(x.shape)

    return D
