"""DDPM / iDDPM / DDIM sampling on Gaussian data against the exact law of a linear-Gaussian chain
(specs/gaussian_and_dddm.md §2.1-2.3, §3, §7 A).

With data N(mu, s^2 I) and the exact posterior-mean network, every sampler step is affine in the state and in
the injected noise, so the mean and variance of each step's state follow in closed form. The recursions below
are written in numpy float64 from the spec's equations (schedules, posterior, respacing, learned range, DDIM),
never through the library's tables. Unlike point-mass data (which returns x* whatever the variance), these
moments see every variance path: a doubled or dropped DDIM noise, a var_type ignored at sampling, a respaced
chain that keeps the unrespaced variances, a learned-range head read backwards.

Sample sizes: n x 4 = 32000 values per step, so the standard error of a variance is sqrt(2/32000) = 0.79% of
it and of a mean sqrt(v/8000); the tolerances are 5 standard errors. The smallest planted-bug effect among the
cases (fixedsmall vs fixedlarge on the full cosine chain, computed with these recursions) is 8.4% of the final
variance = 10.6 se; the others are 15% to 300%.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from difflab.methods.gaussian.ddpm import DDPMMethod
from difflab.rng import StackedRandomGenerator
from tests.test_ddpm_samplers import MU, BatchRNG, OracleNet, S, gaussian_x0, make

T = 100
N_SAMPLES = 8000
MU_NP = MU.flatten().numpy()


# ---- the spec's tables in numpy ----------------------------------------------------------------------

def spec_betas(schedule: str, T: int = T) -> np.ndarray:
    """§2.1: linear(1e-4, 0.02) scaled by 1000/T; cosine beta_i = min(1 - f((i+1)/T)/f(i/T), 0.999)."""
    if schedule == "linear":
        return np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    f = lambda u: np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    i = np.arange(T)
    return np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999)


def respaced(abar: np.ndarray, kept: list[int]) -> np.ndarray:
    """§2.3: beta'_k = 1 - abar_{K_k}/abar_{K_{k-1}}, abar before the first kept index = 1."""
    a = abar[kept]
    return 1 - a / np.append(1.0, a[:-1])


def posterior_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """§2.1: abar, beta~_t = beta_t (1 - abar_{t-1})/(1 - abar_t) and the posterior-mean coefficients."""
    abar = np.cumprod(1 - betas)
    prev = np.append(1.0, abar[:-1])
    return {"beta": betas, "abar": abar, "beta_tilde": betas * (1 - prev) / (1 - abar),
            "c_x0": betas * np.sqrt(prev) / (1 - abar), "c_xt": (1 - prev) * np.sqrt(1 - betas) / (1 - abar)}


def oracle_gain(abar_t: float) -> tuple[float, float]:
    """§7 A: x0_hat = mu + g (x - a mu) with a = sqrt(abar), g = a s^2/(a^2 s^2 + 1 - a^2)."""
    a = math.sqrt(abar_t)
    return a, a * S**2 / (abar_t * S**2 + 1 - abar_t)


def step_variance(tab: dict[str, np.ndarray], k: int, var_type: str, head: float | None) -> float:
    """§2.3 fixedlarge = beta, fixedsmall = beta~; §2.2 learned range: frac log beta + (1 - frac) log beta~."""
    if var_type == "fixedlarge":
        return float(tab["beta"][k])
    if var_type == "fixedsmall":
        return float(tab["beta_tilde"][k])
    frac = (head + 1) / 2
    return math.exp(frac * math.log(tab["beta"][k]) + (1 - frac) * math.log(tab["beta_tilde"][k]))


def ancestral_moments(schedule: str, kept: list[int], var_type: str, head: float | None = None,
                      planted_bug: str | None = None):
    """Mean [4] and variance of the state entering each step (x_T first), then of the output.
    x_{k-1} = c_x0 x0_hat + c_xt x_k + sqrt(var_k) z, no noise at the last step.
    ``planted_bug="unrespaced"`` takes the variances from the original table (for the self-check below)."""
    betas = spec_betas(schedule)
    abar_full = np.cumprod(1 - betas)
    tab = posterior_tables(respaced(abar_full, kept))
    var_tab = posterior_tables(betas[kept]) if planted_bug == "unrespaced" else tab
    m, v, seen = np.zeros(4), 1.0, []
    for k in reversed(range(len(kept))):
        seen.append((m.copy(), v))
        a, g = oracle_gain(tab["abar"][k])
        A, B = tab["c_x0"][k] * g + tab["c_xt"][k], tab["c_x0"][k] * MU_NP * (1 - g * a)
        m, v = A * m + B, A * A * v
        if k > 0:
            v += step_variance(var_tab, k, var_type, head)
    return seen, (m, v)


def ddim_moments(schedule: str, seq: list[int], eta: float, noise_scale: float = 1.0):
    """§3: x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - abar_t/abar_s)(1 - abar_s)/(1 - abar_t)), abar_s = 1 after the first kept index.
    ``noise_scale`` 0 or 2 drops or doubles the sigma z term (for the self-check below)."""
    abar = np.cumprod(1 - spec_betas(schedule))
    m, v, seen = np.zeros(4), 1.0, []
    for k in reversed(range(len(seq))):
        seen.append((m.copy(), v))
        ab_t = abar[seq[k]]
        ab_s = abar[seq[k - 1]] if k > 0 else 1.0
        a, g = oracle_gain(ab_t)
        b = math.sqrt(1 - ab_t)
        sigma = eta * math.sqrt((1 - ab_t / ab_s) * (1 - ab_s) / (1 - ab_t))
        c = math.sqrt(1 - ab_s - sigma**2)
        # x0_hat = mu (1 - g a) + g x and eps_hat = (1 - a g)(x - a mu)/b... both affine in x
        A = math.sqrt(ab_s) * g + c * (1 - a * g) / b
        B = (math.sqrt(ab_s) - c * a / b) * MU_NP * (1 - g * a)
        m, v = A * m + B, A * A * v + (noise_scale * sigma) ** 2
    return seen, (m, v)


def spec_respacing(n: int) -> list[int]:
    """§2.3 "N" on one section: round(j (T - 1)/(N - 1))."""
    return sorted({round(j * (T - 1) / (n - 1)) for j in range(n)})


def spec_quad(steps: int) -> list[int]:
    """§3 quad: int(linspace(0, sqrt(0.8 T), S)^2)."""
    return sorted({int(v) for v in np.linspace(0, math.sqrt(0.8 * T), steps) ** 2})


# ---- the check -----------------------------------------------------------------------------------------

class RecordingOracle(OracleNet):
    """The exact Gaussian-data network that also records the state fed to it at each step."""

    def __init__(self, method, head=None):
        super().__init__(method, gaussian_x0, head)
        self.states = []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        self.states.append(x.detach().to(torch.float64).reshape(x.shape[0], -1).numpy().copy())
        return super().forward(x, noise_labels, class_labels, augment_labels, context)


def assert_moments(x: np.ndarray, m: np.ndarray, v: float, what: str) -> None:
    """Sample mean per dimension, the pooled variance about the predicted mean and the off-diagonal
    covariances (0: the dimensions are independent), each within 5 standard errors."""
    n = x.shape[0]
    dev = x - m
    assert np.abs(dev.mean(0)).max() < 5 * math.sqrt(v / n), (what, dev.mean(0), v)
    emp = float((dev**2).mean())
    assert abs(emp - v) < 5 * v * math.sqrt(2 / dev.size), (what, emp, v)
    cov = dev.T @ dev / n
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 5 * v / math.sqrt(n), (what, cov)


def run_and_check(seen, final, method_kw: dict, sample_kw: dict, head=None, seed=0):
    m = make(gaussian_x0, head=head, num_timesteps=T, **method_kw)
    m.net = RecordingOracle(m, head)
    out = m.sample(BatchRNG(N_SAMPLES, seed=seed), **sample_kw).to(torch.float64).reshape(N_SAMPLES, -1).numpy()
    states = m.net.states
    assert len(states) == len(seen)
    for k, (x, (mean, var)) in enumerate(zip(states, seen)):
        assert_moments(x, mean, var, f"state before step {k}")
    assert_moments(out, *final, "output")
    return final


ANCESTRAL = [  # (schedule, respacing steps or None, method var_type, sampling var_type override)
    ("linear", None, "fixedlarge", None),
    ("cosine", None, "fixedsmall", None),
    ("linear", None, "fixedlarge", "fixedsmall"),  # var_type given when sampling wins over the trained one
    ("cosine", None, "fixedsmall", "fixedlarge"),
    ("linear", 10, "fixedlarge", None),
    ("cosine", 10, "fixedsmall", None),
    ("linear", 10, "fixedlarge", "fixedsmall"),
]


@pytest.mark.parametrize("schedule,steps,var_type,override", ANCESTRAL,
                         ids=lambda v: str(v))
def test_ancestral_fixed_variances_follow_the_closed_form(schedule, steps, var_type, override):
    kept = spec_respacing(steps) if steps else list(range(T))
    seen, final = ancestral_moments(schedule, kept, override or var_type)
    sample_kw = {"sampler": "ancestral", "steps": steps}
    if override:
        sample_kw["var_type"] = override
    run_and_check(seen, final, {"schedule": schedule, "var_type": var_type}, sample_kw, seed=1)


@pytest.mark.parametrize("schedule,steps,head", [("linear", None, 0.6), ("cosine", None, -0.5),
                                                 ("linear", 10, -0.5), ("cosine", 10, 0.6)])
def test_ancestral_learned_range_follows_the_closed_form(schedule, steps, head):
    """iDDPM's learned range with a constant head v: on a respaced chain both ends of the range are the
    respaced chain's beta' and beta~' (§2.3), not the original table's."""
    kept = spec_respacing(steps) if steps else list(range(T))
    seen, final = ancestral_moments(schedule, kept, "learned", head)
    run_and_check(seen, final, {"schedule": schedule, "learn_sigma": True},
                  {"sampler": "ancestral", "steps": steps}, head=head, seed=2)


@pytest.mark.parametrize("schedule,sampler,skip,steps,eta", [
    ("linear", "ddim", "uniform", 10, 0.0), ("linear", "ddim", "uniform", 10, 0.5),
    ("cosine", "ddim", "uniform", 20, 1.0), ("linear", "ddim", "quad", 10, 1.0),
    ("cosine", "deterministic", None, 10, None)])
def test_ddim_follows_the_closed_form(schedule, sampler, skip, steps, eta):
    """DDIM(eta) on uniform (range(0, T, T // S)) and quad subsequences; 'deterministic' is eta = 0 on the
    respaced ancestral chain."""
    if sampler == "deterministic":
        seq = spec_respacing(steps)
    else:
        seq = list(range(0, T, T // steps)) if skip == "uniform" else spec_quad(steps)
    seen, final = ddim_moments(schedule, seq, eta or 0.0)
    kw = {"sampler": sampler, "steps": steps}
    if sampler == "ddim":
        kw.update(eta=eta, skip=skip)
    run_and_check(seen, final, {"schedule": schedule}, kw, seed=3)


def test_the_closed_form_sees_the_planted_bugs():
    """The recursions separate each planted variance bug from the right law by at least 10 standard errors of
    the checks above (2 tolerances) at some step: otherwise those checks could not fail."""
    full, kept, seq = list(range(T)), spec_respacing(10), list(range(0, T, 10))
    tol = 5 * math.sqrt(2 / (4 * N_SAMPLES))

    def worst(a, b):
        return max(abs(va - vb) / va for (_, va), (_, vb) in zip(a[0] + [a[1]], b[0] + [b[1]]))

    for schedule in ("linear", "cosine"):
        pairs = [(ancestral_moments(schedule, chain, "fixedsmall"), ancestral_moments(schedule, chain, "fixedlarge"))
                 for chain in (full, kept)]  # var_type ignored
        pairs += [(ancestral_moments(schedule, kept, vt, 0.6), ancestral_moments(schedule, kept, vt, 0.6,
                                                                                 planted_bug="unrespaced"))
                  for vt in ("fixedlarge", "fixedsmall", "learned")]  # respaced chain, original variances
        pairs.append((ancestral_moments(schedule, kept, "learned", 0.6),
                      ancestral_moments(schedule, kept, "learned", -0.6)))  # head read backwards
        for eta in (0.5, 1.0):
            pairs += [(ddim_moments(schedule, seq, eta), ddim_moments(schedule, seq, eta, noise_scale))
                      for noise_scale in (0.0, 2.0)]  # DDIM noise dropped or doubled
        for a, b in pairs:
            assert worst(a, b) > 2 * tol


# ---- the iDDPM objective by hand (§2.2) -------------------------------------------------------------------

class ConstantOutput(nn.Module):
    """eps_hat = 0.1 everywhere and (with a variance head) v = 0.3."""

    def __init__(self, learn_sigma: bool):
        super().__init__()
        self.learn_sigma = learn_sigma

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        out = [torch.full_like(x, 0.1)] + ([torch.full_like(x, 0.3)] if self.learn_sigma else [])
        return torch.cat(out, dim=1)


def _tanh_cdf(z):
    return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


def vb_bits(x0, x_t, i, x0_hat, model_logvar, tab) -> float:
    """L_{t-1} = KL(q(x_{t-1}|x_t, x0) || N(mean(x0_hat), e^logvar)) for i > 0, the discretised decoder NLL
    (bins of half-width 1/255, open end bins, tanh CDF) for i = 0; mean over dims, in bits (§2.2)."""
    mean = lambda x: tab["c_x0"][i] * x + tab["c_xt"][i] * x_t
    m_true, m_model = mean(x0), mean(x0_hat)
    if i > 0:
        lv_true = math.log(tab["beta_tilde"][i])
        kl = 0.5 * (-1 + model_logvar - lv_true + np.exp(lv_true - model_logvar)
                    + (m_true - m_model) ** 2 * np.exp(-model_logvar))
        return float(kl.mean() / math.log(2))
    inv_sd = np.exp(-0.5 * model_logvar)
    upper = np.where(x0 > 0.999, 1.0, _tanh_cdf(inv_sd * (x0 - m_model + 1 / 255)))
    lower = np.where(x0 < -0.999, 0.0, _tanh_cdf(inv_sd * (x0 - m_model - 1 / 255)))
    return float(-np.log(upper - lower).mean() / math.log(2))


@pytest.mark.parametrize("loss,learn_sigma,var_type,reduction,lam", [
    ("l2", True, "fixedlarge", "mean", 0.001), ("l2", True, "fixedlarge", "mean", 0.01),
    ("kl", True, "fixedlarge", "mean", 0.001), ("kl", False, "fixedsmall", "mean", 0.001),
    ("l2", True, "fixedlarge", "sum", 0.001), ("l2", False, "fixedlarge", "mean", 0.001)])
def test_ddpm_losses_by_hand(loss, learn_sigma, var_type, reduction, lam):
    """Per example, L_simple = mean (eps - eps_hat)^2; iDDPM's hybrid adds hybrid_lambda T L_t (lambda = 0.001
    gives T/1000; the mean enters detached); 'kl' is T L_t (RESCALED_KL); 'sum' multiplies by the pixel count.
    T = 20 cosine, where T/1000 = 0.05: a factor of T, 1000 or 1 in place of hybrid_lambda T would be 20, 1000
    or 20 times off. Index i and noise n are replayed from each seed (randint then randn, difflab.rng)."""
    Tn = 20
    m = DDPMMethod(ConstantOutput(learn_sigma), 1, 2, num_timesteps=Tn, schedule="cosine", loss=loss,
                   learn_sigma=learn_sigma, var_type=var_type, loss_reduction=reduction, hybrid_lambda=lam)
    seeds = list(range(30)) + [72, 75, 100]  # the last three draw index 0 (the decoder term)
    pix = torch.randint(0, 256, (len(seeds), 1, 2, 2), generator=torch.Generator().manual_seed(0))
    x0 = pix.to(torch.float64) / 127.5 - 1
    got = m.loss(x0, None, StackedRandomGenerator("cpu", seeds)).detach().numpy()

    tab = posterior_tables(spec_betas("cosine", Tn))
    want, indices = [], []
    for k, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        i = int(torch.randint(Tn, (), generator=g))
        n = torch.randn((1, 2, 2), generator=g, dtype=torch.float64).numpy()
        indices.append(i)
        x = x0[k].numpy()
        ab = tab["abar"][i]
        x_t = math.sqrt(ab) * x + math.sqrt(1 - ab) * n
        x0_hat = (x_t - math.sqrt(1 - ab) * 0.1) / math.sqrt(ab)
        log_bt = math.log(tab["beta_tilde"][max(i, 1)])  # beta~ at index 0 is 0: its log reuses index 1
        if learn_sigma:
            frac = (0.3 + 1) / 2
            logvar = frac * math.log(tab["beta"][i]) + (1 - frac) * log_bt
        else:
            logvar = log_bt if var_type == "fixedsmall" else (math.log(tab["beta"][i]) if i > 0 else log_bt)
        vb = vb_bits(x, x_t, i, x0_hat, np.full_like(x, logvar), tab)
        mse = float(((n - 0.1) ** 2).mean())
        if loss == "kl":
            value = Tn * vb
        else:
            value = mse + (lam * Tn * vb if learn_sigma else 0.0)
        want.append(value * (4 if reduction == "sum" else 1))
    assert 0 in indices and len(set(indices)) > 10  # the decoder term and many KL terms are exercised
    np.testing.assert_allclose(got, np.array(want), rtol=1e-9)
