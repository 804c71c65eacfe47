"""One schedule/SDE object per Gaussian process (DESIGN.md "Schedules"; specs/gaussian_and_dddm.md §1, §4.1, §5.4).

Every Gaussian method is the family ``x_t = s(t) (x0 + sigma(t) n)``. A :class:`GaussianSDE` carries
``sigma(t)``, its inverse and derivative, ``s(t)`` and its derivative; everything else follows from them:

* marginal ``p(x_t | x0) = N(s x0, (s sigma)^2 I)``;
* the forward SDE ``dx = f(x, t) dt + g(t) dw`` with ``f = (s'/s) x`` and ``g^2 = 2 s^2 sigma sigma'``
  (the variance ODE ``d var/dt = 2 (s'/s) var + g^2`` of ``var = s^2 sigma^2``);
* reverse SDE ``dx = [f - g^2 score] dt + g dw_bar`` and probability-flow ODE ``dx/dt = f - g^2 score / 2``;
* the prior at ``t_max`` (sampling and log-density) and ``discretize`` (one step of the discrete chain).

Nothing else in difflab writes sigma(t). Time runs over ``[0, t_max]``; ``t_eps`` is the sampling floor.
All maths is float64 on the CPU unless the caller's tensors say otherwise.
"""

from __future__ import annotations

import math

import torch

from difflab.errors import UserError

Tensor = torch.Tensor
f64 = torch.float64


def _t(x) -> Tensor:
    """A float tensor: floating tensors as they are, integer tensors and Python numbers as float64 (a 0-dim
    float64 tensor does not promote a float32 batch it is combined with)."""
    if isinstance(x, Tensor):
        return x if x.is_floating_point() else x.to(f64)
    return torch.as_tensor(x, dtype=f64)


def _rows(v: Tensor, x: Tensor) -> Tensor:
    """Broadcast a scalar or per-row ``[N]`` tensor against ``x`` ``[N, ...]``."""
    return _t(v).to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class GaussianSDE:
    """Base class: subclasses define ``sigma``, ``sigma_inv``, ``sigma_deriv``, ``s`` and ``s_deriv``.

    ``N`` is the number of discretisation levels used by :meth:`discretize` and the PC sampler's grid
    (score SDE's ``sde.N``); :meth:`with_steps` returns a copy with another ``N``.
    """

    name = "sde"
    t_max: float = 1.0  # T: the prior lives here
    t_eps: float = 1e-5  # sampling / likelihood floor (score SDE's eps)
    t_train_eps: float = 1e-5  # t ~ U(t_train_eps, t_max) in continuous DSM training
    prior_std: float = 1.0
    N: int = 1000

    # ---- to implement ---------------------------------------------------------------------
    def sigma(self, t) -> Tensor:
        raise NotImplementedError

    def sigma_inv(self, sigma) -> Tensor:
        raise NotImplementedError

    def sigma_deriv(self, t) -> Tensor:
        raise NotImplementedError

    def s(self, t) -> Tensor:
        t = _t(t)
        return torch.ones_like(t)

    def s_deriv(self, t) -> Tensor:
        t = _t(t)
        return torch.zeros_like(t)

    # ---- derived ------------------------------------------------------------------------------
    def with_steps(self, N: int) -> GaussianSDE:
        import copy

        other = copy.copy(self)
        other.N = int(N)
        return other

    def marginal(self, x0: Tensor, t) -> tuple[Tensor, Tensor]:
        """Mean and std of ``p(x_t | x0)``: ``(s x0, s sigma)`` (std broadcast per row)."""
        s, sig = self.s(t), self.sigma(t)
        return _rows(s, x0) * x0, _rows(s * sig, x0)

    def drift(self, x: Tensor, t) -> Tensor:
        """``f(x, t) = (s'/s) x``."""
        return _rows(self.s_deriv(t) / self.s(t), x) * x

    def diffusion(self, t) -> Tensor:
        """``g(t) = s sqrt(2 sigma sigma')``."""
        s, sig, dsig = self.s(t), self.sigma(t), self.sigma_deriv(t)
        return s * (2 * sig * dsig).clamp(min=0).sqrt()

    def score(self, denoise, x: Tensor, t) -> Tensor:
        """``grad log p_t(x)`` from a VE-form denoiser ``D(x/s, sigma) = E[x0 | x]``:
        ``(D(x/s) - x/s) / (sigma^2 s)`` (§1: score = (a x0_hat - x)/b^2 with a = s, b = s sigma)."""
        s, sig = _rows(self.s(t), x), self.sigma(t)
        xt = x / s
        return (denoise(xt, sig) - xt) / (_rows(sig, x) ** 2 * s)

    def reverse_drift(self, x: Tensor, t, score: Tensor) -> Tensor:
        """Reverse-SDE drift ``f - g^2 score``."""
        return self.drift(x, t) - _rows(self.diffusion(t) ** 2, x) * score

    def ode_drift(self, x: Tensor, t, score: Tensor) -> Tensor:
        """Probability-flow ODE ``dx/dt = f - g^2 score / 2``."""
        return self.drift(x, t) - 0.5 * _rows(self.diffusion(t) ** 2, x) * score

    # ---- prior ------------------------------------------------------------------------------
    prior_mean: Tensor | float = 0.0  # per-channel data mean for the rewrite's prior option (§4.8)

    def prior_sample(self, z: Tensor) -> Tensor:
        """Unit Gaussian ``z`` -> a sample of the prior ``N(prior_mean, prior_std^2 I)``."""
        return _t(self.prior_mean).to(z.device) + self.prior_std * z

    def prior_logp(self, x: Tensor) -> Tensor:
        """Per-row log-density of the prior, in nats."""
        d = x[0].numel()
        z = (x - _t(self.prior_mean).to(x.device)) / self.prior_std
        return -0.5 * d * math.log(2 * math.pi * self.prior_std**2) - 0.5 * z.flatten(1).pow(2).sum(1)

    # ---- discretisation -------------------------------------------------------------------------
    def level(self, t) -> Tensor:
        """Discrete level ``k = floor(t (N - 1) / T)`` of time ``t`` (score SDE's ``timestep``)."""
        return (_t(t) * (self.N - 1) / self.t_max).long()

    def discretize(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        """One step of the discrete chain, ``x_{k+1} = x_k + f + G z`` (default: Euler-Maruyama with
        ``dt = T / N``); VE and VP override it with the SMLD and DDPM chains (§4.1)."""
        dt = self.t_max / self.N
        return self.drift(x, t) * dt, _rows(self.diffusion(t) * math.sqrt(dt), x)

    def langevin_alpha(self, t) -> Tensor:
        """``alpha_k`` of the Langevin corrector's step size (§4.5): 1 unless VP-type."""
        return torch.ones_like(_t(t))

    # ---- description ----------------------------------------------------------------------
    @property
    def sigma_min(self) -> float:
        return float(self.sigma(self.t_eps))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(self.t_max))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(N={self.N})"


class _VEType(GaussianSDE):
    """``s = 1``: discretisation levels ``sigma_k = sigma(k / (N-1))``, the SMLD chain (§4.1)."""

    def discretize(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        """SMLD step: ``f = 0``, ``G = sqrt(sigma_k^2 - sigma_{k-1}^2)`` with ``sigma_{-1} = 0``."""
        k = self.level(t)
        sig = self.sigma(k.to(f64) * self.t_max / (self.N - 1))
        adj = torch.where(k > 0, self.sigma((k - 1).clamp(min=0).to(f64) * self.t_max / (self.N - 1)),
                          torch.zeros_like(sig))
        return torch.zeros_like(x), _rows((sig**2 - adj**2).sqrt(), x)

    def ancestral_step(self, t) -> tuple[Tensor, Tensor]:
        """``(sigma_k, sigma_{k-1})`` of the level holding ``t`` (the VE ancestral predictor)."""
        k = self.level(t)
        sig = self.sigma(k.to(f64) * self.t_max / (self.N - 1))
        adj = torch.where(k > 0, self.sigma((k - 1).clamp(min=0).to(f64) * self.t_max / (self.N - 1)),
                          torch.zeros_like(sig))
        return sig, adj


class VESDE(_VEType):
    """Score SDE's variance-exploding SDE (§4.1): ``sigma(t) = smin (smax/smin)^t``, ``s = 1``, drift 0,
    ``g = sigma sqrt(2 ln(smax/smin))``, prior ``N(0, smax^2 I)`` (the marginal keeps no smin^2 offset)."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        self.smin, self.smax, self.N = float(sigma_min), float(sigma_max), int(N)
        self.log_ratio = math.log(self.smax / self.smin)
        self.prior_std = self.smax

    def sigma(self, t) -> Tensor:
        return self.smin * torch.exp(_t(t) * self.log_ratio)

    def sigma_inv(self, sigma) -> Tensor:
        return torch.log(_t(sigma) / self.smin) / self.log_ratio

    def sigma_deriv(self, t) -> Tensor:
        return self.sigma(t) * self.log_ratio


class EDMSDE(_VEType):
    """EDM's process ``s = 1``, ``dx = sqrt(2 sigma sigma') dw`` (§5.3), timed so that a uniform grid in
    ``t`` is the Karras rho-grid: ``sigma(t) = (smin^(1/rho) + t (smax^(1/rho) - smin^(1/rho)))^rho``."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, N: int = 18):
        self.smin, self.smax, self.rho, self.N = float(sigma_min), float(sigma_max), float(rho), int(N)
        self.a, self.b = self.smin ** (1 / self.rho), self.smax ** (1 / self.rho)
        self.prior_std = self.smax
        self.t_eps = 0.0

    def sigma(self, t) -> Tensor:
        return (self.a + _t(t) * (self.b - self.a)) ** self.rho

    def sigma_inv(self, sigma) -> Tensor:
        return (_t(sigma) ** (1 / self.rho) - self.a) / (self.b - self.a)

    def sigma_deriv(self, t) -> Tensor:
        return self.rho * (self.a + _t(t) * (self.b - self.a)) ** (self.rho - 1) * (self.b - self.a)


class LinearVE(GaussianSDE):
    """``sigma(t) = t``, ``s = 1``: EDM's own ODE time (§5.4 schedule "linear")."""

    name = "linear"

    def __init__(self, sigma_max: float = 80.0):
        self.t_max = self.prior_std = float(sigma_max)
        self.t_eps = 0.0

    def sigma(self, t) -> Tensor:
        return _t(t).clone()

    def sigma_inv(self, sigma) -> Tensor:
        return _t(sigma).clone()

    def sigma_deriv(self, t) -> Tensor:
        return torch.ones_like(_t(t))


class SqrtVE(GaussianSDE):
    """``sigma(t) = sqrt(t)``, ``s = 1``: the VE time of EDM's ablation sampler (§5.4 schedule "ve")."""

    name = "sqrt-ve"

    def __init__(self, sigma_max: float = 100.0):
        self.t_max = float(sigma_max) ** 2
        self.prior_std = float(sigma_max)
        self.t_eps = 0.0

    def sigma(self, t) -> Tensor:
        return _t(t).sqrt()

    def sigma_inv(self, sigma) -> Tensor:
        return _t(sigma) ** 2

    def sigma_deriv(self, t) -> Tensor:
        return 0.5 / _t(t).sqrt()


def _vp_log_mean(t: Tensor, beta_min: float, beta_d: float) -> Tensor:
    """``ln m(t) = -t^2 beta_d / 4 - t beta_min / 2`` (§4.1), ``beta_d = beta_max - beta_min``."""
    return -0.25 * t**2 * beta_d - 0.5 * t * beta_min


def _vp_t_from_log_mean(log_m: Tensor, beta_min: float, beta_d: float) -> Tensor:
    """Inverse of :func:`_vp_log_mean` (the positive root)."""
    if beta_d == 0:
        return -2 * log_m / beta_min
    return ((beta_min**2 - 4 * beta_d * log_m).sqrt() - beta_min) / beta_d


class _VPType(GaussianSDE):
    """``beta(t) = bmin + t (bmax - bmin)``, mean coefficient ``m(t)``; prior N(0, I); DDPM-chain levels
    ``beta_k = linspace(bmin/N, bmax/N, N)``."""

    t_eps = 1e-3
    prior_std = 1.0

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        self.beta_min, self.beta_max, self.N = float(beta_min), float(beta_max), int(N)
        self.beta_d = self.beta_max - self.beta_min

    def beta(self, t) -> Tensor:
        return self.beta_min + _t(t) * self.beta_d

    def log_mean(self, t) -> Tensor:
        return _vp_log_mean(_t(t), self.beta_min, self.beta_d)

    def s(self, t) -> Tensor:
        return self.log_mean(t).exp()

    def s_deriv(self, t) -> Tensor:
        return -0.5 * self.beta(t) * self.s(t)

    def discrete_betas(self) -> Tensor:
        """The DDPM chain of N levels, ``beta_k = linspace(bmin/N, bmax/N, N)`` (§4.1)."""
        if self.beta_max / self.N >= 1:
            raise UserError(f"--steps {self.N}: the VP chain's beta_max/N = {self.beta_max / self.N:.3g} is >= 1; "
                            f"use at least {math.floor(self.beta_max) + 1} steps")
        return torch.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N, dtype=f64)

    def langevin_alpha(self, t) -> Tensor:
        return 1 - self.discrete_betas()[self.level(t)]


class VPSDE(_VPType):
    """Variance-preserving SDE (§4.1; EDM's VP, §5.1): ``s = m(t)``,
    ``sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)``, drift ``-beta x/2``, ``g = sqrt(beta)``."""

    name = "vp"

    def sigma(self, t) -> Tensor:
        t = _t(t)
        return torch.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t).sqrt()

    def sigma_inv(self, sigma) -> Tensor:
        return _vp_t_from_log_mean(-0.5 * torch.log1p(_t(sigma) ** 2), self.beta_min, self.beta_d)

    def sigma_deriv(self, t) -> Tensor:
        sig = self.sigma(t)
        return 0.5 * self.beta(t) * (sig + 1 / sig)

    def discretize(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        """DDPM step (§4.1): ``f = (sqrt(1 - beta_k) - 1) x``, ``G = sqrt(beta_k)``."""
        beta = self.discrete_betas()[self.level(t)]
        return _rows((1 - beta).sqrt() - 1, x) * x, _rows(beta.sqrt(), x)

    def ancestral_betas(self, t) -> Tensor:
        return self.discrete_betas()[self.level(t)]

    @classmethod
    def fit(cls, sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3, N: int = 1000) -> VPSDE:
        """EDM's ablation refit (§5.4): betas such that ``sigma(epsilon_s) = sigma_min`` and
        ``sigma(1) = sigma_max``."""
        beta_d = 2 * (math.log(sigma_min**2 + 1) / epsilon_s - math.log(sigma_max**2 + 1)) / (epsilon_s - 1)
        beta_min = math.log(sigma_max**2 + 1) - 0.5 * beta_d
        sde = cls(beta_min, beta_min + beta_d, N)
        sde.t_eps = epsilon_s
        return sde


class SubVPSDE(_VPType):
    """Sub-VP SDE (§4.1): drift as VP, ``g^2 = beta (1 - exp(-2 bmin t - (bmax - bmin) t^2))``, std ``1 - m^2``;
    here ``s = m`` and ``sigma = (1 - m^2)/m``."""

    name = "subvp"

    def sigma(self, t) -> Tensor:
        log_m = self.log_mean(t)
        return -torch.expm1(2 * log_m) / log_m.exp()

    def sigma_inv(self, sigma) -> Tensor:
        sigma = _t(sigma)
        m = 2 / (sigma + (sigma**2 + 4).sqrt())  # the positive root of m^2 + sigma m - 1 = 0
        return _vp_t_from_log_mean(m.log(), self.beta_min, self.beta_d)

    def sigma_deriv(self, t) -> Tensor:
        m = self.s(t)
        return 0.5 * self.beta(t) * (1 / m + m)


class DiscreteSDE(GaussianSDE):
    """The discrete DDPM ᾱ table as a process (§1, §2.1): index time ``t`` in ``[0, T-1]``,
    ``sigma_i = sqrt((1 - abar_i)/abar_i)`` at the table points and piecewise-linear in ``ln sigma`` between
    them, ``s = sqrt(abar) = 1/sqrt(1 + sigma^2)``, prior N(0, I). ``discretize`` is the DDPM chain through
    ``N`` evenly spaced levels (the table itself when ``N = T``)."""

    name = "discrete"
    t_eps = 0.0
    t_train_eps = 0.0
    prior_std = 1.0

    def __init__(self, sigmas: Tensor, N: int | None = None):
        self.table = _t(sigmas).to(f64).cpu()
        if not bool((self.table[1:] > self.table[:-1]).all()):  # vacuous for a one-entry table
            raise ValueError("the sigma table must increase with the index")
        self.log_table = self.table.log()
        self.T = len(self.table)
        self.t_max = float(self.T - 1)
        self.N = int(N or self.T)

    @classmethod
    def from_alpha_bar(cls, abar: Tensor, N: int | None = None) -> DiscreteSDE:
        abar = _t(abar).to(f64)
        return cls(((1 - abar) / abar).sqrt(), N)

    def _interp(self, t: Tensor, table: Tensor) -> Tensor:
        t = _t(t)
        shape, dev = t.shape, t.device
        tt = t.detach().to(f64).cpu().reshape(-1).clamp(0, self.t_max)
        lo = tt.floor().long().clamp(max=max(self.T - 2, 0))
        hi = (lo + 1).clamp(max=self.T - 1)
        w = tt - lo.to(f64)
        out = table[lo] * (1 - w) + table[hi] * w
        return out.reshape(shape).to(dev)

    def sigma(self, t) -> Tensor:
        return self._interp(t, self.log_table).exp()

    def sigma_inv(self, sigma) -> Tensor:
        s = _t(sigma)
        shape, dev = s.shape, s.device
        ls = s.detach().to(f64).cpu().reshape(-1).clamp(min=1e-300).log()
        idx = torch.searchsorted(self.log_table, ls).clamp(1, max(self.T - 1, 1))
        lo, hi = self.log_table[idx - 1], self.log_table[idx]
        t = (idx - 1).to(f64) + ((ls - lo) / (hi - lo)).clamp(0, 1)
        t = torch.where(ls <= self.log_table[0], torch.zeros_like(t), t)
        t = torch.where(ls >= self.log_table[-1], torch.full_like(t, self.t_max), t)
        return t.reshape(shape).to(dev)

    def sigma_deriv(self, t) -> Tensor:
        t = _t(t)
        tt = t.detach().to(f64).cpu().reshape(-1).clamp(0, self.t_max)
        lo = tt.floor().long().clamp(max=max(self.T - 2, 0))
        slope = (self.log_table[(lo + 1).clamp(max=self.T - 1)] - self.log_table[lo])
        return (self.sigma(t).reshape(-1).cpu() * slope).reshape(t.shape).to(t.device)

    def s(self, t) -> Tensor:
        return 1 / (1 + self.sigma(t) ** 2).sqrt()

    def s_deriv(self, t) -> Tensor:
        sig = self.sigma(t)
        return -sig * self.sigma_deriv(t) * self.s(t) ** 3

    def level_betas(self) -> Tensor:
        """Betas of the chain through ``N`` evenly spaced levels ``tau_j = j (T-1)/(N-1)``:
        ``beta_j = 1 - abar(tau_j)/abar(tau_{j-1})`` (``abar(tau_{-1}) = 1``); the table's own betas at N = T."""
        tau = torch.linspace(0, self.t_max, self.N, dtype=f64)  # [0] for N = 1
        abar = 1 / (1 + self.sigma(tau) ** 2)
        prev = torch.cat([torch.ones(1, dtype=f64), abar[:-1]])
        return 1 - abar / prev

    def discretize(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        """DDPM step at level ``k``: ``f = (sqrt(1 - beta_k) - 1) x``, ``G = sqrt(beta_k)``."""
        beta = self.level_betas()[self.level(t)]
        return _rows((1 - beta).sqrt() - 1, x) * x, _rows(beta.sqrt(), x)

    def ancestral_betas(self, t) -> Tensor:
        return self.level_betas()[self.level(t)]

    def langevin_alpha(self, t) -> Tensor:
        return 1 - self.level_betas()[self.level(t)]


class VPScaling(GaussianSDE):
    """Any ``sigma(t)`` with the VP scaling ``s = 1/sqrt(1 + sigma^2)`` (§5.4 scaling "vp")."""

    def __init__(self, base: GaussianSDE):
        self.base = base
        self.name, self.t_max, self.t_eps, self.N = f"{base.name}+vp-scaling", base.t_max, base.t_eps, base.N

    def sigma(self, t) -> Tensor:
        return self.base.sigma(t)

    def sigma_inv(self, sigma) -> Tensor:
        return self.base.sigma_inv(sigma)

    def sigma_deriv(self, t) -> Tensor:
        return self.base.sigma_deriv(t)

    def s(self, t) -> Tensor:
        return 1 / (1 + self.sigma(t) ** 2).sqrt()

    def s_deriv(self, t) -> Tensor:
        return -self.sigma(t) * self.sigma_deriv(t) * self.s(t) ** 3


class NoScaling(GaussianSDE):
    """Any ``sigma(t)`` with ``s = 1`` (§5.4 scaling "none")."""

    def __init__(self, base: GaussianSDE):
        self.base = base
        self.name, self.t_max, self.t_eps, self.N = f"{base.name}+no-scaling", base.t_max, base.t_eps, base.N
        self.prior_std = base.sigma_max

    def sigma(self, t) -> Tensor:
        return self.base.sigma(t)

    def sigma_inv(self, sigma) -> Tensor:
        return self.base.sigma_inv(sigma)

    def sigma_deriv(self, t) -> Tensor:
        return self.base.sigma_deriv(t)


def ablation_sde(schedule: str, scaling: str, sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3
                 ) -> GaussianSDE:
    """The process of EDM's ablation sampler (§5.4) from its ``schedule`` and ``scaling`` options."""
    if schedule == "vp":
        base: GaussianSDE = VPSDE.fit(sigma_min, sigma_max, epsilon_s)
    elif schedule == "ve":
        base = SqrtVE(sigma_max)
    elif schedule == "linear":
        base = LinearVE(sigma_max)
    else:
        raise ValueError(f"schedule must be vp, ve or linear, got {schedule!r}")
    if scaling == "vp":
        return VPScaling(base)
    if scaling == "none":
        return NoScaling(base)
    raise ValueError(f"scaling must be vp or none, got {scaling!r}")


SDES = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE, "edm": EDMSDE}
