"""Samplers for every Gaussian method: pure functions over a denoiser ``D(x, sigma) -> x0_hat`` (the k-diffusion
style, DESIGN.md) and, where a sampler needs more than a sigma grid, the process object of
:mod:`difflab.methods.gaussian.sde`. Maths runs in float64 as in specs/gaussian_and_dddm.md §5.3.

Two families:

* **sigma-grid samplers** ``sample_<name>(denoise, latents, sigmas, randn_like=None, **options)``: ``sigmas`` is
  a decreasing grid ending with 0, ``latents`` unit Gaussian, ``D`` takes the VE-form point ``x0 + sigma n``.
  EDM's Heun/Euler with churn, the ablation sampler (any time parameterisation and scaling), DDPM ancestral and
  DDIM (through the VP chain of the grid: ``abar = 1/(1 + sigma^2)``).
* **SDE samplers** over the process's own time: predictor-corrector (``sample_pc``) and the probability-flow
  ODE (``sample_ode``), working on ``x_t = s(t)(x0 + sigma n)`` as score SDE does.

``randn_like`` injects the noise source (a per-seed ``StackedRandomGenerator.randn_like``), so a sample depends
on its seed alone. A denoiser may return ``(x0_hat, v)``, ``v`` being a learned-variance head (improved DDPM);
only :func:`sample_ancestral` uses ``v``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from difflab.errors import UserError
from difflab.methods.gaussian import ode
from difflab.methods.gaussian.schedules import alpha_bar_from_sigma
from difflab.methods.gaussian.sde import VPSDE, GaussianSDE, ablation_sde

Tensor = torch.Tensor
Denoiser = Callable[[Tensor, Tensor], "Tensor | tuple[Tensor, Tensor]"]
RandnLike = Callable[[Tensor], Tensor]
f64 = torch.float64


def _x0(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _call(denoise: Denoiser, x: Tensor, sigma) -> Tensor:
    return _x0(denoise(x, sigma))


# ---- sigma grids (decreasing, ending with 0) ----------------------------------------------------------

def append_zero(sigmas: Tensor) -> Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=f64)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sigmas_edm(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               round_sigma: Callable = lambda s: s) -> Tensor:
    """Karras rho-schedule (§5.3): ``t_i = (smax^(1/rho) + i/(N-1)(smin^(1/rho) - smax^(1/rho)))^rho``,
    followed by ``t_N = 0``. Returns float64 ``[N+1]``."""
    i = torch.arange(num_steps, dtype=f64)
    denom = max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return append_zero(torch.as_tensor(round_sigma(t), dtype=f64))


sigmas_karras = sigmas_edm


def sigmas_vp(num_steps: int, sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3) -> Tensor:
    """EDM ablation "vp" discretisation (§5.4): ``t_i = 1 + i/(N-1)(eps_s - 1)`` through the refit VP process."""
    t = 1 + torch.arange(num_steps, dtype=f64) / max(num_steps - 1, 1) * (epsilon_s - 1)
    return append_zero(VPSDE.fit(sigma_min, sigma_max, epsilon_s).sigma(t))


def sigmas_ve(num_steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """EDM ablation "ve" discretisation (§5.4): geometric in sigma^2, ``smax^2 (smin^2/smax^2)^(i/(N-1))``."""
    i = torch.arange(num_steps, dtype=f64) / max(num_steps - 1, 1)
    return append_zero((sigma_max**2 * (sigma_min**2 / sigma_max**2) ** i).sqrt())


def sigmas_iddpm(num_steps: int, sigma_min: float, sigma_max: float, C_1: float = 0.001, C_2: float = 0.008,
                 M: int = 1000) -> Tensor:
    """EDM ablation "iddpm" discretisation (§5.4): the u_j table inside [smin, smax], evenly picked."""
    from difflab.methods.gaussian.precond import IDDPMPrecond

    u = IDDPMPrecond(C_1=C_1, C_2=C_2, M=M).u
    u = u[(u >= sigma_min) & (u <= sigma_max)]
    idx = ((len(u) - 1) / max(num_steps - 1, 1) * torch.arange(num_steps, dtype=f64)).round().to(torch.int64)
    return append_zero(u[idx])


def sigmas_time_uniform(sde: GaussianSDE, num_steps: int, t_eps: float | None = None) -> Tensor:
    """Uniform in the process's time: ``sigma(linspace(T, eps, N))`` (score SDE's grid)."""
    eps = sde.t_eps if t_eps is None else t_eps
    return append_zero(sde.sigma(torch.linspace(sde.t_max, eps, num_steps, dtype=f64)))


def sigmas_table(table: Tensor, indices: list[int]) -> Tensor:
    """A DDPM table's own spacing: ``table[indices]`` walked from the largest index down, then 0 (§2.3, §3)."""
    return append_zero(torch.as_tensor(table, dtype=f64)[torch.as_tensor(sorted(indices), dtype=torch.long)].flip(0))


# ---- EDM Algorithm 2: Heun (or Euler) with churn --------------------------------------------------

def _churn_gamma(S_churn: float, num_steps: int, sigma: float, S_min: float, S_max: float) -> float:
    return min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= sigma <= S_max else 0.0


def sample_heun(denoise: Denoiser, latents: Tensor, sigmas: Tensor, randn_like: RandnLike | None = None,
                S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                solver: str = "heun", round_sigma: Callable = lambda s: s, callback: Callable | None = None
                ) -> Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2; §5.3). ``latents`` are unit Gaussian; ``sigmas``
    end with 0. The last step is a plain Euler step, so NFE = 2N - 1 for Heun. With ``S_churn = 0`` no noise
    is drawn."""
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    sigmas = sigmas.to(f64)
    num_steps = len(sigmas) - 1
    x_next = latents.to(f64) * sigmas[0]
    for i in range(num_steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        x_cur = x_next
        gamma = _churn_gamma(S_churn, num_steps, float(t_cur), S_min, S_max)
        t_hat = torch.as_tensor(round_sigma(t_cur + gamma * t_cur), dtype=f64)
        if gamma > 0:
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)
        else:
            x_hat = x_cur
        d_cur = (x_hat - _call(denoise, x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if solver == "heun" and i < num_steps - 1:
            d_prime = (x_next - _call(denoise, x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if callback is not None:
            callback(i, x_next)
    return x_next


def sample_euler(denoise: Denoiser, latents: Tensor, sigmas: Tensor, randn_like: RandnLike | None = None,
                 S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                 round_sigma: Callable = lambda s: s, callback: Callable | None = None) -> Tensor:
    """Euler on the probability-flow ODE ``dx/dsigma = (x - D)/sigma`` (with EDM's optional churn)."""
    return sample_heun(denoise, latents, sigmas, randn_like, S_churn, S_min, S_max, S_noise, solver="euler",
                       round_sigma=round_sigma, callback=callback)


# ---- the ODE in any time parameterisation and scaling (EDM §5.4) --------------------------------------

def sample_scaled_ode(denoise: Denoiser, latents: Tensor, sigmas: Tensor, sde: GaussianSDE,
                      randn_like: RandnLike | None = None, solver: str = "heun", alpha: float = 1.0,
                      S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                      round_sigma: Callable = lambda s: s) -> Tensor:
    """EDM's generalised ODE solver (§5.4) in the time ``t`` of ``sde``: slope
    ``d(x, t) = (sigma'/sigma + s'/s) x - (sigma' s/sigma) D(x/s; sigma)``, churn in sigma, Euler or the
    ``alpha``-Heun (2nd order) step, the last step Euler. Returns the x0-space sample (``s(0) = 1``)."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    num_steps = len(sigmas) - 1
    t_steps = sde.sigma_inv(torch.as_tensor(round_sigma(sigmas[:-1].to(f64)), dtype=f64))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    sigma, s = sde.sigma, sde.s

    def slope(x: Tensor, t: Tensor) -> Tensor:
        sig = sigma(t)
        D = _call(denoise, x / s(t), sig)
        return (sde.sigma_deriv(t) / sig + sde.s_deriv(t) / s(t)) * x - sde.sigma_deriv(t) * s(t) / sig * D

    t_next = t_steps[0]
    x_next = latents.to(f64) * (sigma(t_next) * s(t_next))
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur = x_next
        gamma = _churn_gamma(S_churn, num_steps, float(sigma(t_cur)), S_min, S_max)
        t_hat = sde.sigma_inv(torch.as_tensor(round_sigma(sigma(t_cur) + gamma * sigma(t_cur)), dtype=f64))
        x_hat = s(t_hat) / s(t_cur) * x_cur
        if gamma > 0:
            x_hat = x_hat + (sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clip(min=0).sqrt() * s(t_hat) * S_noise \
                * randn_like(x_cur)
        h = t_next - t_hat
        d_cur = slope(x_hat, t_hat)
        if solver == "euler" or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            d_prime = slope(x_hat + alpha * h * d_cur, t_hat + alpha * h)
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x_next


ABLATION_SIGMA_RANGES = {"vp": (None, None), "ve": (0.02, 100.0), "iddpm": (0.002, 81.0), "edm": (0.002, 80.0)}


def sample_ablation(denoise: Denoiser, latents: Tensor, randn_like: RandnLike | None = None,
                    num_steps: int = 18, sigma_min: float | None = None, sigma_max: float | None = None,
                    rho: float = 7.0, solver: str = "heun", discretization: str = "edm", schedule: str = "linear",
                    scaling: str = "none", epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008,
                    M: int = 1000, alpha: float = 1.0, S_churn: float = 0.0, S_min: float = 0.0,
                    S_max: float = float("inf"), S_noise: float = 1.0, round_sigma: Callable = lambda s: s,
                    net_sigma_min: float = 0.0, net_sigma_max: float = float("inf")) -> Tensor:
    """EDM's ablation sampler (§5.4): a ``discretization`` grid (vp, ve, iddpm, edm) solved in the time of
    ``schedule`` (vp, ve, linear) with ``scaling`` (vp, none). With (heun, edm, linear, none, alpha=1) it
    reproduces :func:`sample_heun`."""
    for opt, val, allowed in [("solver", solver, ("euler", "heun")), ("discretization", discretization,
                              ("vp", "ve", "iddpm", "edm")), ("schedule", schedule, ("vp", "ve", "linear")),
                              ("scaling", scaling, ("vp", "none"))]:
        if val not in allowed:
            raise ValueError(f"{opt} must be one of {allowed}, got {val!r}")
    lo, hi = ABLATION_SIGMA_RANGES[discretization]
    default_vp = VPSDE(0.1, 20.0)  # EDM's VP defaults (beta_d 19.9, beta_min 0.1)
    sigma_min = sigma_min if sigma_min is not None else (lo if lo is not None else float(default_vp.sigma(epsilon_s)))
    sigma_max = sigma_max if sigma_max is not None else (hi if hi is not None else float(default_vp.sigma(1.0)))
    sigma_min, sigma_max = max(sigma_min, net_sigma_min), min(sigma_max, net_sigma_max)
    if discretization == "vp":
        sigmas = sigmas_vp(num_steps, sigma_min, sigma_max, epsilon_s)
    elif discretization == "ve":
        sigmas = sigmas_ve(num_steps, sigma_min, sigma_max)
    elif discretization == "iddpm":
        sigmas = sigmas_iddpm(num_steps, sigma_min, sigma_max, C_1, C_2, M)
    else:
        sigmas = sigmas_edm(num_steps, sigma_min, sigma_max, rho)
    sde = ablation_sde(schedule, scaling, sigma_min, sigma_max, epsilon_s)
    return sample_scaled_ode(denoise, latents, sigmas, sde, randn_like, solver=solver, alpha=alpha,
                             S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, round_sigma=round_sigma)


# ---- the VP chain of a sigma grid: DDPM ancestral and DDIM (§2.3, §3) ------------------------------------

VAR_TYPES = ("fixedlarge", "fixedsmall", "learned")


def sample_ancestral(denoise: Denoiser, latents: Tensor, sigmas: Tensor, randn_like: RandnLike | None = None,
                     var_type: str = "fixedlarge", callback: Callable | None = None) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020 Alg. 2; improved DDPM's ``p_sample``; §2.3) through the
    VP chain of ``sigmas``: ``x_T ~ N(0, I)``, at each step the posterior ``q(x_s | x_t, x0_hat)`` with
    ``beta = 1 - abar_t/abar_s`` (the respaced chain of §2.3) and variance ``beta`` (fixedlarge),
    ``beta~ = beta (1 - abar_s)/(1 - abar_t)`` (fixedsmall) or the learned range
    ``exp(frac ln beta + (1 - frac) ln beta~)``, ``frac = (v + 1)/2``; no noise at the last step."""
    if var_type not in VAR_TYPES:
        raise UserError(f"--var-type {var_type!r} is not supported; choose one of: {', '.join(VAR_TYPES)}")
    sigmas = sigmas.to(f64)
    abar = alpha_bar_from_sigma(sigmas)
    x = latents.to(f64)
    for i in range(len(sigmas) - 1):
        ab_t, ab_s = abar[i], abar[i + 1]
        out = denoise(x / ab_t.sqrt(), sigmas[i])
        x0 = _x0(out)
        beta = 1 - ab_t / ab_s
        mean = beta * ab_s.sqrt() / (1 - ab_t) * x0 + (1 - ab_s) * (1 - beta).sqrt() / (1 - ab_t) * x
        if i < len(sigmas) - 2:
            log_beta_tilde = (beta * (1 - ab_s) / (1 - ab_t)).log()
            if var_type == "fixedlarge":
                logvar = beta.log()
            elif var_type == "fixedsmall":
                logvar = log_beta_tilde
            else:
                if not isinstance(out, tuple):
                    raise UserError("--var-type learned needs a model with a learned variance (learn_sigma)")
                frac = (out[1].to(x.dtype) + 1) / 2
                logvar = frac * beta.log() + (1 - frac) * log_beta_tilde
            x = mean + (0.5 * logvar).exp() * randn_like(x)
        else:
            x = mean
        if callback is not None:
            callback(i, x)
    return x / abar[-1].sqrt()


def ddim_step(x0_hat: Tensor, eps_hat: Tensor, abar_t: float, abar_s: float, eta: float,
              noise: Tensor | None) -> Tensor:
    """One DDIM update ``t -> s`` (§3): ``x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z``
    with ``sigma = eta sqrt((1 - abar_t/abar_s)(1 - abar_s)/(1 - abar_t))``."""
    abar_t, abar_s = float(abar_t), float(abar_s)
    sigma = eta * math.sqrt(max((1 - abar_t / abar_s) * (1 - abar_s) / (1 - abar_t), 0.0))
    x_s = math.sqrt(abar_s) * x0_hat + math.sqrt(max(1 - abar_s - sigma**2, 0.0)) * eps_hat
    if sigma > 0 and noise is not None:
        x_s = x_s + sigma * noise
    return x_s


def sample_ddim(denoise: Denoiser, latents: Tensor, sigmas: Tensor, randn_like: RandnLike | None = None,
                eta: float = 0.0, callback: Callable | None = None) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, Eq. 12; §3) through the VP chain of ``sigmas`` from ``x_T ~ N(0, I)``;
    ``eta = 0`` is deterministic (one Euler step in sigma per step), ``eta = 1`` the DDPM posterior."""
    sigmas = sigmas.to(f64)
    abar = alpha_bar_from_sigma(sigmas)
    x = latents.to(f64)
    last = len(sigmas) - 2
    for i in range(len(sigmas) - 1):
        ab_t, ab_s = abar[i], abar[i + 1]
        x0 = _call(denoise, x / ab_t.sqrt(), sigmas[i])
        eps = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()
        noise = randn_like(x) if (eta > 0 and i < last) else None
        x = ddim_step(x0, eps, ab_t, ab_s, eta, noise)
        if callback is not None:
            callback(i, x)
    return x / abar[-1].sqrt()


def sample_deterministic(denoise: Denoiser, latents: Tensor, sigmas: Tensor, randn_like: RandnLike | None = None,
                         callback: Callable | None = None) -> Tensor:
    """DDIM with eta = 0 (improved DDPM's "deterministic" sampling of a respaced chain)."""
    return sample_ddim(denoise, latents, sigmas, randn_like, eta=0.0, callback=callback)


# ---- predictor-corrector (score SDE, §4.5) --------------------------------------------------------------

PREDICTORS = ("reverse_diffusion", "euler_maruyama", "ancestral", "none")
CORRECTORS = ("langevin", "ald", "none")
PC_ORDERS = ("corrector-first", "predictor-first")
NORMS = ("sample", "batch")


def _row_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1)


def _rows(v: Tensor, x: Tensor) -> Tensor:
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim else v


def sample_pc(denoise: Denoiser, latents: Tensor, sde: GaussianSDE, randn_like: RandnLike | None = None,
              predictor: str = "reverse_diffusion", corrector: str = "langevin", snr: float = 0.16,
              corrector_steps: int = 1, order: str = "corrector-first", norm: str = "sample",
              t_eps: float | None = None, noise_removal: bool = True, info: dict | None = None) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 2-3; §4.5) on ``sde.N`` levels
    ``t_i = linspace(T, eps, N)``, then ``t_N = 0``.

    Predictors: ``reverse_diffusion`` (``x_mean = x - f + G^2 score`` from ``sde.discretize``), ``euler_maruyama``
    (``x_mean = x + (f - g^2 score) dt`` along the grid), ``ancestral`` (VE/VP chains), ``none``. Correctors:
    ``langevin`` (step ``2 alpha (snr |z| / |score|)^2``) and ``ald`` (``2 alpha (snr std)^2``), ``none``.
    ``order="corrector-first"`` is the reference code's order (corrector at ``t_i``, then the predictor);
    ``"predictor-first"`` the paper's (predictor to ``t_{i+1}``, then the corrector there). ``norm="sample"``
    takes the Langevin norms per image (an image depends on its seed alone); ``"batch"`` averages them over the
    batch as the reference does. With ``noise_removal`` the output is the last predictor's noise-free mean.
    NFE = N (corrector_steps + 1).
    """
    for opt, val, allowed in [("predictor", predictor, PREDICTORS), ("corrector", corrector, CORRECTORS),
                              ("order", order, PC_ORDERS), ("norm", norm, NORMS)]:
        if val not in allowed:
            raise UserError(f"--{opt} {val!r} is not supported; choose one of: {', '.join(allowed)}")
    if predictor == "ancestral" and not hasattr(sde, "ancestral_step") and not hasattr(sde, "ancestral_betas"):
        raise UserError(f"the ancestral predictor needs a VE or VP process, not {type(sde).__name__}; "
                        "use --predictor reverse_diffusion")
    N = sde.N
    eps = sde.t_eps if t_eps is None else float(t_eps)
    times = torch.cat([torch.linspace(sde.t_max, eps, N, dtype=f64), torch.zeros(1, dtype=f64)])
    x = sde.prior_sample(latents.to(f64))
    x_mean = x
    nfe = 0

    def score(x: Tensor, t: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return sde.score(denoise, x, t)

    def correct(x: Tensor, t: Tensor) -> Tensor:
        if corrector == "none":
            return x
        alpha = _rows(sde.langevin_alpha(t), x)
        for _ in range(int(corrector_steps)):
            grad = score(x, t)
            z = randn_like(x)
            if corrector == "langevin":
                g, n = _row_norm(grad), _row_norm(z)
                if norm == "batch":
                    g, n = g.mean(), n.mean()
                step = 2 * alpha * _rows((snr * n / g) ** 2, x)
            else:
                step = 2 * alpha * (snr * sde.marginal(x, t)[1]) ** 2
            x = x + step * grad + (2 * step).sqrt() * z
        return x

    def predict(x: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
        if predictor == "none":
            return x, x
        grad = score(x, t)
        if predictor == "reverse_diffusion":
            f, G = sde.discretize(x, t)
            mean = x - f + G**2 * grad
            return mean + G * randn_like(x), mean
        if predictor == "euler_maruyama":
            dt = t_next - t
            mean = x + sde.reverse_drift(x, t, grad) * dt
            return mean + _rows(sde.diffusion(t), x) * (-dt).sqrt() * randn_like(x), mean
        if hasattr(sde, "ancestral_step"):
            sig, adj = sde.ancestral_step(t)
            mean = x + _rows(sig**2 - adj**2, x) * grad
            std = (adj**2 * (sig**2 - adj**2) / sig**2).sqrt()
            return mean + _rows(std, x) * randn_like(x), mean
        beta = _rows(sde.ancestral_betas(t), x)
        mean = (x + beta * grad) / (1 - beta).sqrt()
        return mean + beta.sqrt() * randn_like(x), mean

    for i in range(N):
        t, t_next = times[i], times[i + 1]
        if order == "corrector-first":
            x = correct(x, t)
            x, x_mean = predict(x, t, t_next)
        else:
            x, x_mean = predict(x, t, t_next)
            if i < N - 1:
                x = correct(x, t_next)
                x_mean = x
    if info is not None:
        info["nfe"] = nfe
    return x_mean if noise_removal else x


# ---- probability-flow ODE (§4.5) -----------------------------------------------------------------------

ODE_SOLVERS = ("rk45", "euler", "heun", "rk4")


def pf_ode_field(denoise: Denoiser, sde: GaussianSDE, shape: tuple[int, ...]) -> ode.Field:
    """``dx/dt = f - g^2 score/2`` on flattened rows, each at its own time."""

    def field(y: Tensor, t: Tensor, rows: Tensor | None = None) -> Tensor:
        x = y.reshape(-1, *shape)
        return sde.ode_drift(x, t, sde.score(denoise, x, t)).flatten(1)

    return field


def sample_ode(denoise: Denoiser, latents: Tensor, sde: GaussianSDE, randn_like: RandnLike | None = None,
               solver: str = "rk45", rtol: float = 1e-5, atol: float = 1e-5, steps: int | None = None,
               t_eps: float | None = None, denoise_final: bool = True, info: dict | None = None) -> Tensor:
    """Probability-flow ODE sampler (Song et al. 2021 Eq. 13; §4.5) from the prior at ``T`` to ``eps``:
    adaptive RK45 (``rtol``/``atol``, per-image step control, as scipy's) or fixed ``euler``/``heun``/``rk4`` on
    ``steps`` uniform steps; with ``denoise_final`` a last reverse-diffusion mean at ``eps`` (the reference's
    ``noise_removal``). ``info["nfe"]`` receives the mean number of network evaluations per image."""
    if solver not in ODE_SOLVERS:
        raise UserError(f"--solver {solver!r} is not an ODE solver; choose one of: {', '.join(ODE_SOLVERS)}")
    eps = sde.t_eps if t_eps is None else float(t_eps)
    shape = tuple(latents.shape[1:])
    y = sde.prior_sample(latents.to(f64)).flatten(1)
    field = pf_ode_field(denoise, sde, shape)
    if solver == "rk45":
        y, nfe = ode.solve_rk45(field, y, sde.t_max, eps, rtol=rtol, atol=atol)
    else:
        n = int(steps or sde.N)
        y, nfe = ode.solve_fixed(field, y, torch.linspace(sde.t_max, eps, n + 1, dtype=f64), solver)
    x = y.reshape(-1, *shape)
    if denoise_final:
        t = torch.as_tensor(eps, dtype=f64)
        f, G = sde.discretize(x, t)
        x = x - f + G**2 * sde.score(denoise, x, t)
        nfe = nfe + 1
    if info is not None:
        info["nfe"] = float(nfe.double().mean())
    return x


# ---- the registry: name -> sampler (one place; methods and the CLI read it) --------------------------------

SAMPLER_OPTIONS: dict[str, tuple[str, ...]] = {
    "heun": ("S_churn", "S_min", "S_max", "S_noise"),
    "euler": ("S_churn", "S_min", "S_max", "S_noise"),
    "ablation": ("solver", "discretization", "schedule", "scaling", "epsilon_s", "C_1", "C_2", "M", "alpha",
                 "S_churn", "S_min", "S_max", "S_noise"),
    "ancestral": ("var_type",),
    "deterministic": (),
    "ddim": ("eta",),
    "pc": ("predictor", "corrector", "snr", "corrector_steps", "order", "norm", "t_eps", "noise_removal"),
    "ode": ("solver", "rtol", "atol", "t_eps", "denoise_final"),
}
# options of every sigma grid, and of a DDPM table's own spacing (ancestral / deterministic / ddim)
GRID_OPTIONS = ("sigma_min", "sigma_max", "rho", "grid")
TABLE_OPTIONS = ("skip", "respacing")
SIGMA_SAMPLERS = ("heun", "euler", "ancestral", "deterministic", "ddim")
TABLE_SAMPLERS = ("ancestral", "deterministic", "ddim")
SDE_SAMPLERS = ("pc", "ode")
SAMPLERS = tuple(SAMPLER_OPTIONS)


def allowed_options(sampler: str) -> set[str]:
    """Every option ``sampler`` takes (its own, its grid's); a one-line error for an unknown sampler."""
    if sampler not in SAMPLER_OPTIONS:
        raise UserError(f"--sampler {sampler!r} is unknown; choose one of: {', '.join(SAMPLERS)}")
    allowed = set(SAMPLER_OPTIONS[sampler])
    if sampler in SIGMA_SAMPLERS or sampler == "ablation":
        allowed |= set(GRID_OPTIONS) - ({"grid"} if sampler == "ablation" else set())
    if sampler in TABLE_SAMPLERS:
        allowed |= set(TABLE_OPTIONS)
    return allowed


def check_options(sampler: str, options: dict[str, Any]) -> None:
    """One line for an unknown sampler or an option it does not take."""
    allowed = allowed_options(sampler)
    unknown = sorted(k for k, v in options.items() if v is not None and k not in allowed)
    if unknown:
        raise UserError(f"sampler option(s) {unknown} do not apply to --sampler {sampler}; "
                        f"it takes: {', '.join(sorted(allowed)) or 'no options'}")
