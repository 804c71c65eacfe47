"""DDPM / DDIM samplers and the bits/dim bound against exact oracles (specs/gaussian_and_dddm.md §2.3,
§2.7 checks 2–3, §3 checks 1–3, §7 A and C)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from difflab.errors import UserError
from difflab.methods.gaussian import discrete as dm
from difflab.methods.gaussian.ddpm import DDPMMethod
from difflab.methods.gaussian.samplers import sample_euler, sample_heun
from difflab.nets.unetmini import UNetMini
from difflab.rng import StackedRandomGenerator

f64 = torch.float64
MU = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=f64).reshape(1, 1, 2, 2)
S = 0.5


class BatchRNG:
    """One generator for the whole batch: the StackedRandomGenerator interface, fast for moment tests
    with thousands of samples (per-seed independence is tested separately with the real one)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.device, self.g = n, torch.device("cpu"), torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n

    def randn(self, size, dtype=torch.float32):
        return torch.randn(tuple(size), generator=self.g, dtype=f64).to(dtype)

    def randn_like(self, x):
        return self.randn(x.shape, x.dtype)


class OracleNet(nn.Module):
    """The exact network for data whose posterior mean ``E[x0 | x_t]`` is ``x0_fn(x_t, a, b, labels)``,
    answering in the method's parameterisation; with ``head`` it also outputs a variance head."""

    def __init__(self, method: DDPMMethod, x0_fn, head: float | None = None):
        super().__init__()
        self.method, self.x0_fn, self.head = [method], x0_fn, head

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        m = self.method[0]
        sigma = m.sigma_at(noise_labels.to(f64) * m.num_timesteps / 1000).to(x.dtype).reshape(-1, 1, 1, 1)
        a = (1 / (1 + sigma**2)).sqrt()
        b = sigma * a
        x0 = self.x0_fn(x, a, b, class_labels)
        eps = (x - a * x0) / b
        out = {"eps": eps, "x0": x0, "v": dm.velocity(x0, eps, a, b)}[m.prediction]
        return out if self.head is None else torch.cat([out, torch.full_like(out, self.head)], 1)


def gaussian_x0(x, a, b, labels=None):
    """§7 A: E[x0|x_t] = mu + a s^2/(a^2 s^2 + b^2)(x_t - a mu)."""
    mu = MU.to(x.dtype)
    return mu + a * S**2 / (a**2 * S**2 + b**2) * (x - a * mu)


def point_x0(point):
    return lambda x, a, b, labels=None: point.to(x.dtype).expand_as(x)


def make(x0_fn, head=None, **kw) -> DDPMMethod:
    kw.setdefault("clip_denoised", False)
    m = DDPMMethod(nn.Identity(), 1, 2, **kw)
    m.net = OracleNet(m, x0_fn, head)
    return m


def assert_gaussian_moments(x: torch.Tensor, std_bias: float = 0.0):
    """Sample mean and covariance of ``x`` [N, 4] against N(MU, S^2 I) within Monte-Carlo error."""
    n = x.shape[0]
    x = x.to(f64).flatten(1)
    se_mean = S / math.sqrt(n)
    assert float((x.mean(0) - MU.flatten()).abs().max()) < 4.5 * se_mean
    cov = torch.cov(x.T)
    se_var = S**2 * math.sqrt(2 / n)
    diag, off = cov.diagonal(), cov - torch.diag(cov.diagonal())
    assert float((diag - S**2).abs().max()) < 4.5 * se_var + std_bias
    assert float(off.abs().max()) < 4.5 * S**2 / math.sqrt(n)


# ---- Gaussian data: the samplers reproduce the data distribution -----------------------------------

def test_ancestral_reproduces_gaussian_data():
    m = make(gaussian_x0)
    x = m.sample(BatchRNG(3000, seed=1), sampler="ancestral")
    assert_gaussian_moments(x)


def test_ddim_full_chain_reproduces_gaussian_data():
    m = make(gaussian_x0, schedule="cosine")
    x = m.sample(BatchRNG(3000, seed=2), sampler="deterministic")
    assert_gaussian_moments(x, std_bias=0.01)  # T=1000 Euler bias on std ~0.002 (§3 check 3)


def test_ddim_converges_toward_the_data_std():
    """§3 check 3 [N]: std 0.374 (uniform S=10), 0.473 (S=50), quad 0.425 (S=10); monotone in S."""
    m = make(gaussian_x0)
    stds = {}
    for skip, steps in [("uniform", 10), ("uniform", 50), ("uniform", 100), ("quad", 10)]:
        x = m.sample(BatchRNG(4000, seed=3), sampler="ddim", steps=steps, skip=skip).to(f64).flatten(1)
        stds[skip, steps] = float(x.std(0).mean())
        assert float((x.mean(0) - MU.flatten()).abs().max()) < 4.5 * S / math.sqrt(4000)
    se = 0.5 / math.sqrt(2 * 4 * 4000)
    assert abs(stds["uniform", 10] - 0.374) < 5 * se + 0.002
    assert abs(stds["uniform", 50] - 0.473) < 5 * se + 0.002
    assert abs(stds["quad", 10] - 0.425) < 5 * se + 0.002
    assert stds["uniform", 10] < stds["uniform", 50] < stds["uniform", 100] < S


# ---- DDIM is Euler on the probability-flow ODE in sigma -------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "cosine", "DNS"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_step_equals_euler_step_in_sigma(schedule, prediction):
    """§3: with xb = x/sqrt(abar), the eta=0 update is xb_s = xb_t + (sigma_s - sigma_t)(xb_t - D)/sigma_t."""
    m = make(gaussian_x0, schedule=schedule, prediction=prediction)
    x_t = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=f64)
    sig = m.sigmas()
    for t, s in [(999, 899), (500, 480), (37, 0), (10, 9)]:
        abar_t, abar_s = float(m.process.abar[t]), float(m.process.abar[s])
        x0_hat, eps_hat, _ = m._x0_eps(x_t, t, abar_t, None, False)
        ddim = dm.ddim_step(x0_hat, eps_hat, abar_t, abar_s, 0.0, None)
        xb = x_t / math.sqrt(abar_t)
        D = m.denoise(xb, sig[t])
        euler = math.sqrt(abar_s) * (xb + (sig[s] - sig[t]) * (xb - D) / sig[t])
        torch.testing.assert_close(ddim, euler, rtol=1e-12, atol=1e-12)


def test_ddim_sampler_equals_shared_euler_sampler():
    """The whole DDIM chain is the shared Euler sampler on the σ grid of the kept indices (then σ = 0);
    the VP start x_T = z is the VE start z sqrt(1 + sigma_max^2)."""
    m = make(gaussian_x0)
    seeds = [0, 1, 2]
    x_ddim = m.sample(StackedRandomGenerator("cpu", seeds), sampler="ddim", steps=20)
    seq = list(range(0, 1000, 50))
    sig = m.sigmas()[seq].flip(0)
    grid = torch.cat([sig, torch.zeros(1, dtype=f64)])
    z = StackedRandomGenerator("cpu", seeds).randn([3, 1, 2, 2], dtype=f64)
    latents = z * (1 + sig[0] ** 2).sqrt() / sig[0]
    x_euler = sample_euler(lambda x, s: m.denoise(x, s), latents, grid)
    torch.testing.assert_close(x_ddim.to(f64), x_euler, rtol=1e-6, atol=1e-6)


def test_eta_one_full_chain_is_the_posterior():
    """§3 check 1: DDIM(eta=1) between consecutive indices has variance beta~ and the posterior mean."""
    proc = make(gaussian_x0, schedule="cosine").process
    g = torch.Generator().manual_seed(5)
    x0, x_t = torch.randn(4, 3, generator=g, dtype=f64), torch.randn(4, 3, generator=g, dtype=f64)
    for t in (1, 10, 700, 999):
        ab_t, ab_s = float(proc.abar[t]), float(proc.abar[t - 1])
        sigma2 = (1 - ab_t / ab_s) * (1 - ab_s) / (1 - ab_t)
        assert sigma2 == pytest.approx(float(proc.posterior_variance[t]), rel=1e-10)
        eps = (x_t - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        mean = dm.ddim_step(x0, eps, ab_t, ab_s, 1.0, None)
        torch.testing.assert_close(mean, proc.posterior(x0, x_t, t)[0], rtol=1e-10, atol=1e-12)


# ---- point mass: every sampler returns the point exactly ------------------------------------------

POINT = torch.tensor([0.25, -0.5, 0.75, -1.0], dtype=f64).reshape(1, 1, 2, 2)
CASES = [
    dict(sampler="ancestral"), dict(sampler="ancestral", var_type="fixedsmall"),
    dict(sampler="ancestral", steps=7), dict(sampler="ancestral", respacing="3,5"),
    dict(sampler="ancestral", respacing="ddim10", clip_denoised=True),
    dict(sampler="deterministic"), dict(sampler="deterministic", steps=9),
    dict(sampler="ddim", steps=10), dict(sampler="ddim", steps=7, skip="quad"),
    dict(sampler="ddim", steps=10, eta=1.0), dict(sampler="ddim", steps=13, eta=0.5, clip_denoised=True),
    dict(sampler="euler", steps=8), dict(sampler="heun", steps=6, S_churn=5.0),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_point_mass_every_sampler(kw, prediction):
    m = make(point_x0(POINT), num_timesteps=100, prediction=prediction)
    x = m.sample(StackedRandomGenerator("cpu", [0, 1, 2]), **kw)
    torch.testing.assert_close(x, POINT.float().expand_as(x), rtol=0, atol=2e-6)


def test_sampler_options_are_checked():
    m = make(point_x0(POINT), num_timesteps=100)
    with pytest.raises(UserError, match="rho"):
        m.sample(StackedRandomGenerator("cpu", [0]), sampler="ancestral", rho=7.0)
    with pytest.raises(UserError, match="--sampler"):
        m.sample(StackedRandomGenerator("cpu", [0]), sampler="pndm")
    with pytest.raises(UserError, match="respacing"):
        m.sample(StackedRandomGenerator("cpu", [0]), sampler="ancestral", steps=101)


@pytest.mark.parametrize("head", [-1.0, 0.3, 1.0])
def test_point_mass_learned_variance(head):
    m = make(point_x0(POINT), head=head, num_timesteps=100, learn_sigma=True, schedule="cosine")
    x = m.sample(StackedRandomGenerator("cpu", [0, 1]), sampler="ancestral", steps=25)
    torch.testing.assert_close(x, POINT.float().expand_as(x), rtol=0, atol=2e-6)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_point_mass_shared_sigma_samplers(solver):
    """The EDM-form denoiser lets the shared samplers run a DDPM model; they end on the point too."""
    m = make(point_x0(POINT), num_timesteps=100)
    grid = torch.cat([m.sigmas().flip(0)[::9], torch.zeros(1, dtype=f64)])
    z = StackedRandomGenerator("cpu", [0, 1]).randn([2, 1, 2, 2], dtype=f64)
    x = sample_heun(lambda x, s: m.denoise(x, s), z, grid, solver=solver)
    torch.testing.assert_close(x, POINT.expand_as(x), rtol=0, atol=1e-10)


CLASS_POINTS = torch.linspace(-0.5, 0.5, 3, dtype=f64).reshape(3, 1, 1, 1).expand(3, 1, 2, 2)
NULL_POINT = torch.full((1, 1, 2, 2), 0.1, dtype=f64)


def class_point_method() -> DDPMMethod:
    """Class c is the point P_c, the null label (-1) the point P_u."""

    def x0_fn(x, a, b, labels):
        table = torch.cat([CLASS_POINTS, NULL_POINT])  # label -1 reads the last row
        return table[labels].to(x.dtype)

    m = DDPMMethod(nn.Identity(), 1, 2, label_dim=3, num_timesteps=100, clip_denoised=False)
    m.net = OracleNet(m, x0_fn)
    return m


def test_classifier_free_guidance_mixes_with_the_null_label():
    """Guided samples land exactly on P_u + w (P_c - P_u) for every sampler (eps is linear in x0 at
    fixed x_t)."""
    m, points, null = class_point_method(), CLASS_POINTS, NULL_POINT
    labels = torch.tensor([0, 2, 1])
    for w in (1.0, 2.5):
        want = null + w * (points[labels] - null)
        for kw in (dict(sampler="ancestral", steps=10), dict(sampler="ddim", steps=10, eta=0.3)):
            x = m.sample(StackedRandomGenerator("cpu", [5, 6, 7]), class_labels=labels, guidance=w, **kw)
            torch.testing.assert_close(x, want.float(), rtol=0, atol=1e-5)


def test_conditional_model_without_labels_draws_a_class_per_seed():
    m = class_point_method()
    seeds = list(range(8))
    x = m.sample(StackedRandomGenerator("cpu", seeds), sampler="ddim", steps=5)
    rng = StackedRandomGenerator("cpu", seeds)
    rng.randn([8, 1, 2, 2], dtype=f64)  # the initial noise comes first, then the class
    labels = rng.randint(3, [8])
    assert len(set(labels.tolist())) > 1
    torch.testing.assert_close(x, CLASS_POINTS[labels].float(), rtol=0, atol=1e-5)


def test_samples_depend_on_their_seed_alone():
    torch.manual_seed(0)
    net = UNetMini(8, 1, 1, label_dim=3, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_groups=4)
    nn.init.normal_(net.conv_out.weight, std=0.1)
    m = DDPMMethod(net, 1, 8, label_dim=3, num_timesteps=50).eval()
    for kw in (dict(sampler="ancestral", steps=4), dict(sampler="ddim", steps=5, eta=1.0)):
        many = m.sample(StackedRandomGenerator("cpu", [3, 4, 5]), class_labels=torch.tensor([0, 1, 2]),
                        guidance=1.5, **kw)
        one = m.sample(StackedRandomGenerator("cpu", [5]), class_labels=torch.tensor([2]), guidance=1.5, **kw)
        torch.testing.assert_close(many[2:], one, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(many[0], many[1])


# ---- bits/dim bound: closed form for a point mass on the pixel grid --------------------------------

def _cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def closed_form_bpd(point: np.ndarray, betas: np.ndarray, var_type: str) -> float:
    """For data = one grid point and its exact model, every KL term has equal means, so
    L_{t-1} = 0.5 (r - 1 - log r)/ln 2 per dim with r = beta~_t/var_model (0 for fixedsmall);
    L_0 = -log of the decoder bin mass with mean x* and variance beta~_1; plus the prior KL."""
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    total = 0.0
    for t in range(1, len(betas)):
        r = beta_tilde[t] / (betas[t] if var_type == "fixedlarge" else beta_tilde[t])
        total += 0.5 * (r - 1 - np.log(r)) / np.log(2)
    sd = np.sqrt(beta_tilde[1])
    upper = np.where(point > 0.999, 1.0, _cdf((1 / 255) / sd))
    lower = np.where(point < -0.999, 0.0, _cdf(-(1 / 255) / sd))
    total += np.mean(-np.log(upper - lower)) / np.log(2)
    aT = abar[-1]
    prior = 0.5 * (-1 - np.log(1 - aT) + (1 - aT) + aT * point**2)
    return total + float(np.mean(prior)) / np.log(2)


@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_bits_per_dim_closed_form(var_type, schedule):
    pix = torch.tensor([0, 77, 128, 255], dtype=torch.uint8).reshape(1, 1, 2, 2)
    point = pix.to(f64) / 127.5 - 1
    m = make(point_x0(point), num_timesteps=40, schedule=schedule, var_type=var_type)
    terms = m.nll_terms(pix.expand(3, -1, -1, -1), StackedRandomGenerator("cpu", [0, 1, 2]))
    want = closed_form_bpd(point.flatten().numpy(), m.process.betas.numpy(), var_type)
    torch.testing.assert_close(terms["total"], torch.full((3,), want, dtype=f64), rtol=1e-9, atol=1e-9)
    if var_type == "fixedsmall":
        assert float(terms["vb"][:, 1:].abs().max()) < 1e-9  # exact posterior: only L_0 and the prior
    bpd = m.nll_bpd(point.expand(3, -1, -1, -1), StackedRandomGenerator("cpu", [0, 1, 2]))
    torch.testing.assert_close(bpd, terms["total"])


def test_bits_per_dim_penalises_a_wrong_model():
    pix = torch.tensor([0, 77, 128, 255], dtype=torch.uint8).reshape(1, 1, 2, 2)
    point = pix.to(f64) / 127.5 - 1
    right = make(point_x0(point), num_timesteps=40, var_type="fixedsmall")
    wrong = make(point_x0(point + 0.05), num_timesteps=40, var_type="fixedsmall")
    rng = lambda: StackedRandomGenerator("cpu", [0, 1])
    assert bool((wrong.nll_bpd(pix.expand(2, -1, -1, -1), rng()) > right.nll_bpd(pix.expand(2, -1, -1, -1), rng())
                 + 0.1).all())


@pytest.mark.parametrize("T,expected", [(1000, 0.5275), (4000, 0.5275)])
def test_heun_on_a_cosine_table_uses_the_edm_sigma_range(T, expected):
    """Review defect 1: 18-step Heun on a cosine DDPM run must build its Karras grid on EDM's [0.002, 80]
    (clamped to the table), not on the table's extremes (σ_max ≈ 2.0e4 at T=1000, 8.1e4 at T=4000, where
    the grid wastes 11-12 of 18 steps on pure noise and the output std is 0.705 / 0.809). With the exact
    denoiser of std-0.5 Gaussian data the std is the EDM figure 0.5275 (§5.9 check 2)."""
    m = make(gaussian_x0, schedule="cosine", num_timesteps=T)
    assert m.sigma_max > 1e4  # the table really reaches far beyond 80
    x = m.sample(BatchRNG(20000, seed=3), sampler="heun", steps=18).to(f64).reshape(-1, 4)
    std = float((x - MU.reshape(1, 4)).pow(2).mean().sqrt())
    assert abs(std - expected) < 0.006, std
