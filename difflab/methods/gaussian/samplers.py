"""Samplers for every Gaussian method: pure functions over a denoiser ``D(x, sigma) -> x0_hat`` and a
sigma grid (the k-diffusion style, DESIGN.md). Math runs in float64 as in specs/gaussian_and_dddm.md §5.3.

``randn_like`` injects the noise source (a per-seed ``StackedRandomGenerator.randn_like``), so a sample
depends on its seed alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from difflab.methods.gaussian.precond import IDDPMPrecond, VPPrecond

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RandnLike = Callable[[torch.Tensor], torch.Tensor]


# ---- sigma grids --------------------------------------------------------------------------------

def sigmas_edm(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               round_sigma: Callable = lambda s: s) -> torch.Tensor:
    """Karras rho-schedule (§5.3): ``t_i = (smax^(1/rho) + i/(N-1)(smin^(1/rho) - smax^(1/rho)))^rho``,
    followed by ``t_N = 0``. Returns float64 ``[N+1]``."""
    i = torch.arange(num_steps, dtype=torch.float64)
    denom = max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.as_tensor(round_sigma(t), dtype=torch.float64)
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


# ---- EDM Algorithm 2: Heun (or Euler) with churn --------------------------------------------------

def sample_heun(denoise: Denoiser, latents: torch.Tensor, sigmas: torch.Tensor, randn_like: RandnLike | None = None,
                S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                solver: str = "heun", round_sigma: Callable = lambda s: s, callback: Callable | None = None
                ) -> torch.Tensor:
    """EDM's stochastic sampler (§5.3). ``latents`` are unit Gaussian; ``sigmas`` end with 0.

    The last step is a plain Euler step, so NFE = 2N - 1 for Heun. With ``S_churn = 0`` no noise is drawn.
    """
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    sigmas = sigmas.to(torch.float64)
    num_steps = len(sigmas) - 1
    x_next = latents.to(torch.float64) * sigmas[0]
    for i in range(num_steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= float(t_cur) <= S_max else 0.0
        t_hat = torch.as_tensor(round_sigma(t_cur + gamma * t_cur), dtype=torch.float64)
        if gamma > 0:
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)
        else:
            x_hat = x_cur
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if solver == "heun" and i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if callback is not None:
            callback(i, x_next)
    return x_next


def sample_euler(denoise: Denoiser, latents: torch.Tensor, sigmas: torch.Tensor, **kwargs) -> torch.Tensor:
    """Deterministic Euler on the probability-flow ODE ``dx/dsigma = (x - D)/sigma``."""
    return sample_heun(denoise, latents, sigmas, solver="euler", **kwargs)


# ---- EDM ablation sampler (§5.4) ------------------------------------------------------------------

def sample_ablation(denoise: Denoiser, latents: torch.Tensor, randn_like: RandnLike | None = None,
                    num_steps: int = 18, sigma_min: float | None = None, sigma_max: float | None = None,
                    rho: float = 7.0, solver: str = "heun", discretization: str = "edm", schedule: str = "linear",
                    scaling: str = "none", epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008,
                    M: int = 1000, alpha: float = 1.0, S_churn: float = 0.0, S_min: float = 0.0,
                    S_max: float = float("inf"), S_noise: float = 1.0, round_sigma: Callable = lambda s: s,
                    net_sigma_min: float = 0.0, net_sigma_max: float = float("inf")) -> torch.Tensor:
    """The generalised sampler of §5.4: any solver x discretisation x sigma(t) schedule x s(t) scaling.

    With (heun, edm, linear, none, alpha=1) it reproduces :func:`sample_heun` exactly.
    """
    for opt, val, allowed in [("solver", solver, ("euler", "heun")), ("discretization", discretization,
                              ("vp", "ve", "iddpm", "edm")), ("schedule", schedule, ("vp", "ve", "linear")),
                              ("scaling", scaling, ("vp", "none"))]:
        if val not in allowed:
            raise ValueError(f"{opt} must be one of {allowed}, got {val!r}")

    vp = VPPrecond()
    vp_sigma = lambda beta_d, beta_min: lambda t: (np.e ** (0.5 * beta_d * (t**2) + beta_min * t) - 1) ** 0.5
    vp_sigma_deriv = lambda beta_d, beta_min: lambda t: 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))
    vp_sigma_inv = lambda beta_d, beta_min: lambda s: ((beta_min**2 + 2 * beta_d * (s**2 + 1).log()).sqrt()
                                                       - beta_min) / beta_d
    ve_sigma = lambda t: t.sqrt()
    ve_sigma_deriv = lambda t: 0.5 / t.sqrt()
    ve_sigma_inv = lambda s: s**2

    if sigma_min is None:
        sigma_min = {"vp": float(vp.sigma(epsilon_s)), "ve": 0.02, "iddpm": 0.002, "edm": 0.002}[discretization]
    if sigma_max is None:
        sigma_max = {"vp": float(vp.sigma(1.0)), "ve": 100.0, "iddpm": 81.0, "edm": 80.0}[discretization]
    sigma_min = max(sigma_min, net_sigma_min)
    sigma_max = min(sigma_max, net_sigma_max)

    # VP betas refit so that sigma(eps_s) = sigma_min and sigma(1) = sigma_max.
    vp_beta_d = 2 * (np.log(sigma_min**2 + 1) / epsilon_s - np.log(sigma_max**2 + 1)) / (epsilon_s - 1)
    vp_beta_min = np.log(sigma_max**2 + 1) - 0.5 * vp_beta_d

    step_indices = torch.arange(num_steps, dtype=torch.float64)
    denom = max(num_steps - 1, 1)
    if discretization == "vp":
        orig_t_steps = 1 + step_indices / denom * (epsilon_s - 1)
        sigma_steps = vp_sigma(vp_beta_d, vp_beta_min)(orig_t_steps)
    elif discretization == "ve":
        orig_t_steps = (sigma_max**2) * ((sigma_min**2 / sigma_max**2) ** (step_indices / denom))
        sigma_steps = ve_sigma(orig_t_steps)
    elif discretization == "iddpm":
        u = IDDPMPrecond(C_1=C_1, C_2=C_2, M=M).u
        u_filtered = u[(u >= sigma_min) & (u <= sigma_max)]
        sigma_steps = u_filtered[((len(u_filtered) - 1) / denom * step_indices).round().to(torch.int64)]
    else:
        sigma_steps = sigmas_edm(num_steps, sigma_min, sigma_max, rho)[:-1]

    if schedule == "vp":
        sigma = vp_sigma(vp_beta_d, vp_beta_min)
        sigma_deriv = vp_sigma_deriv(vp_beta_d, vp_beta_min)
        sigma_inv = vp_sigma_inv(vp_beta_d, vp_beta_min)
    elif schedule == "ve":
        sigma, sigma_deriv, sigma_inv = ve_sigma, ve_sigma_deriv, ve_sigma_inv
    else:
        sigma, sigma_deriv, sigma_inv = (lambda t: t), (lambda t: torch.ones_like(t)), (lambda s: s)

    if scaling == "vp":
        s = lambda t: 1 / (1 + sigma(t) ** 2).sqrt()
        s_deriv = lambda t: -sigma(t) * sigma_deriv(t) * (s(t) ** 3)
    else:
        s, s_deriv = (lambda t: torch.ones_like(t)), (lambda t: torch.zeros_like(t))

    t_steps = sigma_inv(torch.as_tensor(round_sigma(sigma_steps), dtype=torch.float64))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])

    def slope(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sig = sigma(t)
        D = denoise(x / s(t), sig)
        return (sigma_deriv(t) / sig + s_deriv(t) / s(t)) * x - sigma_deriv(t) * s(t) / sig * D

    t_next = t_steps[0]
    x_next = latents.to(torch.float64) * (sigma(t_next) * s(t_next))
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= float(sigma(t_cur)) <= S_max else 0.0
        t_hat = sigma_inv(torch.as_tensor(round_sigma(sigma(t_cur) + gamma * sigma(t_cur)), dtype=torch.float64))
        x_hat = s(t_hat) / s(t_cur) * x_cur
        if gamma > 0:
            x_hat = x_hat + (sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clip(min=0).sqrt() * s(t_hat) * S_noise \
                * randn_like(x_cur)
        h = t_next - t_hat
        d_cur = slope(x_hat, t_hat)
        x_prime = x_hat + alpha * h * d_cur
        t_prime = t_hat + alpha * h
        if solver == "euler" or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            d_prime = slope(x_prime, t_prime)
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x_next
