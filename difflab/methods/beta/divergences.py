"""Divergences between Beta / Dirichlet laws used by the Beta-diffusion and SDD losses
(specs/beta_sdd.md §5.1, §5.4). All element-wise, closed form, lgamma/digamma only."""

from __future__ import annotations

import torch

from difflab.methods.beta.process import log_gamma
from difflab.rng import StackedRandomGenerator


def kl_gamma(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """``KL(Gamma(a1, 1) || Gamma(a2, 1)) = (a1 - a2) psi(a1) - lnGamma(a1) + lnGamma(a2)`` (§5.1),
    clamped at 0 against round-off."""
    return ((a1 - a2) * torch.digamma(a1) - torch.lgamma(a1) + torch.lgamma(a2)).clamp(min=0)


def kl_beta(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """``KL(Beta(a1, b1) || Beta(a2, b2))`` as a sum of Gamma KLs (§5.1); stable at tiny and huge shapes."""
    kl = kl_gamma(a1, a2) + kl_gamma(b1, b2) - kl_gamma(a1 + b1, a2 + b2)
    return kl.clamp(min=0)


def dirichlet_log_normaliser(theta: torch.Tensor) -> torch.Tensor:
    """``F(theta) = sum_c lnGamma(theta_c) - lnGamma(sum_c theta_c)`` over dim 1, kept as a singleton dim."""
    return torch.lgamma(theta).sum(dim=1, keepdim=True) - torch.lgamma(theta.sum(dim=1, keepdim=True))


def holder_pseudo_divergence(
    a_p: torch.Tensor, a_q: torch.Tensor, gamma: float = 1.8, offset: float = 0.5
) -> torch.Tensor:
    """Symmetrised Hölder pseudo-divergence between Dirichlets over the channel dim (§5.4 item 4).

    ``h(g, g') = F(g a_p + k)/g + F(g' a_q + k)/g' - F(a_p + a_q + k)``, ``HPD = (h(g, g') + h(g', g))/2``
    with ``g' = g/(g - 1)`` and the scalar offset ``k`` (any image size). Non-negative by convexity of
    F, exactly symmetric, and improper: ``HPD(p, p) > 0``. Identically 0 when there is one channel.
    Returns shape ``[N, 1, H, W]``.
    """
    if gamma <= 1:
        raise ValueError("the Hölder exponent must be > 1")
    gamma_c = gamma / (gamma - 1)
    F = dirichlet_log_normaliser
    joint = F(a_p + a_q + offset)

    def h(g: float, gc: float) -> torch.Tensor:
        return (F(g * a_p + offset) / g + F(gc * a_q + offset) / gc) - joint

    return 0.5 * (h(gamma, gamma_c) + h(gamma_c, gamma))


def smoothness(d: torch.Tensor, dim: int) -> torch.Tensor:
    """``S(D) = sum_c (D_{c+1} - D_c)^2`` along ``dim`` (the smoothed-Dirichlet energy, §2)."""
    return torch.diff(d, dim=dim).square().sum(dim=dim)


def penalty_mc(
    rng: StackedRandomGenerator, a: torch.Tensor, samples: int = 100, delta: float = 1e-6,
    temperature: float = 0.02, chunk_elements: int = 1 << 22,
) -> torch.Tensor:
    """Self-normalised Monte-Carlo smoothness penalty per pixel, ``[N, H, W]`` (§5.4 item 3).

    Treats the C channel values of ``a`` (``[N, C, H, W]``) as a Dirichlet concentration, draws
    ``samples`` Dirichlet vectors from ``rng`` (log-space Gammas, softmax over channels) and returns
    ``sum_s w_s S(D_s)`` with ``w ∝ exp(-delta S / temperature)``. No global RNG is touched.
    """
    n, c = a.shape[:2]
    if c < 2:
        return torch.zeros((n,) + tuple(a.shape[2:]), dtype=a.dtype, device=a.device)
    per_sample = a[0].numel()
    step = max(1, min(samples, chunk_elements // max(1, n * per_sample)))
    energies = []
    for start in range(0, samples, step):
        k = min(step, samples - start)
        shape = a.unsqueeze(1).expand(n, k, *a.shape[1:])
        d = torch.softmax(log_gamma(rng, shape, precise=False), dim=2)
        energies.append(smoothness(d, dim=2))
    s = torch.cat(energies, dim=1)
    w = torch.softmax(-delta * s / temperature, dim=1)
    return (w * s).sum(dim=1)


def penalty_expected(a: torch.Tensor) -> torch.Tensor:
    """Closed-form ``E[S(D)]``, ``D ~ Dir(a)`` over dim 1, ``[N, H, W]``: the many-sample limit of
    :func:`penalty_mc` (its tilting weights are within ``delta/temperature`` of uniform)."""
    if a.shape[1] < 2:
        return torch.zeros((a.shape[0],) + tuple(a.shape[2:]), dtype=a.dtype, device=a.device)
    a0 = a.sum(dim=1, keepdim=True)
    m = a / a0
    var = m * (1 - m) / (a0 + 1)
    cov = -m[:, 1:] * m[:, :-1] / (a0 + 1)
    e = var[:, 1:] + var[:, :-1] - 2 * cov + torch.diff(m, dim=1).square()
    return e.sum(dim=1)
