"""Preconditioners of the EDM family: ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)``.

Each class maps one-to-one to a row of specs/gaussian_and_dddm.md §5.1. ``coefficients(sigma)`` returns
``(c_skip, c_out, c_in, c_noise)`` broadcastable against ``sigma``; the method applies them to the backbone.
The training-sigma distributions and loss weights of §5.2 live beside them because each preconditioner
is trained with its own loss.
"""

from __future__ import annotations

import math

import torch

from difflab.methods.gaussian.sde import VPSDE, _t

Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class VPPrecond:
    """Variance preserving (§5.1 row VPPrecond; §5.2 VPLoss) on the VP process of :class:`VPSDE`."""

    name = "vp"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5):
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sde = VPSDE(beta_min, beta_min + beta_d)
        self.sde.t_train_eps = epsilon_t
        self.sigma, self.sigma_inv = self.sde.sigma, self.sde.sigma_inv
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1.0))

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise

    def train_sigma(self, u: torch.Tensor) -> torch.Tensor:
        """u ~ U(0,1) -> sigma: t = 1 + u (eps_t - 1), sigma = sigma_vp(t)."""
        return self.sigma(1 + u * (self.epsilon_t - 1))

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma**2

    def round_sigma(self, sigma):
        return _t(sigma)


class VEPrecond:
    """Variance exploding (§5.1 row VEPrecond; §5.2 VELoss)."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()

    def train_sigma(self, u: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma**2

    def round_sigma(self, sigma):
        return _t(sigma)


class IDDPMPrecond:
    """Improved DDPM (§5.1 row iDDPMPrecond): sigma snapped to the u_j table of the cosine schedule.

    The backbone has 2C outputs (learned variance); only the first C are used. Trained with the VP loss
    weighting 1/sigma^2 on sigmas drawn uniformly from the table (our choice; EDM ships no iDDPM loss).
    """

    name = "iddpm"

    def __init__(self, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000):
        self.C_1, self.C_2, self.M = C_1, C_2, M
        u = torch.zeros(M + 1, dtype=torch.float64)
        for j in range(M, 0, -1):  # u_M = 0; u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1)/abar(j), C_1) - 1)
            ratio = self.alpha_bar(j - 1) / self.alpha_bar(j)
            u[j - 1] = ((u[j] ** 2 + 1) / max(ratio, C_1) - 1).sqrt()
        self.u = u
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def alpha_bar(self, j: int) -> float:
        return math.sin(0.5 * math.pi * j / self.M / (self.C_2 + 1)) ** 2

    def index(self, sigma: torch.Tensor) -> torch.Tensor:
        """j(sigma): index of the nearest table entry."""
        u = self.u.to(sigma.device, torch.float64)
        return (sigma.to(torch.float64).reshape(-1, 1) - u.reshape(1, -1)).abs().argmin(1).reshape(sigma.shape)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        c_noise = (self.M - 1 - self.index(sigma)).to(sigma.dtype)
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), c_noise

    def round_sigma(self, sigma):
        sigma = _t(sigma)
        return self.u.to(sigma.device)[self.index(sigma)].to(sigma.dtype)

    def train_sigma(self, u: torch.Tensor) -> torch.Tensor:
        j = (u * self.M).floor().clamp(0, self.M - 1).long()
        return self.u.to(u.device)[j].to(u.dtype)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma**2


class EDMPrecond:
    """Karras et al. (§5.1 row EDMPrecond; §5.2 EDMLoss, lambda c_out^2 = 1)."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5, P_mean: float = -1.2, P_std: float = 1.2,
                 sigma_min: float = 0.0, sigma_max: float = float("inf")):
        self.sigma_data, self.P_mean, self.P_std = sigma_data, P_mean, P_std
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def train_sigma_from_normal(self, n: torch.Tensor) -> torch.Tensor:
        return (n * self.P_std + self.P_mean).exp()

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2

    def round_sigma(self, sigma):
        return _t(sigma)


PRECONDS = {"vp": VPPrecond, "ve": VEPrecond, "iddpm": IDDPMPrecond, "edm": EDMPrecond}
