"""Image-pair metrics: PSNR and SSIM (Wang et al. 2004) on image tensors [N,C,H,W].

Both take ``data_range`` (255 for uint8 pixels, 2 for [-1, 1], 1 for [0, 1]) and return one value per
image pair, computed in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two [N,C,H,W] tensors of one shape, got {list(a.shape)} and {list(b.shape)}")
    return a.to(torch.float64), b.to(torch.float64)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` per image, in dB (inf if equal)."""
    a, b = _pair(a, b)
    mse = (a - b).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 255.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity per image: mean over the valid area and channels of
    ``(2 mu_a mu_b + C1)(2 cov + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))`` with an 11x11
    Gaussian window (sigma 1.5), ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2`` (Wang et al. 2004).
    """
    a, b = _pair(a, b)
    n, c, h, w = a.shape
    size = min(window_size, h, w)
    g = _gaussian_window(size, sigma, a.dtype, a.device)
    kernel_h = g.view(1, 1, size, 1).expand(c, 1, size, 1)
    kernel_w = g.view(1, 1, 1, size).expand(c, 1, 1, size)

    def blur(x: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid padding, per channel
        return F.conv2d(F.conv2d(x, kernel_h, groups=c), kernel_w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
