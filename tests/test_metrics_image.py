"""PSNR and SSIM against closed forms and a window-by-window oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.metrics.image_metrics import psnr, ssim


def test_psnr_closed_form_and_identity():
    a = torch.randint(0, 200, (2, 3, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    b = a + 5  # uniform offset: MSE = 25
    assert torch.allclose(psnr(a, b), torch.full((2,), 10 * math.log10(255**2 / 25), dtype=torch.float64))
    assert torch.isinf(psnr(a, a)).all()
    assert psnr(a.float() / 255, b.float() / 255, data_range=1.0)[0] == pytest.approx(10 * math.log10(255**2 / 25))


def test_ssim_of_constant_images_is_the_luminance_term():
    # Constant images have zero variance and covariance: SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, L = 100.0, 140.0, 255.0
    c1 = (0.01 * L) ** 2
    x, y = torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b)
    assert ssim(x, y)[0] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-10)


def ssim_oracle(x: np.ndarray, y: np.ndarray, L: float = 255.0) -> float:
    """Wang et al. 2004 written per window position with an explicit 11x11 Gaussian (sigma 1.5)."""
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_window_oracle_and_is_one_for_identical():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (15, 14))
    y = np.clip(x + rng.normal(0, 30, x.shape), 0, 255)
    ours = ssim(torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None])[0]
    assert float(ours) == pytest.approx(ssim_oracle(x, y), rel=1e-9)
    assert float(ssim(torch.from_numpy(x)[None, None], torch.from_numpy(x)[None, None])[0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ssim(torch.zeros(1, 1, 12, 12), torch.zeros(1, 1, 12, 13))
