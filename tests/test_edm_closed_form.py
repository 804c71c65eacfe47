"""EDM family against closed forms written out from specs/gaussian_and_dddm.md §5 (numpy float64 in the test,
never the library function under test): the training-sigma laws and loss weights of §5.2, the whole loss of a
stub backbone with the per-seed noise replayed by hand, classifier-free guidance, and churn's S_noise through
the exact affine propagation of the Gaussian oracle (§5.9 check 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from difflab.methods.gaussian import samplers as S
from difflab.methods.gaussian.edm import EDMMethod
from difflab.methods.gaussian.precond import EDMPrecond, IDDPMPrecond, VEPrecond, VPPrecond
from difflab.rng import StackedRandomGenerator
from tests.oracles import gaussian_denoiser

F64 = torch.float64
SD = 0.5  # sigma_data
VP_BETA_D, VP_BETA_MIN, VP_EPS_T, M = 19.9, 0.1, 1e-5, 1000


# ---- §5.1 / §5.2 by hand ------------------------------------------------------------------------------

def vp_sigma(t):
    return np.sqrt(np.expm1(0.5 * VP_BETA_D * t**2 + VP_BETA_MIN * t))


def iddpm_table(C_1=0.001, C_2=0.008) -> np.ndarray:
    """u_M = 0, u_{j-1} = sqrt((u_j^2 + 1)/max(abar(j-1)/abar(j), C_1) - 1), abar(j) = sin^2(pi j/(2 M (1+C_2)))."""
    abar = lambda j: math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2
    u = np.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(abar(j - 1) / abar(j), C_1) - 1)
    return u


U_TABLE = iddpm_table()


def train_sigma(variant: str, draw: np.ndarray) -> np.ndarray:
    """§5.2: EDM ln sigma ~ N(-1.2, 1.2^2); VP sigma_vp(1 + u (eps_t - 1)); VE 0.02 (100/0.02)^u; iDDPM u_j at
    j = floor(u M) (difflab's choice, precond.py)."""
    if variant == "edm":
        return np.exp(draw * 1.2 - 1.2)
    if variant == "vp":
        return vp_sigma(1 + draw * (VP_EPS_T - 1))
    if variant == "ve":
        return 0.02 * (100 / 0.02) ** draw
    return U_TABLE[np.clip(np.floor(draw * M), 0, M - 1).astype(int)]


def coefficients(variant: str, sigma: np.ndarray):
    """The rows of §5.1: (c_skip, c_out, c_in, c_noise) and the §5.2 weight lambda."""
    if variant == "edm":
        q = sigma**2 + SD**2
        return SD**2 / q, sigma * SD / np.sqrt(q), 1 / np.sqrt(q), np.log(sigma) / 4, q / (sigma * SD) ** 2
    if variant == "ve":
        return np.ones_like(sigma), sigma, np.ones_like(sigma), np.log(sigma / 2), 1 / sigma**2
    c_in = 1 / np.sqrt(sigma**2 + 1)
    if variant == "vp":
        t = (np.sqrt(VP_BETA_MIN**2 + 2 * VP_BETA_D * np.log(1 + sigma**2)) - VP_BETA_MIN) / VP_BETA_D
        return np.ones_like(sigma), -sigma, c_in, (M - 1) * t, 1 / sigma**2
    j = np.abs(sigma[:, None] - U_TABLE[None, :]).argmin(1)
    return np.ones_like(sigma), -sigma, c_in, (M - 1 - j).astype(float), 1 / sigma**2


PRECONDS = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond, "iddpm": IDDPMPrecond}
SIG = np.array([0.003, 0.02, 0.3, 1.0, 7.5, 80.0])


@pytest.mark.parametrize("variant", ["edm", "vp", "ve", "iddpm"])
def test_loss_weights_match_the_spec(variant):
    sig = U_TABLE[[990, 700, 400, 150, 40]] if variant == "iddpm" else SIG
    want = coefficients(variant, sig)[4]
    got = PRECONDS[variant]().loss_weight(torch.tensor(sig, dtype=F64)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-13)


@pytest.mark.parametrize("variant", ["vp", "ve", "iddpm"])
def test_training_sigma_maps_match_the_spec(variant):
    u = np.array([0.0, 1e-4, 0.1, 0.37, 0.5, 0.9, 0.9999])
    got = PRECONDS[variant]().train_sigma(torch.tensor(u, dtype=F64)).numpy()
    np.testing.assert_allclose(got, train_sigma(variant, u), rtol=1e-12)
    n = np.array([-2.0, -0.3, 0.0, 1.5])
    np.testing.assert_allclose(EDMPrecond().train_sigma_from_normal(torch.tensor(n, dtype=F64)).numpy(),
                               train_sigma("edm", n), rtol=1e-13)


# ---- the training sigma law through EDMMethod.loss ----------------------------------------------------

class NoiseLabelSpy(nn.Module):
    """Records the noise labels the loss feeds the backbone; outputs zeros (2C channels fit every variant)."""

    def __init__(self):
        super().__init__()
        self.labels = []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        self.labels.append(noise_labels.detach().to(F64).clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)


def _loss_noise_labels(variant: str, n: int) -> np.ndarray:
    spy = NoiseLabelSpy()
    m = EDMMethod(spy, 1, 1, variant=variant)
    m.loss(torch.zeros(n, 1, 1, 1), None, StackedRandomGenerator("cpu", range(n)))
    return torch.cat(spy.labels).numpy()


def test_edm_loss_draws_ln_sigma_from_the_lognormal():
    """ln sigma = 4 c_noise ~ N(P_mean = -1.2, P_std = 1.2) (§5.2). n = 4000: the standard errors are 0.019
    (mean) and 0.013 (std), the tolerances 5 of them; a flipped P_mean is off by 2.4 (126 se), P_std used as a
    variance (1.44) by 0.24 (18 se)."""
    ln_sigma = 4 * _loss_noise_labels("edm", 4000)
    assert abs(ln_sigma.mean() - (-1.2)) < 5 * 1.2 / math.sqrt(4000)
    assert abs(ln_sigma.std() - 1.2) < 5 * 1.2 / math.sqrt(2 * 4000)
    assert stats.kstest(ln_sigma, stats.norm(-1.2, 1.2).cdf).pvalue > 1e-3


def test_vp_ve_iddpm_losses_draw_sigma_from_their_laws():
    """VP: t = sigma_vp^-1(sigma) = c_noise/999 is uniform on [eps_t, 1]; VE: ln sigma = c_noise + ln 2 is
    uniform on [ln 0.02, ln 100]; iDDPM: the table index j = 999 - c_noise is uniform on {0..999} (§5.2)."""
    n = 3000
    t = _loss_noise_labels("vp", n) / (M - 1)
    assert stats.kstest(t, stats.uniform(VP_EPS_T, 1 - VP_EPS_T).cdf).pvalue > 1e-3
    ln_sigma = _loss_noise_labels("ve", n) + math.log(2)
    lo, hi = math.log(0.02), math.log(100)
    assert stats.kstest(ln_sigma, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    j = M - 1 - _loss_noise_labels("iddpm", n)
    assert np.array_equal(j, np.round(j)) and j.min() >= 0 and j.max() <= M - 1
    assert stats.kstest(j + 0.5, stats.uniform(0, M).cdf).pvalue > 1e-3


# ---- the whole loss by hand ----------------------------------------------------------------------------

class AffineNet(nn.Module):
    """F(y; c_noise) = y + 0.01 c_noise (and a second, unused half of junk for iDDPM's 2C outputs), so the loss
    depends on every coefficient, the weight and the noise label."""

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        out = x + 0.01 * noise_labels.reshape(-1, 1, 1, 1)
        return torch.cat([out, torch.full_like(out, 1e3)], dim=1)


def _replayed_draws(variant: str, seeds, shape):
    """The loss's per-seed draws, replayed by seeding torch.Generator as difflab.rng does: first the scalar
    that sets sigma (normal for EDM, uniform otherwise), then the unit noise of the image; both float32."""
    draws, noise = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        first = torch.randn((), generator=g, dtype=F64) if variant == "edm" else torch.rand((), generator=g,
                                                                                             dtype=F64)
        draws.append(float(first.to(torch.float32)))
        noise.append(torch.randn(shape, generator=g, dtype=F64).to(torch.float32).numpy().astype(np.float64))
    return np.array(draws), np.stack(noise)


@pytest.mark.parametrize("variant", ["edm", "vp", "ve", "iddpm"])
def test_loss_of_a_stub_backbone_by_hand(variant):
    """loss_k = sum lambda(sigma) |c_skip y + c_out F(c_in y; c_noise) - x0|^2 with y = x0 + sigma n (§5.2),
    every sigma and n replayed from seed k."""
    seeds = [3, 14, 15, 92, 65, 35]
    x0 = torch.linspace(-0.9, 0.8, 6 * 4, dtype=F64).reshape(6, 1, 2, 2)
    got = EDMMethod(AffineNet(), 1, 2, variant=variant).loss(x0, None, StackedRandomGenerator("cpu", seeds))
    draw, n = _replayed_draws(variant, seeds, (1, 2, 2))
    sigma = train_sigma(variant, draw)
    c_skip, c_out, c_in, c_noise, lam = (c.reshape(-1, 1, 1, 1) for c in coefficients(variant, sigma))
    x = x0.numpy()
    y = x + sigma.reshape(-1, 1, 1, 1) * n
    D = c_skip * y + c_out * (c_in * y + 0.01 * c_noise)
    want = (lam * (D - x) ** 2).reshape(6, -1).sum(1)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=2e-5)


# ---- classifier-free guidance (EDM family) ---------------------------------------------------------------

CLASS_POINTS = torch.tensor([[-0.5, 0.2, 0.0, 0.1], [0.0, 0.7, -0.4, 0.3], [0.6, -0.3, 0.2, -0.8]],
                            dtype=F64).reshape(3, 1, 2, 2)
NULL_POINT = torch.tensor([0.1, -0.1, 0.05, 0.0], dtype=F64).reshape(1, 1, 2, 2)


class ClassPointNet(nn.Module):
    """Through EDMPrecond, D(x; sigma | c) = P_c exactly (label -1 = the null label reads P_u): F inverts
    c_in and c_noise (x = y / c_in, sigma = exp(4 c_noise)) and returns (P - c_skip x)/c_out."""

    def forward(self, y, c_noise, class_labels=None, augment_labels=None, context=None):
        table = torch.cat([CLASS_POINTS, NULL_POINT]).to(y.dtype)
        P = table[class_labels] if class_labels is not None else NULL_POINT.to(y.dtype).expand_as(y)
        sigma = torch.exp(4 * c_noise.to(F64)).reshape(-1, 1, 1, 1)
        x = y.to(F64) * torch.sqrt(sigma**2 + SD**2)
        c_skip, c_out = SD**2 / (sigma**2 + SD**2), sigma * SD / torch.sqrt(sigma**2 + SD**2)
        return ((P.to(F64) - c_skip * x) / c_out).to(y.dtype)


def test_guided_denoiser_is_the_cfg_formula():
    """guided D = D(x | null) + w (D(x | c) - D(x | null)), each from its own denoise call; w = 1 and no labels
    give the plain conditional/unconditional denoiser."""

    class LabelNet(nn.Module):
        def forward(self, y, c_noise, class_labels=None, augment_labels=None, context=None):
            if class_labels is None:
                return y
            scale = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=y.dtype)[class_labels].reshape(-1, 1, 1, 1)
            return scale * y + c_noise.reshape(-1, 1, 1, 1)

    m = EDMMethod(LabelNet(), 1, 2, label_dim=3, variant="edm")
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    sigma = torch.tensor([0.2, 1.5, 9.0], dtype=F64)
    labels = torch.tensor([2, 0, 1])
    cond, uncond = m.denoise(x, sigma, labels), m.denoise(x, sigma, torch.full((3,), -1))
    assert float((cond - uncond).abs().min()) > 1e-3  # the labels really change D
    for w in (0.0, 2.5, -1.0):
        torch.testing.assert_close(m.guided_denoiser(labels, w)(x, sigma), uncond + w * (cond - uncond),
                                   rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.guided_denoiser(labels, 1.0)(x, sigma), cond, rtol=0, atol=0)
    torch.testing.assert_close(m.guided_denoiser(None, 3.0)(x, sigma), m.denoise(x, sigma, None), rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["heun", "euler", "ablation"])
def test_guided_sampling_lands_on_the_guided_point(sampler):
    """With D = P_label for every x and sigma, any sampler ends on the guided denoiser's value
    P_u + w (P_c - P_u) (the last step goes to sigma = 0)."""
    m = EDMMethod(ClassPointNet(), 1, 2, label_dim=3, variant="edm")
    labels = torch.tensor([0, 2, 1, 2])
    for w in (1.0, 3.0):
        x = m.sample(StackedRandomGenerator("cpu", [7, 8, 9, 10]), class_labels=labels, sampler=sampler,
                     steps=6, guidance=w)
        want = NULL_POINT + w * (CLASS_POINTS[labels] - NULL_POINT)
        torch.testing.assert_close(x.to(F64), want, rtol=0, atol=1e-5)


# ---- churn: S_noise through the exact affine propagation (§5.3, §5.9 check 2) ---------------------------

MU = np.array([0.3, -0.2, 0.1, 0.0])
S_DATA = 0.5


def karras_grid(N, smin=0.002, smax=80.0, rho=7.0):
    i = np.arange(N)
    return np.append((smax ** (1 / rho) + i / (N - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho, 0.0)


def heun_factor(t_hat, t_next, last, s=S_DATA):
    """With D(x; sigma) = mu + s^2/(s^2 + sigma^2)(x - mu), d = a(sigma)(x - mu), a = sigma/(s^2 + sigma^2), so one
    Heun step maps x_hat - mu to F (x_hat - mu), F = 1 + h/2 (a(t_hat) + a(t_next)(1 + h a(t_hat))); Euler on
    the last step: F = 1 + h a(t_hat)."""
    a = lambda sg: sg / (s**2 + sg**2)
    h = t_next - t_hat
    return 1 + h * a(t_hat) if last else 1 + h / 2 * (a(t_hat) + a(t_next) * (1 + h * a(t_hat)))


def churn_steps(N, S_churn, S_min, S_max):
    t = karras_grid(N)
    for i in range(N):
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_min <= t[i] <= S_max else 0.0
        yield t[i], t[i] * (1 + gamma), t[i + 1], i == N - 1


class RecordingNoise:
    def __init__(self, seed):
        self.g, self.drawn = torch.Generator().manual_seed(seed), []

    def __call__(self, x):
        z = torch.randn(x.shape, generator=self.g, dtype=F64)
        self.drawn.append(z.numpy().copy())
        return z.to(x.dtype)


CHURN = dict(S_churn=30.0, S_min=0.01, S_max=1.0, S_noise=1.007)  # the paper's CIFAR-10 VP settings (§5.8)


def test_churn_path_by_hand():
    """Each churn step adds sqrt(t_hat^2 - t^2) S_noise z to x before the Heun step (§5.3): replaying the
    recorded z through the affine steps reproduces every sample to 1e-12 (S_noise = 1 instead of 1.007
    would be off by ~1e-3)."""
    mu = torch.tensor(MU).reshape(1, 1, 2, 2)
    z0 = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    noise = RecordingNoise(2)
    out = S.sample_heun(gaussian_denoiser(mu, S_DATA), z0, S.sigmas_edm(18), noise, **CHURN).numpy()
    x = z0.numpy() * 80.0
    drawn = iter(noise.drawn)
    churned = 0
    for t, t_hat, t_next, last in churn_steps(18, CHURN["S_churn"], CHURN["S_min"], CHURN["S_max"]):
        if t_hat > t:
            x = x + math.sqrt(t_hat**2 - t**2) * CHURN["S_noise"] * next(drawn)
            churned += 1
        x = MU.reshape(1, 1, 2, 2) + heun_factor(t_hat, t_next, last) * (x - MU.reshape(1, 1, 2, 2))
    assert churned == len(noise.drawn) == 5  # the grid points inside [0.01, 1]: 0.585, 0.296, 0.140, 0.060, 0.023
    np.testing.assert_allclose(out, x, rtol=0, atol=1e-12)


def test_churn_output_variance_matches_the_propagated_variance():
    """Per dimension, var_{i+1} = F_i^2 (var_i + (t_hat^2 - t_i^2) S_noise^2), var_0 = 80^2, mean offset
    m_{i+1} = F_i m_i, m_0 = -mu: the output law of 250000 x 4 samples is checked against it. Churn at
    gamma = sqrt2 - 1 on [0.05, 50] (18 steps) makes S_noise = 1.007 raise the variance by 1.38%, which is 9.7
    standard errors (sqrt(2/1e6) = 0.14%); the tolerance is 4 of them, so S_noise = 1 fails by > 5 se."""
    settings = dict(S_churn=80.0, S_min=0.05, S_max=50.0)

    def propagate(S_noise):
        var, off = 80.0**2, -MU
        for t, t_hat, t_next, last in churn_steps(18, **settings):
            F = heun_factor(t_hat, t_next, last)
            var, off = F**2 * (var + (t_hat**2 - t**2) * S_noise**2), F * off
        return var, off

    (var, off), (var_1, _) = propagate(1.007), propagate(1.0)
    assert (var - var_1) / var > 0.0135
    n = 250_000
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(n, 1, 2, 2, generator=g, dtype=F64)
    randn_like = lambda x: torch.randn(x.shape, generator=g, dtype=F64)
    mu = torch.tensor(MU).reshape(1, 1, 2, 2)
    out = S.sample_heun(gaussian_denoiser(mu, S_DATA), z0, S.sigmas_edm(18), randn_like, S_noise=1.007,
                        **settings).reshape(n, 4).numpy()
    dev = out - (MU + off)
    emp_var = float((dev**2).mean())
    se = var * math.sqrt(2 / dev.size)
    assert abs(emp_var - var) < 4 * se, (emp_var, var, var_1)
    assert np.abs(dev.mean(0)).max() < 4.5 * math.sqrt(var / n)


def test_ablation_churn_equals_the_edm_sampler_given_the_same_noise():
    """(heun, edm, linear, none) ablation with churn follows sample_heun step for step (§5.9 check 4), so the
    by-hand churn path above pins it too."""
    mu = torch.tensor(MU).reshape(1, 1, 2, 2)
    D = gaussian_denoiser(mu, S_DATA)
    z0 = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    a = S.sample_heun(D, z0, S.sigmas_edm(18), RecordingNoise(5), **CHURN)
    b = S.sample_ablation(D, z0, RecordingNoise(5), num_steps=18, **CHURN)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
