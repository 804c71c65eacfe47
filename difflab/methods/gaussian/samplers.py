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
from difflab.methods.gaussian.sde import VPSDE, GaussianSDE, _rows, ablation_sde

Tensor = torch.Tensor
Denoiser = Callable[[Tensor, Tensor], "Tensor | tuple[Tensor, Tensor]"]
RandnLike = Callable[[Tensor], Tensor]
f64 = torch.float64


def work_dtype(device: torch.device | str) -> torch.dtype:
    """Sampler arithmetic runs in float64 (as EDM's samplers), float32 where the device has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


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


def check_pc(predictor: str, corrector: str, order: str, norm: str) -> None:
    """One line for a predictor-corrector option value :func:`sample_pc` does not know (§4.5)."""
    for opt, val, allowed in [("predictor", predictor, PREDICTORS), ("corrector", corrector, CORRECTORS),
                              ("order", order, PC_ORDERS), ("norm", norm, NORMS)]:
        if val not in allowed:
            raise UserError(f"--{opt} {val!r} is not supported; choose one of: {', '.join(allowed)}")


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
    check_pc(predictor, corrector, order, norm)
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
            if i < N - 1:  # the next predictor overwrites x_mean; the last step has no corrector
                x = correct(x, t_next)
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


# ---- fast samplers (issue 11): exponential integrators in the log-SNR, multistep, adaptive ------------------
#
# In the VE form the PF-ODE in data prediction is ``dx/dlambda = D(x, sigma) - x`` with ``lambda = -ln sigma``
# (the log-SNR of every Gaussian method, §1: ``alpha/sigma_vp = 1/sigma``), so over ``h = lambda_next - lambda``
#     x_next = e^{-h} x + int_0^h e^{u - h} D(lambda + u) du                                        (*)
# (Lu et al. 2022, arXiv 2211.01095, the data-prediction exact solution of §3.1). The VP form of (*),
# ``x_t = (sigma_t/sigma_s) x_s + alpha_t int ...`` in the VP sigma, is (*) multiplied by alpha_t: DPM-Solver++ and
# UniPC in data prediction do not depend on the scaling s(t), so one VE-form loop serves VP, VE, EDM and DDPM runs
# (tests/test_fast_samplers.py pins one VP-form step against it). Every sampler below ends with the step to
# sigma = 0, where h is infinite and every order collapses to the first-order step ``x = D(x, sigma_min)``.

def sigmas_logsnr(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Tensor:
    """Uniform in the log-SNR ``lambda = -ln sigma`` between ``sigma_max`` and ``sigma_min`` (DPM-Solver's
    ``logSNR`` spacing, arXiv 2206.00927), then 0. In sigma this is geometric, so it is also
    k-diffusion's ``get_sigmas_exponential`` and EDM's "ve" discretisation (geometric in sigma^2): for Gaussian
    processes in the sigma parameterisation the three coincide, and ``--grid exponential`` is this grid."""
    i = torch.arange(num_steps, dtype=f64) / max(num_steps - 1, 1)
    return append_zero(torch.exp(math.log(sigma_max) + i * (math.log(sigma_min) - math.log(sigma_max))))


sigmas_exponential = sigmas_logsnr


def _grid(sigmas: Tensor) -> Tensor:
    """The grid in float64 with repeated levels merged (a rounded grid, e.g. iDDPM's table, may repeat one; a
    zero-length step would divide the multistep differences by zero)."""
    return torch.unique_consecutive(sigmas.to(f64))


def _lam(sigma) -> float:
    return -math.log(float(sigma))


def _moments(h: float, k: int) -> list[float]:
    """``I_j = int_0^h e^{u-h} u^j du`` for ``j = 0..k``: ``I_0 = 1 - e^{-h}``, ``I_j = h^j - j I_{j-1}``."""
    out = [-math.expm1(-h)]
    for j in range(1, k + 1):
        out.append(h**j - j * out[-1])
    return out


def _exp_multistep(x: Tensor, h: float, Ds: list[Tensor], lams: list[float]) -> Tensor:
    """(*) with ``D`` replaced by the polynomial through the last ``len(Ds)`` values (newest first, at log-SNRs
    ``lams``), integrated exactly: Newton's form around the newest node ``u_0 = 0`` with nodes
    ``u_j = lams[j] - lams[0] < 0`` and divided differences ``D[u_0..u_j]``."""
    I = _moments(h, len(Ds) - 1)
    u = [lam - lams[0] for lam in lams]
    # divided differences, newest node first
    table = list(Ds)
    coef = [table[0]]
    for j in range(1, len(Ds)):
        table = [(table[m] - table[m + 1]) / (u[m] - u[m + j]) for m in range(len(table) - 1)]
        coef.append(table[0])
    out = math.exp(-h) * x + I[0] * Ds[0]
    # int e^{u-h} prod_{m<j}(u - u_m) du from the moments: expand the product's polynomial coefficients
    poly = [1.0]  # coefficients of prod_{m<j}(u - u_m), lowest degree first
    for j in range(1, len(Ds)):
        poly = [0.0] + poly
        for d in range(len(poly) - 1):
            poly[d] -= u[j - 1] * poly[d + 1]
        out = out + sum(c * I[d] for d, c in enumerate(poly)) * coef[j]
    return out


def _order_now(order: int, i: int, num_steps: int, lower_order_final: bool) -> int:
    """Warm-up (``i + 1`` values known) and, with ``lower_order_final``, order ``N - i`` near the end (diffusers'
    ``lower_order_final``); the step to sigma = 0 is always first order."""
    p = min(order, i + 1)
    return min(p, num_steps - i) if lower_order_final else p


def _check_order(name: str, order, allowed: tuple[int, ...]) -> int:
    try:
        p = int(order)
    except (TypeError, ValueError):
        p = None
    if p not in allowed or float(order) != p:
        raise UserError(f"--order {order!r} does not apply to --sampler {name}; choose one of: "
                        f"{', '.join(map(str, allowed))}")
    return p


def _multistep_exp(denoise: Denoiser, latents: Tensor, sigmas: Tensor, order: int, lower_order_final: bool,
                   callback: Callable | None) -> Tensor:
    sigmas = _grid(sigmas)
    num_steps = len(sigmas) - 1
    x = latents.to(f64) * sigmas[0]
    Ds: list[Tensor] = []
    lams: list[float] = []
    for i in range(num_steps):
        D = _call(denoise, x, sigmas[i])
        Ds, lams = [D, *Ds][:order], [_lam(sigmas[i]), *lams][:order]
        if sigmas[i + 1] == 0:
            x = D
        else:
            p = _order_now(order, i, num_steps, lower_order_final)
            x = _exp_multistep(x, _lam(sigmas[i + 1]) - lams[0], Ds[:p], lams[:p])
        if callback is not None:
            callback(i, x)
    return x


def sample_dpmpp_2m(denoise: Denoiser, latents: Tensor, sigmas: Tensor, randn_like: RandnLike | None = None,
                    callback: Callable | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2): the multistep second-order solver of (*) in
    data prediction, ``x_next = e^{-h} x + (1 - e^{-h}) (D_i + (D_i - D_{i-1}) / (2 r))``, ``r = h_{i-1}/h``.
    The first step (no ``D_{i-1}`` yet) and the step to sigma = 0 are first order (DDIM). NFE = 1 per step."""
    sigmas = _grid(sigmas)
    x = latents.to(f64) * sigmas[0]
    D_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        D = _call(denoise, x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = D
        else:
            h = _lam(sigmas[i + 1]) - _lam(sigmas[i])
            D_d = D if D_prev is None else D + (D - D_prev) * (h / (2 * h_prev))
            x = math.exp(-h) * x - math.expm1(-h) * D_d
            h_prev = h
        D_prev = D
        if callback is not None:
            callback(i, x)
    return x


def sample_dpmpp_3m(denoise: Denoiser, latents: Tensor, sigmas: Tensor, randn_like: RandnLike | None = None,
                    lower_order_final: bool = True, callback: Callable | None = None) -> Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022, arXiv 2211.01095, §4 "multistep", the third-order member of Alg. 2's
    family): (*) with ``D`` the quadratic through the last three values, integrated exactly (Newton form; the
    Taylor terms ``h^{k+1} phi_{k+1}(h) D^(k)`` of DPM-Solver, arXiv 2206.00927 §3, with the derivatives as
    divided differences). Warm-up: orders 1, 2 (the exact linear integral); ``lower_order_final``: order 2 on the
    second-last step; the step to sigma = 0 is first order. NFE = 1 per step."""
    return _multistep_exp(denoise, latents, sigmas, 3, bool(lower_order_final), callback)


def sample_dpmpp_2s(denoise: Denoiser, latents: Tensor, sigmas: Tensor, randn_like: RandnLike | None = None,
                    callback: Callable | None = None) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022, arXiv 2211.01095, Alg. 1, ``r = 1/2``): a first-order step to the
    log-SNR midpoint ``lambda + h/2``, then ``x_next = e^{-h} x + (1 - e^{-h}) D(u, sigma_mid)``. The step to
    sigma = 0 is first order, so NFE = 2N - 1 (as Heun)."""
    sigmas = _grid(sigmas)
    x = latents.to(f64) * sigmas[0]
    for i in range(len(sigmas) - 1):
        D = _call(denoise, x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = D
        else:
            h = _lam(sigmas[i + 1]) - _lam(sigmas[i])
            s_mid = sigmas[i] * math.exp(-h / 2)
            u = math.exp(-h / 2) * x - math.expm1(-h / 2) * D
            x = math.exp(-h) * x - math.expm1(-h) * _call(denoise, u, s_mid)
        if callback is not None:
            callback(i, x)
    return x


def sample_dpmpp_sde(denoise: Denoiser, latents: Tensor, sigmas: Tensor, randn_like: RandnLike | None = None,
                     eta: float = 1.0, S_noise: float = 1.0, callback: Callable | None = None) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, App. "SDE-DPM-Solver++"; k-diffusion's
    ``dpmpp_2m_sde`` with the midpoint correction): the exact solution of the data-prediction reverse SDE with
    ``eta`` times its noise (``eta = 1`` the SDE, ``eta = 0`` DPM-Solver++(2M)),
    ``x_next = e^{-eta h} (sigma_n/sigma) x + (1 - e^{-(1+eta)h}) (D + (D - D_prev)/(2r))
    + sigma_n sqrt(1 - e^{-2 eta h}) S_noise z``, ``z`` from ``randn_like`` every step (per seed). The first
    step is first order; the step to sigma = 0 is ``x = D`` with no noise. NFE = 1 per step."""
    eta, S_noise = float(eta), float(S_noise)
    sigmas = _grid(sigmas)
    x = latents.to(f64) * sigmas[0]
    D_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        D = _call(denoise, x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = D
        else:
            h = _lam(sigmas[i + 1]) - _lam(sigmas[i])
            D_d = D if D_prev is None else D + (D - D_prev) * (h / (2 * h_prev))
            x = math.exp(-(1 + eta) * h) * x - math.expm1(-(1 + eta) * h) * D_d
            if eta > 0:
                x = x + float(sigmas[i + 1]) * math.sqrt(-math.expm1(-2 * eta * h)) * S_noise * randn_like(x)
            h_prev = h
        D_prev = D
        if callback is not None:
            callback(i, x)
    return x


UNIPC_VARIANTS = ("bh1", "bh2")


def _unipc_rhs(h: float, p: int, variant: str) -> tuple[float, list[float]]:
    """``B(h)`` and the right-hand side ``g_k = k! h phi_{k+1}(h) / B(h)``, ``k = 1..p`` of UniPC's order conditions
    in data prediction (Zhao et al. 2023, §3; ``phi`` of ``-h``)."""
    hh = -h
    B = hh if variant == "bh1" else math.expm1(hh)
    g, phi, fact = [], math.expm1(hh) / hh - 1, 1.0
    for k in range(1, p + 1):
        g.append(phi * fact / B)
        fact *= k + 1
        phi = phi / hh - 1 / fact
    return B, g


def _solve(rks: list[float], g: list[float]) -> list[float]:
    R = torch.tensor([[r**k for r in rks] for k in range(len(rks))], dtype=f64)
    return torch.linalg.solve(R, torch.tensor(g, dtype=f64)).tolist()


def sample_unipc(denoise: Denoiser, latents: Tensor, sigmas: Tensor, randn_like: RandnLike | None = None,
                 order: int = 3, variant: str = "bh2", use_corrector: bool = True, lower_order_final: bool = True,
                 callback: Callable | None = None) -> Tensor:
    """UniPC (Zhao et al. 2023, arXiv 2302.04867: UniP-p predictor, UniC-p corrector, Alg. 1-3 in data
    prediction) with ``B(h) = h`` (``bh1``) or ``e^h - 1`` (``bh2``). From the newest value ``D_0`` and the
    differences ``(D_k - D_0)/r_k`` (``r_k`` = log-SNR distance in units of ``h``), the predictor is
    ``x_next = e^{-h} x + (1 - e^{-h}) D_0 + B(h) sum_k rho_k (D_k - D_0)/r_k`` with ``rho`` from the order
    conditions ``sum_k rho_k r_k^{j-1} = g_j`` (order 2: ``rho = 1/2``, as the paper and diffusers). After the
    next evaluation ``D(x_next)`` the corrector redoes the step with that value added (``r = 1``): order p + 1
    with no extra NFE; it is off on the step to sigma = 0 (no evaluation follows). Warm-up uses orders 1, 2;
    ``lower_order_final`` caps the order at the steps left; the step to sigma = 0 is ``x = D``.
    NFE = 1 per step."""
    p_max = _check_order("unipc", order, (1, 2, 3))
    if variant not in UNIPC_VARIANTS:
        raise UserError(f"--variant {variant!r} is not a UniPC variant; choose one of: {', '.join(UNIPC_VARIANTS)}")
    sigmas = _grid(sigmas)
    num_steps = len(sigmas) - 1
    x = latents.to(f64) * sigmas[0]
    Ds: list[Tensor] = []  # newest first
    lams: list[float] = []
    prev = None  # (x before the last step, h, order) for the corrector

    def update(x_from: Tensor, h: float, D0: Tensor, others: list[tuple[float, Tensor]], p: int, corrector: bool
               ) -> Tensor:
        B, g = _unipc_rhs(h, p, variant)
        out = math.exp(-h) * x_from - math.expm1(-h) * D0
        if not others:
            return out
        if len(others) == 1 and not corrector or p == 1:
            rho = [0.5] * len(others)
        else:
            rks = [r for r, _ in others]
            rho = _solve(rks, g[:len(rks)])
        return out - B * sum(rk * (Dk - D0) / r for rk, (r, Dk) in zip(rho, others))

    for i in range(num_steps):
        D = _call(denoise, x, sigmas[i])
        lam = _lam(sigmas[i])
        if prev is not None and use_corrector:  # UniC-p on the step just taken, with D(x_i) as the new point
            x_from, h, p = prev
            others = [((lam_k - lams[0]) / h, Dk) for lam_k, Dk in zip(lams[1:p], Ds[1:p])]
            x = update(x_from, h, Ds[0], others + [(1.0, D)], p, corrector=True)
        Ds, lams = [D, *Ds][:p_max], [lam, *lams][:p_max]
        if sigmas[i + 1] == 0:
            x = D
        else:
            p = _order_now(p_max, i, num_steps, bool(lower_order_final))
            h = _lam(sigmas[i + 1]) - lam
            others = [((lam_k - lam) / h, Dk) for lam_k, Dk in zip(lams[1:p], Ds[1:p])]
            prev = (x, h, p)
            x = update(x, h, D, others, p, corrector=False)
        if callback is not None:
            callback(i, x)
    return x


def sample_euler_ancestral(denoise: Denoiser, latents: Tensor, sigmas: Tensor, randn_like: RandnLike | None = None,
                           eta: float = 1.0, S_noise: float = 1.0, callback: Callable | None = None) -> Tensor:
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``; the DDPM ancestral step of Ho et al. 2020 Alg. 2
    read in sigma): split ``sigma -> sigma_next`` into ``sigma_up = min(sigma_next, eta sqrt(sigma_next^2
    (sigma^2 - sigma_next^2)/sigma^2))`` and ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``, take the Euler
    step ``x + (sigma_down - sigma)(x - D)/sigma``, then add ``sigma_up S_noise z`` (``z`` per seed). ``eta = 0`` is
    Euler. NFE = 1 per step; no noise on the step to sigma = 0."""
    eta, S_noise = float(eta), float(S_noise)
    sigmas = _grid(sigmas)
    x = latents.to(f64) * sigmas[0]
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        D = _call(denoise, x, s)
        s_up = torch.minimum(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2).clamp(min=0).sqrt())
        s_down = (s_next**2 - s_up**2).clamp(min=0).sqrt()
        if s_next == 0:  # the Euler step to sigma = 0 is D; take it exactly
            x = D
        else:
            x = x + (s_down - s) * (x - D) / s
            if s_up > 0:
                x = x + s_up * S_noise * randn_like(x)
        if callback is not None:
            callback(i, x)
    return x


# Adams-Bashforth coefficients for equal steps, newest first (iPNDM, Zhang & Chen 2023 App. / Liu et al. 2022)
_AB = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def _ab_variable(sig: list[float], s_next: float) -> list[float]:
    """Weights ``w_k = (1/h) int_sigma^sigma_next L_k`` of the Lagrange basis through the nodes ``sig`` (newest
    first): the variable-step Adams-Bashforth step in sigma (DEIS's rho-AB, Zhang & Chen 2023 §4)."""
    n = len(sig)
    h = s_next - sig[0]
    # Gauss-Legendre on [sigma, sigma_next] integrates the degree n-1 basis exactly
    nodes, weights = [float(v) for v in _GL[0]], [float(v) for v in _GL[1]]
    w = []
    for k in range(n):
        total = 0.0
        for t, wt in zip(nodes, weights):
            s = sig[0] + (t + 1) / 2 * h
            L = 1.0
            for m in range(n):
                if m != k:
                    L *= (s - sig[m]) / (sig[k] - sig[m])
            total += wt / 2 * L
        w.append(total)
    return w


_GL = ((-0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526),
       (0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538))


def _linear_multistep(denoise: Denoiser, latents: Tensor, sigmas: Tensor, order: int, variable: bool,
                      callback: Callable | None) -> Tensor:
    sigmas = _grid(sigmas)
    x = latents.to(f64) * sigmas[0]
    ds: list[Tensor] = []  # slopes (x - D)/sigma, newest first
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        D = _call(denoise, x, s)
        if s_next == 0:  # the step to sigma = 0 is Euler, x + (0 - sigma)(x - D)/sigma = D: take D exactly
            x = D
            if callback is not None:
                callback(i, x)
            continue
        ds = [(x - D) / s, *ds][:order]
        p = min(order, i + 1)
        if variable:
            w = _ab_variable([float(v) for v in sigmas[i - p + 1:i + 1].flip(0)], float(s_next))
        else:
            w = _AB[p - 1]
        x = x + (s_next - s) * sum(wk * dk for wk, dk in zip(w, ds[:p]))
        if callback is not None:
            callback(i, x)
    return x


def sample_ipndm(denoise: Denoiser, latents: Tensor, sigmas: Tensor, randn_like: RandnLike | None = None,
                 order: int = 4, callback: Callable | None = None) -> Tensor:
    """iPNDM (Zhang & Chen 2023, arXiv 2204.13902, App. "iPNDM"; the pseudo linear multistep of Liu et al. 2022
    without its Runge-Kutta warm-up): Adams-Bashforth of order ``order`` (1-4) with the equal-step coefficients
    on the slope ``(x - D)/sigma`` of ``dx/dsigma``, lower orders while warming up; the step to sigma = 0 is
    Euler (``x = D``). NFE = 1 per step."""
    return _linear_multistep(denoise, latents, sigmas, _check_order("ipndm", order, (1, 2, 3, 4)), False, callback)


def sample_deis(denoise: Denoiser, latents: Tensor, sigmas: Tensor, randn_like: RandnLike | None = None,
                order: int = 3, callback: Callable | None = None) -> Tensor:
    """DEIS rho-AB (Zhang & Chen 2023, arXiv 2204.13902, §4, in the time rho = sigma, where the PF-ODE
    ``dx/dsigma = (x - D)/sigma`` has no linear part): the slope's Lagrange polynomial through the last ``order``
    (1-4) grid points integrated exactly over the actual (variable) step; the step to sigma = 0 is Euler.
    NFE = 1 per step. iPNDM is its equal-step-coefficient member."""
    return _linear_multistep(denoise, latents, sigmas, _check_order("deis", order, (1, 2, 3, 4)), True, callback)


def sample_adaptive(denoise: Denoiser, latents: Tensor, sigmas: Tensor, randn_like: RandnLike | None = None,
                    rtol: float = 1e-4, atol: float = 1e-4, info: dict | None = None,
                    denoise_rows: Callable[[Tensor], Denoiser] | None = None) -> Tensor:
    """Adaptive Dormand-Prince RK45 (:func:`~difflab.methods.gaussian.ode.solve_rk45`, step control per image) on
    ``dx/du = x - D(x, e^u)``, ``u = ln sigma``, from ``sigmas[0]`` to the grid's last nonzero sigma, then
    ``x = D(x, sigma_min)``; only the grid's ends are read. ``info["nfe"]`` receives the mean NFE per image.
    The solver evaluates only the rows still running: ``denoise_rows(rows)`` is the denoiser of those rows when
    ``D`` carries per-row state (class labels); without it ``denoise`` must be row-agnostic."""
    sigmas = _grid(sigmas)
    s_max, s_min = float(sigmas[0]), float(sigmas[sigmas > 0][-1])
    shape = tuple(latents.shape[1:])

    def field(y: Tensor, u: Tensor, rows: Tensor | None = None) -> Tensor:
        x = y.reshape(-1, *shape)
        D = denoise if rows is None or denoise_rows is None else denoise_rows(rows)
        return (x - _call(D, x, u.exp())).flatten(1)

    y, nfe = ode.solve_rk45(field, latents.to(f64).flatten(1) * s_max, math.log(s_max), math.log(s_min),
                            rtol=float(rtol), atol=float(atol))
    x = _call(denoise, y.reshape(-1, *shape), torch.as_tensor(s_min, dtype=f64))
    if info is not None:
        info["nfe"] = float(nfe.double().mean()) + 1
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
    "dpmpp_2m": (),
    "dpmpp_3m": ("lower_order_final",),
    "dpmpp_2s": (),
    "dpmpp_sde": ("eta", "S_noise"),
    "unipc": ("order", "variant", "use_corrector", "lower_order_final"),
    "euler_ancestral": ("eta", "S_noise"),
    "ipndm": ("order",),
    "deis": ("order",),
    "adaptive": ("rtol", "atol"),
}
FAST_SAMPLERS = ("dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "dpmpp_sde", "unipc", "euler_ancestral", "ipndm", "deis",
                 "adaptive")
# options of every sigma grid, and of a DDPM table's own spacing (ancestral / deterministic / ddim)
GRID_OPTIONS = ("sigma_min", "sigma_max", "rho", "grid", "sigmas")
TABLE_OPTIONS = ("skip", "respacing")
SIGMA_SAMPLERS = ("heun", "euler", "ancestral", "deterministic", "ddim", *FAST_SAMPLERS)
TABLE_SAMPLERS = ("ancestral", "deterministic", "ddim")
SDE_SAMPLERS = ("pc", "ode")
SAMPLERS = tuple(SAMPLER_OPTIONS)


def allowed_options(sampler: str) -> set[str]:
    """Every option ``sampler`` takes (its own, its grid's); a one-line error for an unknown sampler."""
    if sampler not in SAMPLER_OPTIONS:
        raise UserError(f"--sampler {sampler!r} is unknown; choose one of: {', '.join(SAMPLERS)}")
    allowed = set(SAMPLER_OPTIONS[sampler])
    if sampler == "adaptive":  # reads only the grid's ends
        allowed |= {"sigma_min", "sigma_max"}
    elif sampler in SIGMA_SAMPLERS or sampler == "ablation":
        allowed |= set(GRID_OPTIONS) - ({"grid", "sigmas"} if sampler == "ablation" else set())
    if sampler in TABLE_SAMPLERS:
        allowed |= set(TABLE_OPTIONS)
    return allowed


def check_options(sampler: str, options: dict[str, Any]) -> None:
    """One line for an unknown sampler or an option it does not take."""
    allowed = allowed_options(sampler)
    unknown = sorted(k for k, v in options.items() if v is not None and k not in allowed)
    if unknown:
        raise UserError(f"sampler option(s) {unknown} do not apply to --sampler {sampler}; "
                        f"it takes: {', '.join(sorted(allowed))}")  # every sampler takes some
