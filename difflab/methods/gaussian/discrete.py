"""The maths of discrete-time Gaussian diffusion (specs/gaussian_and_dddm.md §1, §2.1–2.3, §3): the
forward marginal, the posterior ``q(x_{t-1}|x_t, x0)``, output conversions, the VLB pieces (Gaussian KL,
discretised Gaussian decoder), the learned-range variance, the DDPM/DDIM steps and iDDPM's
loss-second-moment timestep sampler.

Functions take broadcastable tensors; the tables live in :class:`DiscreteProcess` (float64).
"""

from __future__ import annotations

import math

import torch

from difflab.methods.gaussian.schedules import alpha_bar, sigmas_from_alpha_bar

LN2 = math.log(2.0)


# ---- conversions between network outputs (§1; a^2 + b^2 = 1 for v) --------------------------------

def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (x_t - b * eps) / a


def x0_to_eps(x_t: torch.Tensor, x0: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (x_t - a * x0) / b


def v_to_x0(x_t: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a * x_t - b * v


def v_to_eps(x_t: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b * x_t + a * v


def velocity(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``v = a eps - b x0`` (Salimans & Ho)."""
    return a * eps - b * x0


# ---- VLB pieces (§2.2) ---------------------------------------------------------------------------

def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
              ) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp()
                  + (mean1 - mean2) ** 2 * (-logvar2).exp())


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by iDDPM's decoder (§2.2)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor,
                                        num_bins: int = 256) -> torch.Tensor:
    """Elementwise ``log P(x)`` of a Gaussian discretised to ``num_bins`` bins on [-1, 1] (§2.2).

    ``x`` must lie on the bin centres ``-1 + 2k/(num_bins-1)``; bins have half-width ``1/(num_bins-1)``,
    the first extends to -inf and the last to +inf, so the probabilities over all bins sum to one.
    """
    half = 1.0 / (num_bins - 1)
    centred = x - means
    inv_std = (-log_scales).exp()
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + half))
    cdf_min = approx_standard_normal_cdf(inv_std * (centred - half))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    edge = 1.0 - half  # x < -0.999 / x > 0.999 for 256 bins
    return torch.where(x < -edge, log_cdf_plus, torch.where(x > edge, log_one_minus_cdf_min, log_delta))


def learned_range_log_variance(v: torch.Tensor, log_beta: torch.Tensor, log_beta_tilde_clipped: torch.Tensor
                               ) -> torch.Tensor:
    """iDDPM's learned-range head (§2.2): with ``frac = (v+1)/2``,
    ``log var = frac log beta + (1-frac) log beta~``."""
    frac = (v + 1) / 2
    return frac * log_beta + (1 - frac) * log_beta_tilde_clipped


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


# ---- sampler steps (§2.3, §3) --------------------------------------------------------------------

def ddim_step(x0_hat: torch.Tensor, eps_hat: torch.Tensor, abar_t: float, abar_s: float, eta: float,
              noise: torch.Tensor | None) -> torch.Tensor:
    """One DDIM update ``t -> s`` (§3): ``x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z``
    with ``sigma = eta sqrt((1 - abar_t/abar_s)(1 - abar_s)/(1 - abar_t))``."""
    sigma = eta * math.sqrt(max((1 - abar_t / abar_s) * (1 - abar_s) / (1 - abar_t), 0.0))
    x_s = math.sqrt(abar_s) * x0_hat + math.sqrt(max(1 - abar_s - sigma**2, 0.0)) * eps_hat
    if sigma > 0 and noise is not None:
        x_s = x_s + sigma * noise
    return x_s


# ---- the process -------------------------------------------------------------------------------

class DiscreteProcess:
    """Tables of a T-step chain (float64, CPU): betas, abar, posterior coefficients and variances (§2.1). A
    respaced chain (§2.3) is sampled on the sigma grid of its kept steps, so no chain keeps an index map."""

    def __init__(self, betas: torch.Tensor):
        self.betas = betas.to(torch.float64).cpu()
        self.T = len(self.betas)
        self.alphas = 1 - self.betas
        self.abar = alpha_bar(self.betas)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        self.sigmas = sigmas_from_alpha_bar(self.abar)
        # q(x_{t-1} | x_t, x0) = N(coef_x0 x0 + coef_xt x_t, beta_tilde)
        self.posterior_variance = self.betas * (1 - self.abar_prev) / (1 - self.abar)
        self.coef_x0 = self.betas * self.abar_prev.sqrt() / (1 - self.abar)
        self.coef_xt = (1 - self.abar_prev) * self.alphas.sqrt() / (1 - self.abar)
        # beta_tilde_0 = 0: its log reuses index 1 ("clipped"), as does FIXED_LARGE's variance at index 0.
        pv1 = self.posterior_variance[1] if self.T > 1 else self.betas[0]
        self.log_beta_tilde_clipped = torch.cat([pv1.reshape(1), self.posterior_variance[1:]]).log()
        self.log_beta_large = torch.cat([pv1.reshape(1), self.betas[1:]]).log()

    def at(self, table: torch.Tensor, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather ``table[idx]`` and shape it ``[N,1,1,...]`` in ``like``'s dtype/device."""
        val = table[idx.cpu()] if isinstance(idx, torch.Tensor) else table[idx].expand(like.shape[0])
        return val.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def q_mean_variance(self, x0: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I)``."""
        ab = self.at(self.abar, idx, x0)
        return ab.sqrt() * x0, (1 - ab).expand_as(x0)

    def q_sample(self, x0: torch.Tensor, idx: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        ab = self.at(self.abar, idx, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, idx: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of ``q(x_{t-1} | x_t, x0)`` (§2.1)."""
        mean = self.at(self.coef_x0, idx, x_t) * x0 + self.at(self.coef_xt, idx, x_t) * x_t
        var = self.at(self.posterior_variance, idx, x_t).expand_as(x_t)
        logvar = self.at(self.log_beta_tilde_clipped, idx, x_t).expand_as(x_t)
        return mean, var, logvar

    def model_log_variance(self, idx: torch.Tensor, like: torch.Tensor, var_type: str,
                           v: torch.Tensor | None = None) -> torch.Tensor:
        """Log variance of ``p(x_{t-1}|x_t)``: ``fixedlarge`` (beta; index 0 uses beta~_1), ``fixedsmall``
        (clipped beta~) or ``learned`` (learned range from the head output ``v``) (§2.3)."""
        if var_type == "learned":
            return learned_range_log_variance(v, self.at(self.betas.log(), idx, like),
                                              self.at(self.log_beta_tilde_clipped, idx, like))
        table = self.log_beta_large if var_type == "fixedlarge" else self.log_beta_tilde_clipped
        return self.at(table, idx, like).expand_as(like)

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """``KL(q(x_T | x0) || N(0, I))`` in bits/dim, per example."""
        mean, var = self.q_mean_variance(x0, torch.full((x0.shape[0],), self.T - 1, dtype=torch.long))
        kl = normal_kl(mean, var.log(), torch.zeros_like(mean), torch.zeros_like(mean))
        return mean_flat(kl) / LN2

    def vb_bpd(self, x0: torch.Tensor, x_t: torch.Tensor, idx: torch.Tensor, model_mean: torch.Tensor,
               model_logvar: torch.Tensor) -> torch.Tensor:
        """The VLB term at each example's index in bits/dim (§2.2): ``KL(q(x_{t-1}|x_t,x0) || p)`` for
        index > 0 and the discretised decoder NLL ``-log p(x0|x1)`` at index 0."""
        true_mean, _, true_logvar = self.posterior(x0, x_t, idx)
        kl = mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / LN2
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / LN2
        idx = torch.as_tensor(idx).to(x0.device)
        return torch.where(idx == 0, nll, kl)


# ---- iDDPM loss-aware timestep sampling (§2.2, resample.py) ---------------------------------------

class LossSecondMomentSampler:
    """Importance sampler over indices with ``p_t ∝ sqrt(E[L_t^2])`` over the last ``history`` losses of
    each index, mixed ``0.999 p + 0.001/T``; uniform until every index has a full history.

    The history is method training state (difflab.methods.base, DESIGN.md "Method state"): the functions
    below read and update a state dict ``{"loss_history": [T, history] float64, "loss_counts": [T] int64}``
    that the training loop saves once per checkpoint and updates after each step with the losses of every
    rank (iDDPM's ``update_with_all_losses``), so N ranks keep the history one process would.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        self.num_timesteps = num_timesteps
        self.history = history
        self.uniform_prob = uniform_prob

    def init_state(self) -> dict[str, torch.Tensor]:
        return {"loss_history": torch.zeros(self.num_timesteps, self.history, dtype=torch.float64),
                "loss_counts": torch.zeros(self.num_timesteps, dtype=torch.long)}

    def warmed_up(self, state: dict[str, torch.Tensor]) -> bool:
        return bool((state["loss_counts"] == self.history).all())

    def probabilities(self, state: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """``p_t`` (float64 ``[T]``); uniform without state or before warm-up."""
        T = self.num_timesteps
        if state is None or not self.warmed_up(state):
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        p = (state["loss_history"].to(torch.float64).cpu() ** 2).mean(dim=1).sqrt()
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / T

    def sample(self, u: torch.Tensor, state: dict[str, torch.Tensor] | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices by inverting the CDF at uniforms ``u`` [N]; returns ``(idx, weights = 1/(T p_idx))``."""
        p = self.probabilities(state)
        cdf = p.cumsum(0).to(u.device)
        idx = torch.searchsorted(cdf, u.to(cdf.dtype), right=True).clamp(max=self.num_timesteps - 1)
        weights = 1.0 / (self.num_timesteps * p.to(u.device)[idx])
        return idx, weights.to(torch.float32)

    def update(self, state: dict[str, torch.Tensor], idx: torch.Tensor, losses: torch.Tensor) -> None:
        """Push each example's (unweighted) loss into its index's history, in order (oldest dropped when full)."""
        history, counts = state["loss_history"], state["loss_counts"]
        H = history.shape[1]
        for t, loss in zip(idx.tolist(), losses.detach().to(torch.float64).tolist()):
            n = int(counts[t])
            if n == H:
                history[t, :-1] = history[t, 1:].clone()
                history[t, -1] = loss
            else:
                history[t, n] = loss
                counts[t] = n + 1
