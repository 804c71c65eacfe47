"""Score SDE against closed forms (specs/gaussian_and_dddm.md §4.9): the processes, their discretisations,
the DSM loss floor, Gaussian-oracle PC sampling, and the probability-flow likelihood."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from difflab.errors import UserError
from difflab.methods.gaussian import likelihood as L
from difflab.methods.gaussian import samplers as S
from difflab.methods.gaussian.score_sde import ScoreSDEMethod
from difflab.methods.gaussian.sde import EDMSDE, VESDE, VPSDE, DiscreteSDE, SubVPSDE
from tests.oracles import gaussian_denoiser

f64 = torch.float64
MU = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=f64).reshape(1, 1, 2, 2)
SD = 0.5


class BatchRNG:
    """One generator for the whole batch, with the StackedRandomGenerator interface (fast moment tests).
    ``antithetic``: the second half of every normal draw is the negated first half, so for a sampler that is odd
    in its noise around a deterministic path (any sampler on Gaussian data) the batch mean IS that path: the
    mean error measured is the sampler's bias, with no Monte-Carlo error."""

    def __init__(self, n: int, seed: int = 0, antithetic: bool = False):
        self.n, self.device, self.g = n, torch.device("cpu"), torch.Generator().manual_seed(seed)
        self.antithetic = antithetic

    def __len__(self):
        return self.n

    def randn(self, size, dtype=torch.float32):
        size = tuple(size)
        if self.antithetic:
            half = torch.randn((size[0] // 2, *size[1:]), generator=self.g, dtype=f64)
            return torch.cat([half, -half]).to(dtype)
        return torch.randn(size, generator=self.g, dtype=f64).to(dtype)

    def rand(self, size, dtype=torch.float32):
        return torch.rand(tuple(size), generator=self.g, dtype=f64).to(dtype)

    def randn_like(self, x):
        return self.randn(x.shape, x.dtype)

    def rand_like(self, x):
        return self.rand(x.shape, x.dtype)


# ---- §4.1: the processes ---------------------------------------------------------------------------

def _np_closed_forms(name, t):
    """Mean coefficient, std and g^2 of §4.1, written independently in numpy."""
    bmin, bmax, smin, smax = 0.1, 20.0, 0.01, 50.0
    if name == "ve":
        sig = smin * (smax / smin) ** t
        return np.ones_like(t), sig, (sig * np.sqrt(2 * np.log(smax / smin))) ** 2
    m = np.exp(-0.25 * t**2 * (bmax - bmin) - 0.5 * t * bmin)
    beta = bmin + t * (bmax - bmin)
    if name == "vp":
        return m, np.sqrt(1 - m**2), beta
    return m, 1 - m**2, beta * (1 - np.exp(-2 * bmin * t - (bmax - bmin) * t**2))


@pytest.mark.parametrize("name,sde", [("ve", VESDE()), ("vp", VPSDE()), ("subvp", SubVPSDE())])
def test_marginals_and_diffusion_match_the_spec(name, sde):
    t = np.linspace(1e-3, 1, 11)
    m, std, g2 = _np_closed_forms(name, t)
    tt = torch.from_numpy(t)
    mean, sd = sde.marginal(torch.ones(11, 1, dtype=f64), tt)
    np.testing.assert_allclose(mean[:, 0].numpy(), m, rtol=1e-12)
    np.testing.assert_allclose(sd[:, 0].numpy(), std, rtol=1e-10)
    np.testing.assert_allclose((sde.diffusion(tt) ** 2).numpy(), g2, rtol=1e-9)
    np.testing.assert_allclose(sde.sigma_inv(sde.sigma(tt)).numpy(), t, rtol=1e-9)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE(), EDMSDE()], ids=lambda s: type(s).__name__)
def test_variance_ode_by_finite_differences(sde):
    """d var/dt = 2 (s'/s) var + g^2 and d mean/dt = (s'/s) mean, with var = (s sigma)^2 (§4.9 check 1)."""
    t = torch.linspace(0.05, 0.95, 9, dtype=f64)
    h = 1e-6
    var = lambda u: (sde.s(u) * sde.sigma(u)) ** 2  # noqa: E731
    dvar = (var(t + h) - var(t - h)) / (2 * h)
    rhs = 2 * sde.s_deriv(t) / sde.s(t) * var(t) + sde.diffusion(t) ** 2
    torch.testing.assert_close(dvar, rhs, rtol=1e-6, atol=0)
    ds = (sde.s(t + h) - sde.s(t - h)) / (2 * h)
    torch.testing.assert_close(ds, sde.drift(torch.ones(9, 1), t)[:, 0] * sde.s(t), rtol=1e-6, atol=1e-9)


def test_discretize_is_one_ddpm_and_one_smld_step():
    """§4.1: VP -> DDPM step with beta_k = linspace(bmin/N, bmax/N, N); VE -> SMLD step with sigma_k geometric
    and sigma_{-1} = 0; k = floor(t (N-1))."""
    N = 10
    x = torch.randn(3, 1, 2, 2, dtype=f64)
    t = torch.tensor([1.0, 0.5, 0.01], dtype=f64)
    k = np.floor(t.numpy() * (N - 1)).astype(int)
    betas = np.linspace(0.1 / 30, 20 / 30, 30)  # 30 levels: 20/N must stay below 1
    vp = VPSDE(0.1, 20, 30)
    k30 = np.floor(t.numpy() * 29).astype(int)
    f, G = vp.discretize(x, t)
    bk = torch.from_numpy(betas[k30]).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(f, ((1 - bk).sqrt() - 1) * x)
    torch.testing.assert_close(G.reshape(-1), bk.reshape(-1).sqrt())
    ve = VESDE(0.01, 50, N)
    sig = np.exp(np.linspace(np.log(0.01), np.log(50), N))
    f, G = ve.discretize(x, t)
    adj = np.where(k > 0, sig[np.maximum(k - 1, 0)], 0.0)
    assert f.abs().max() == 0
    np.testing.assert_allclose(G.reshape(-1).numpy(), np.sqrt(sig[k] ** 2 - adj**2), rtol=1e-12)
    # the DDPM table as a process: at N = T its chain is the table's own betas
    table_betas = torch.linspace(1e-4, 0.02, 50, dtype=f64)
    d = DiscreteSDE.from_alpha_bar(torch.cumprod(1 - table_betas, 0))
    f, G = d.discretize(x, torch.tensor([49.0, 20.0, 0.0], dtype=f64))
    torch.testing.assert_close(G.reshape(-1) ** 2, table_betas[[49, 20, 0]], rtol=1e-9, atol=0)


def test_vp_chain_with_too_few_steps_is_refused():
    with pytest.raises(UserError, match="at least 21 steps"):
        VPSDE(0.1, 20, 10).discrete_betas()


# ---- §4.2-4.3: parameterisation and the DSM loss floor ---------------------------------------------

class GaussianScoreNet(nn.Module):
    """A backbone that makes the method's denoiser the exact posterior mean of N(MU, SD^2 I) data, inverting the
    method's own input map and output parameterisation (§4.2); ``error`` scales the residual to perturb it."""

    def __init__(self, method_ref: list, error: float = 1.0):
        super().__init__()
        self.m, self.error = method_ref, error
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_in, c_noise, class_labels=None, augment_labels=None, context=None):
        m = self.m[0]
        x_in = x_in.to(f64)
        c = c_noise.to(f64)
        if not m.centered:
            x_in = (x_in + 1) / 2
        if m.variant == "sde-ve":
            sig, xt = c.exp(), x_in
        else:
            t = c / 999
            sig, xt = m.sde.sigma(t), x_in / m.sde.s(t).reshape(-1, 1, 1, 1)
        sig = sig.reshape(-1, 1, 1, 1)
        D = gaussian_denoiser(MU, SD)(xt, sig)
        D = xt + self.error * (D - xt)
        F = (D - xt) / sig if m.variant == "sde-ve" else (xt - D) / sig
        return F.to(torch.float32) if x_in.dtype == torch.float32 else F


def oracle_method(variant: str, error: float = 1.0, **kw) -> ScoreSDEMethod:
    ref: list = []
    m = ScoreSDEMethod(nn.Identity(), 1, 2, variant=variant, **kw)
    m.net = GaussianScoreNet(ref, error)
    ref.append(m)
    return m


@pytest.mark.parametrize("variant,reduce_mean", [("sde-ve", False), ("sde-vp", True), ("sde-subvp", True)])
def test_dsm_loss_floor_for_gaussian_data(variant, reduce_mean, monkeypatch):
    """§4.9 check 2: with the exact score, E|std s* + z|^2 per dimension is SD^2/(SD^2 + sigma^2); the VE
    configs sum (half the sum), VP/sub-VP average; a perturbed score raises it."""
    m = oracle_method(variant, centered=True)
    assert m.reduce_mean is reduce_mean
    n = 40000
    t = float(m.sde.sigma_inv(torch.tensor(0.6, dtype=f64)))  # sigma ~ the data std: a perturbation shows most
    monkeypatch.setattr(m, "train_times", lambda rng, k: torch.full((k,), t, dtype=f64))
    x0 = MU + SD * BatchRNG(n, seed=11).randn([n, 1, 2, 2], f64)
    sig = float(m.sde.sigma(torch.tensor(t, dtype=f64)))
    floor = SD**2 / (SD**2 + sig**2)
    per_dim = m.loss(x0, None, BatchRNG(n, seed=1)) / (1 if reduce_mean else 0.5 * 4)
    se = float(per_dim.std()) / math.sqrt(n)
    assert abs(float(per_dim.mean()) - floor) < 4 * se, (float(per_dim.mean()), floor, se)
    worse = oracle_method(variant, error=1.5, centered=True)
    monkeypatch.setattr(worse, "train_times", lambda rng, k: torch.full((k,), t, dtype=f64))
    per_dim_w = worse.loss(x0, None, BatchRNG(n, seed=1)) / (1 if reduce_mean else 2)
    assert float(per_dim_w.mean()) > floor + 10 * se


def test_likelihood_weighting_is_g2_over_std2_of_the_score_residual():
    """§4.3: likelihood weighting multiplies |s_theta + z/std|^2 by g^2: in D-space g^2 |D - x0|^2/(sigma^4 s^2)."""
    m = ScoreSDEMethod(nn.Identity(), 1, 2, variant="sde-vp", likelihood_weighting=True)
    t = torch.tensor([0.01, 0.3, 0.9], dtype=f64)
    sde = VPSDE()
    s, sig = sde.s(t), sde.sigma(t)
    g2 = 0.1 + t * 19.9
    torch.testing.assert_close(m.loss_weight(t), g2 / (sig**4 * s**2), rtol=1e-12, atol=0)
    assert torch.equal(ScoreSDEMethod(nn.Identity(), 1, 2, variant="sde-vp").loss_weight(t), 1 / sig**2)


def test_uncentred_data_enter_the_net_as_2x_minus_1_and_decode_back():
    m = ScoreSDEMethod(nn.Identity(), 1, 2, variant="sde-ve")
    assert not m.centered and m.data_range == (0.0, 1.0)
    u = torch.tensor([0, 1, 128, 255], dtype=torch.uint8).reshape(1, 1, 2, 2)
    assert torch.equal(m.decode(m.encode(u)), u)
    seen = []

    class Spy(nn.Module):
        def forward(self, x, c, class_labels=None, augment_labels=None, context=None):
            seen.append((x.clone(), c.clone()))
            return torch.zeros_like(x)

    m.net = Spy()
    x = torch.rand(2, 1, 2, 2, dtype=f64)
    m.denoise(x, torch.tensor([0.1, 2.0], dtype=f64))
    torch.testing.assert_close(seen[0][0].to(f64), 2 * x - 1, rtol=0, atol=1e-7)
    torch.testing.assert_close(seen[0][1].to(f64), torch.tensor([0.1, 2.0], dtype=f64).log(), rtol=1e-6, atol=0)


# ---- §4.5, §4.9 check 3: Gaussian-oracle sampling -------------------------------------------------------

def _moments(x):
    x = x.to(f64).reshape(x.shape[0], -1)
    return float((x - MU.reshape(1, -1)).std()), float((x.mean(0) - MU.reshape(-1)).abs().max())


PC_CASES = [
    ("sde-ve", dict(predictor="reverse_diffusion", corrector="none")),
    ("sde-ve", dict(predictor="reverse_diffusion", corrector="langevin", norm="batch")),
    ("sde-ve", dict(predictor="reverse_diffusion", corrector="langevin", norm="batch", order="predictor-first")),
    ("sde-ve", dict(predictor="ancestral", corrector="ald")),
    ("sde-vp", dict(predictor="euler_maruyama", corrector="none")),
    ("sde-vp", dict(predictor="reverse_diffusion", corrector="langevin", norm="batch")),
    ("sde-vp", dict(predictor="ancestral", corrector="none")),
    ("sde-subvp", dict(predictor="euler_maruyama", corrector="none")),
]


def _pc_check(variant, kw, n):
    """Std within 0.01 and mean within 6e-3 of the data (the mean of antithetic pairs is the sampler's
    deterministic path: its error is bias, not Monte-Carlo noise)."""
    m = oracle_method(variant, centered=True)
    x = m.sample(BatchRNG(n, seed=2, antithetic=True), sampler="pc", steps=1000, **kw)
    std, mean_err = _moments(x)
    assert abs(std - SD) < 0.01 and mean_err < 6e-3, (std, mean_err)


@pytest.mark.parametrize("variant,kw", [PC_CASES[0], PC_CASES[4]])
def test_pc_reproduces_gaussian_data(variant, kw):
    """§4.9 check 3 at N = 1000 on 4000 samples (std standard error 0.003)."""
    _pc_check(variant, kw, 4000)


@pytest.mark.slow
@pytest.mark.parametrize("variant,kw", PC_CASES)
def test_pc_reproduces_gaussian_data_at_the_spec_size(variant, kw):
    """§4.9 check 3 exactly as specified: d=4, s=0.5, N=1000, 2e4 samples, every predictor/corrector/order."""
    _pc_check(variant, kw, 20000)


def test_langevin_per_sample_norms_match_batch_norms_in_high_dimension():
    """The default per-image norms make an image depend on its seed alone; at image sizes (d = 192 here) they
    give the same data std as the reference's batch-mean norms (at d = 4 they do not: |z| is far from constant)."""
    mu = torch.zeros(1, 3, 8, 8, dtype=f64)
    D = gaussian_denoiser(mu, SD)
    out = {}
    for norm in ("sample", "batch"):
        g = torch.Generator().manual_seed(4)
        z = torch.randn(256, 3, 8, 8, generator=g, dtype=f64)
        x = S.sample_pc(D, z, VESDE().with_steps(200), lambda v, g=g: torch.randn(v.shape, generator=g, dtype=f64),
                        norm=norm)
        out[norm] = float(x.std())
    assert abs(out["sample"] - out["batch"]) < 0.005, out
    assert abs(out["batch"] - SD) < 0.02, out


def test_ancestral_predictor_needs_ve_or_vp():
    with pytest.raises(UserError, match="ancestral predictor"):
        S.sample_pc(lambda x, s: x, torch.zeros(1, 1, 2, 2, dtype=f64), SubVPSDE(), predictor="ancestral")


def test_probability_flow_ode_sampler_reproduces_gaussian_data():
    """PF-ODE with per-row RK45: deterministic (the map is affine for Gaussian data: std and mean exact up to
    the solver and the t = eps floor)."""
    for variant in ("sde-ve", "sde-vp"):
        m = oracle_method(variant, centered=True)
        info: dict = {}
        x = m.sample(BatchRNG(2000, seed=5, antithetic=True), sampler="ode", info=info)
        std, mean_err = _moments(x)
        assert abs(std - SD) < 0.03 and mean_err < 0.03, (variant, std, mean_err)
        assert 10 < info["nfe"] < 1000


# ---- §4.6, §4.9 check 4: likelihood -------------------------------------------------------------------

def _gaussian_logp(sde, x, t):
    s, sig = float(sde.s(torch.tensor(t, dtype=f64))), float(sde.sigma(torch.tensor(t, dtype=f64)))
    var = s**2 * (SD**2 + sig**2)
    d = x[0].numel()
    r = (x - s * MU).flatten(1)
    return -0.5 * d * math.log(2 * math.pi * var) - 0.5 * (r**2).sum(1) / var


@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE()], ids=lambda s: type(s).__name__)
def test_ode_likelihood_equals_the_closed_form(sde):
    """Exact score, exact divergence and the exact terminal marginal as prior: the ODE log-density equals the
    Gaussian marginal at t = eps to far better than 1e-3 bits/dim."""
    D = gaussian_denoiser(MU, SD)
    x = MU + 0.7 * torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=f64)
    prior = lambda z: _gaussian_logp(sde, z, sde.t_max)  # noqa: E731
    logp = L.ode_logp(D, sde, x, None, t_eps=1e-5, rtol=1e-8, atol=1e-8, prior_logp=prior)
    exact = _gaussian_logp(sde, x, 1e-5)
    bits = (logp - exact).abs().max() / (4 * math.log(2))
    assert bits < 1e-5, float(bits)


def test_hutchinson_probes_average_to_the_exact_divergence():
    """With a correlated Gaussian (a non-diagonal Jacobian: Rademacher probes are exact for diagonal ones), the
    Hutchinson estimate averaged over many probes converges to the exact-trace log-density."""
    sde = VPSDE()
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(7), dtype=f64))
    cov = Q @ torch.diag(torch.tensor([0.05, 0.2, 0.5, 1.0], dtype=f64)) @ Q.T

    def D(x, sigma):
        sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1)
        gain = cov @ torch.linalg.inv(cov + sig**2 * torch.eye(4, dtype=f64))  # [n or 1, 4, 4]
        r = (x - MU).reshape(x.shape[0], 4, 1)
        return MU + (gain @ r).reshape(x.shape)

    x = (MU + 0.5 * torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=f64))
    exact = L.ode_logp(D, sde, x, None, rtol=1e-7, atol=1e-7)
    k = 1000
    rng = BatchRNG(k, seed=3)
    xs = x.expand(k, -1, -1, -1).clone()
    for kind in L.PROBES:
        e = L.probe_vectors(rng.rand_like, rng.randn_like, xs, kind)
        assert torch.allclose(e.flatten(1).T @ e.flatten(1) / k, torch.eye(4, dtype=f64), atol=0.1)
        est = L.ode_logp(D, sde, xs, e, rtol=1e-6, atol=1e-6)
        se = float(est.std()) / math.sqrt(k)
        assert se > 1e-4  # the probes really vary: the average has something to converge
        assert abs(float(est.mean()) - float(exact)) < 4 * se + 1e-5, (kind, float(est.mean()), float(exact), se)


def test_bits_per_dim_offset_follows_the_data_range():
    """8 bits for data in [0, 1], 7 for [-1, 1] (§4.6), and through the methods."""
    assert L.bpd_offset((0.0, 1.0)) == 8.0 and L.bpd_offset((-1.0, 1.0)) == 7.0
    logp = torch.tensor([-100.0], dtype=f64)
    assert float(L.bits_per_dim(logp, 4, 7.0)) == pytest.approx(100 / (4 * math.log(2)) + 7, rel=1e-15)
    u = torch.tensor([0, 255], dtype=torch.uint8)
    np.testing.assert_allclose(L.dequantize(u, torch.tensor([0.0, 0.999]), (0.0, 1.0)).numpy(), [0, 255.999 / 256])
    np.testing.assert_allclose(L.dequantize(u, torch.tensor([0.0, 0.999]), (-1.0, 1.0)).numpy(),
                               [-1, 2 * 255.999 / 256 - 1])
    # a method's bits/dim uses its own range: same model, data in [0,1] vs [-1,1] -> offsets differ by 1 bit
    # up to the change of density between the two ranges (log 2 per dimension) — i.e. exactly the same density
    images = torch.randint(0, 256, (3, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for centered in (False, True):
        m = oracle_method("sde-ve", centered=centered)
        assert m.data_range == ((-1.0, 1.0) if centered else (0.0, 1.0))
        seen = {}
        orig = L.ode_logp

        def spy(D, sde, x, probe, seen=seen, **kw):
            seen["x"] = x
            return torch.zeros(x.shape[0], dtype=f64)

        L.ode_logp = spy
        try:
            bpd = m.ode_bpd(images, BatchRNG(3, seed=0))
        finally:
            L.ode_logp = orig
        assert torch.allclose(bpd, torch.full((3,), 8.0 - centered, dtype=f64))
        lo = -1.0 if centered else 0.0
        assert float(seen["x"].min()) >= lo and float(seen["x"].max()) < 1.0


def test_an_unknown_probe_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^probe must be one of \('rademacher', 'gaussian'\), got 'sphere'$"):
        L.probe_vectors(torch.rand_like, torch.randn_like, torch.zeros(2, 3), "sphere")


# ---- the process objects' own formulas (difflab/methods/gaussian/sde.py, §4.1, §5.4) ----------------------------
def test_prior_log_density_is_the_gaussian_of_its_mean_and_std():
    from difflab.methods.gaussian.sde import VESDE

    sde = VESDE(0.02, 5.0)
    x = torch.tensor([[0.5, -1.0, 2.0, 0.25], [3.0, 0.0, -0.5, 1.0]], dtype=f64).reshape(2, 1, 2, 2)
    for mean in (0.0, torch.tensor([0.3], dtype=f64).reshape(1, 1, 1)):
        sde.prior_mean = mean
        r = (x - mean).flatten(1).numpy()
        want = -0.5 * 4 * np.log(2 * np.pi * 25.0) - 0.5 * (r**2).sum(1) / 25.0
        np.testing.assert_allclose(sde.prior_logp(x).numpy(), want, rtol=1e-14)
        one = torch.ones(1, 1, 2, 2, dtype=f64)
        assert torch.allclose(sde.prior_sample(one), mean + 5.0 * one)


def test_vp_marginal_and_the_ablation_refit():
    """VP: p(x_t | x0) = N(m x0, (1 - m^2) I) with log m = -t^2 (bmax - bmin)/4 - t bmin/2; EDM's ablation refit
    puts sigma(eps_s) = sigma_min and sigma(1) = sigma_max, and samples down to eps_s."""
    sde = VPSDE(0.1, 20.0)
    x0 = torch.tensor([0.5, -2.0, 1.0, 3.0], dtype=f64).reshape(1, 1, 2, 2)
    t = 0.37
    m = math.exp(-0.25 * t**2 * 19.9 - 0.5 * t * 0.1)
    mean, std = sde.marginal(x0, torch.tensor([t], dtype=f64))
    torch.testing.assert_close(mean, m * x0, rtol=1e-14, atol=0)
    assert float(std.flatten()[0]) == pytest.approx(math.sqrt(1 - m * m), rel=1e-12)
    fit = VPSDE.fit(0.02, 80.0, 1e-3, N=50)
    assert float(fit.sigma(torch.tensor(1e-3, dtype=f64))) == pytest.approx(0.02, rel=1e-10)
    assert float(fit.sigma(torch.tensor(1.0, dtype=f64))) == pytest.approx(80.0, rel=1e-10)
    assert fit.t_eps == 1e-3 and fit.N == 50 and type(fit) is VPSDE


def test_the_ablation_processes():
    from difflab.methods.gaussian.sde import LinearVE, NoScaling, SqrtVE, VPScaling, ablation_sde

    sq, lin = SqrtVE(10.0), LinearVE(80.0)
    assert (sq.t_max, sq.prior_std, sq.t_eps) == (100.0, 10.0, 0.0) and float(sq.sigma(torch.tensor(49.0))) == 7.0
    assert (lin.t_max, lin.prior_std, lin.t_eps) == (80.0, 80.0, 0.0)
    vp = ablation_sde("vp", "vp", 0.02, 80.0, 1e-3)
    assert type(vp) is VPScaling and float(vp.sigma(torch.tensor(1e-3, dtype=f64))) == pytest.approx(0.02, rel=1e-10)
    none = ablation_sde("ve", "none", 0.02, 80.0)
    assert type(none) is NoScaling and type(none.base) is SqrtVE and none.prior_std == pytest.approx(80.0)
    assert type(ablation_sde("linear", "vp", 0.02, 80.0).base) is LinearVE
    with pytest.raises(ValueError, match=r"^schedule must be vp, ve or linear, got 'cosine'$"):
        ablation_sde("cosine", "vp", 0.02, 80.0)
    with pytest.raises(ValueError, match=r"^scaling must be vp or none, got 've'$"):
        ablation_sde("ve", "ve", 0.02, 80.0)


def test_ve_chain_steps_and_the_langevin_alphas():
    """SMLD chain on levels sigma_k = sigma(k/(N-1)): G_k = sqrt(sigma_k^2 - sigma_{k-1}^2), G_0 = sigma_0;
    the VP corrector's alpha_k = 1 - beta_k of the DDPM chain, the table chain's the same from its level
    betas; 1 for VE."""
    sde = VESDE(0.01, 1.0).with_steps(3)  # levels at t = 0, 1/2, 1: sigma = 0.01, 0.1, 1
    x = torch.zeros(3, 1, 2, 2, dtype=f64)
    f, G = sde.discretize(x, torch.tensor([0.0, 0.5, 1.0], dtype=f64))
    assert torch.equal(f, x)
    want = torch.tensor([0.01, math.sqrt(0.1**2 - 0.01**2), math.sqrt(1 - 0.1**2)], dtype=f64)
    torch.testing.assert_close(G.flatten(), want, rtol=1e-12, atol=0)
    vp = VPSDE(0.1, 20.0).with_steps(100)
    betas = np.linspace(0.1 / 100, 20.0 / 100, 100)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=f64)
    np.testing.assert_allclose(vp.langevin_alpha(t).numpy(), 1 - betas[[0, 49, 99]], rtol=1e-14)
    table = DiscreteSDE(torch.tensor([0.1, 0.5, 1.0, 3.0], dtype=f64))
    abar = 1 / (1 + np.array([0.1, 0.5, 1.0, 3.0]) ** 2)
    beta = 1 - abar / np.concatenate([[1.0], abar[:-1]])
    np.testing.assert_allclose(table.langevin_alpha(torch.tensor([0.0, 2.0, 3.0], dtype=f64)).numpy(),
                               1 - beta[[0, 2, 3]], rtol=1e-12)
    assert VESDE().langevin_alpha(t).tolist() == [1.0] * 3


@pytest.mark.parametrize("kind", ["ve", "vp", "table"])
def test_ancestral_predictor_replayed_by_hand(kind):
    """The ancestral predictor (score SDE's AncestralSamplingPredictor, §4.5) with the exact Gaussian score and
    fixed noise draws, replayed in numpy: VE x' = x + (s_k^2 - s_{k-1}^2) score + sqrt(s_{k-1}^2 (s_k^2 -
    s_{k-1}^2) / s_k^2) z on the levels s_k = sigma(k/(N-1)) (s_{-1} = 0); VP x' = (x + b_k score)/sqrt(1 - b_k)
    + sqrt(b_k) z with the chain's b_k; the output is the last step's mean."""
    N = 4
    if kind == "ve":
        sde = VESDE(0.01, 10.0, N=N)
        sig_t = lambda t: 0.01 * 1000.0**t  # noqa: E731
    elif kind == "vp":
        sde = VPSDE(0.1, 2.0, N=N)  # beta_max / N < 1: a valid 4-level chain
        sig_t = lambda t: math.sqrt(math.exp(0.5 * t * t * 1.9 + t * 0.1) - 1)  # noqa: E731
    else:
        table = torch.tensor([0.05, 0.3, 1.0, 2.5, 6.0], dtype=f64)
        sde = DiscreteSDE(table, N=N)
        sig_t = lambda t: float(sde.sigma(torch.tensor([t], dtype=f64)))  # noqa: E731  (piecewise log-linear)
    draws = iter([0.7, -0.4, 1.1, 0.2, -0.9])
    latents = torch.tensor([0.3, -1.2, 0.5, 2.0], dtype=f64).reshape(1, 1, 2, 2)
    out = S.sample_pc(gaussian_denoiser(MU, SD), latents, sde, lambda x: torch.full_like(x, next(draws)),
                      predictor="ancestral", corrector="none")

    mu, zs = MU.flatten().numpy(), iter([0.7, -0.4, 1.1, 0.2, -0.9])
    T = sde.t_max
    x = latents.flatten().numpy() * sde.prior_std
    for t in np.linspace(T, sde.t_eps, N):
        sig = sig_t(t)
        if kind == "ve":
            s = 1.0
        else:
            s = 1 / math.sqrt(1 + sig**2)
        y = x / s
        score = ((mu + SD**2 / (SD**2 + sig**2) * (y - mu)) - y) / (sig**2 * s)
        k = int(math.floor(t * (N - 1) / T))
        z = next(zs)
        if kind == "ve":
            lev = lambda j: 0.01 * 1000.0 ** (j / (N - 1))  # noqa: E731
            sk, sk1 = lev(k), (lev(k - 1) if k > 0 else 0.0)
            mean = x + (sk**2 - sk1**2) * score
            x = mean + math.sqrt(sk1**2 * (sk**2 - sk1**2) / sk**2) * z
        else:
            if kind == "vp":
                b = np.linspace(0.1 / N, 2.0 / N, N)[k]
            else:
                tau = np.linspace(0, T, N)
                abar = 1 / (1 + np.array([sig_t(u) for u in tau]) ** 2)
                b = (1 - abar / np.concatenate([[1.0], abar[:-1]]))[k]
            mean = (x + b * score) / math.sqrt(1 - b)
            x = mean + math.sqrt(b) * z
    np.testing.assert_allclose(out.flatten().numpy(), mean, rtol=1e-10, atol=1e-12)


def test_edm_process_inverts_its_rho_grid():
    """EDM's process sigma(t) = (a + t (b - a))^rho, a = smin^(1/rho), b = smax^(1/rho): sigma_inv undoes it."""
    sde = EDMSDE(0.002, 80.0, rho=7.0)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=f64)
    a, b = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    np.testing.assert_allclose(sde.sigma(t).numpy(), (a + t.numpy() * (b - a)) ** 7, rtol=1e-14)
    torch.testing.assert_close(sde.sigma_inv(sde.sigma(t)), t, rtol=1e-12, atol=1e-14)
    assert repr(sde.with_steps(7)) == "EDMSDE(N=7)"


def test_table_process_interpolates_in_log_sigma_and_clamps_at_its_ends():
    """DiscreteSDE (§1): sigma(t) log-linear between the table's points at integer t, the end values outside
    [0, T-1]; sigma_inv inverts it and maps sigmas beyond the table to 0 / T-1; the derivative is the
    log-slope times sigma; the table must increase."""
    table = torch.tensor([0.1, 0.4, 2.0], dtype=f64)
    sde = DiscreteSDE(table)
    t = torch.tensor([-1.0, 0.0, 0.25, 1.0, 1.5, 2.0, 3.0], dtype=f64)
    lt = np.log(table.numpy())
    want = np.exp(np.interp(t.numpy().clip(0, 2), [0, 1, 2], lt))
    np.testing.assert_allclose(sde.sigma(t).numpy(), want, rtol=1e-14)
    s = torch.tensor([0.01, 0.1, 0.2, 0.4, 1.0, 2.0, 5.0], dtype=f64)
    want_t = np.interp(np.log(s.numpy()), lt, [0, 1, 2])  # np.interp clamps to the ends
    np.testing.assert_allclose(sde.sigma_inv(s).numpy(), want_t, rtol=1e-14, atol=1e-15)
    inside = torch.tensor([0.3, 0.9, 1.7], dtype=f64)
    slope = np.where(inside.numpy() < 1, lt[1] - lt[0], lt[2] - lt[1])
    np.testing.assert_allclose(sde.sigma_deriv(inside).numpy(), sde.sigma(inside).numpy() * slope, rtol=1e-14)
    two = DiscreteSDE(torch.tensor([0.5, 3.0], dtype=f64))
    assert float(two.sigma(torch.tensor(1.0, dtype=f64))) == pytest.approx(3.0, rel=1e-14)
    assert float(two.sigma_inv(torch.tensor(3.0, dtype=f64))) == 1.0
    for bad in ([0.5, 0.5], [2.0, 1.0], [0.1, 0.3, 0.2]):
        with pytest.raises(ValueError, match=r"^the sigma table must increase with the index$"):
            DiscreteSDE(torch.tensor(bad, dtype=f64))
    abar = torch.tensor([0.99, 0.5, 0.01], dtype=f64)
    from_abar = DiscreteSDE.from_alpha_bar(abar, N=2)
    np.testing.assert_allclose(from_abar.table.numpy(), np.sqrt((1 - abar.numpy()) / abar.numpy()), rtol=1e-14)
    assert from_abar.N == 2 and from_abar.table.dtype == f64


def test_the_ablation_refit_takes_its_epsilon_s():
    """ablation_sde hands epsilon_s to the VP refit: sigma(epsilon_s) = sigma_min at epsilon_s = 0.05 (the
    default 1e-3 would put sigma_min there instead)."""
    from difflab.methods.gaussian.sde import ablation_sde

    vp = ablation_sde("vp", "vp", 0.02, 80.0, 0.05)
    assert vp.t_eps == 0.05
    assert float(vp.sigma(torch.tensor(0.05, dtype=f64))) == pytest.approx(0.02, rel=1e-10)


@pytest.mark.parametrize("cls", [VPSDE, SubVPSDE])
@pytest.mark.parametrize("beta_d", [0.0, 1.0])
def test_vp_type_inverse_with_a_constant_or_unit_beta_slope(cls, beta_d):
    """sigma_inv(sigma(t)) = t also when beta(t) is constant (beta_d = 0: ln m = -t beta_min / 2, a linear root)
    and at beta_d = 1 (the quadratic root)."""
    sde = cls(2.0, 2.0 + beta_d)
    t = torch.tensor([0.01, 0.3, 0.9], dtype=f64)
    m = torch.exp(-0.25 * t**2 * beta_d - 0.5 * t * 2.0)
    torch.testing.assert_close(sde.s(t), m)  # both share the mean coefficient m(t)
    torch.testing.assert_close(sde.sigma_inv(sde.sigma(t)), t, rtol=1e-10, atol=1e-12)


def test_the_vp_chain_needs_beta_max_over_n_below_one():
    """beta_k = linspace(bmin/N, bmax/N, N) needs bmax/N < 1: N = 20 (exactly 1) and N = 15 (1.33) are refused
    with the ratio and the smallest N that works; N = 21 is the first accepted."""
    with pytest.raises(UserError, match=r"^--steps 20: the VP chain's beta_max/N = 1 is >= 1; use at least 21 steps$"):
        VPSDE(0.1, 20.0, N=20).discrete_betas()
    with pytest.raises(UserError, match=r"beta_max/N = 1\.33 is >= 1"):
        VPSDE(0.1, 20.0, N=15).discrete_betas()
    betas = VPSDE(0.1, 20.0, N=21).discrete_betas()
    assert float(betas[-1]) == pytest.approx(20.0 / 21, rel=1e-15) and float(betas[0]) == pytest.approx(0.1 / 21)


def test_process_coefficients_keep_the_callers_float_dtype_and_take_integer_times():
    """A float32 time gives float32 coefficients (no silent float64 promotion); an integer time is read as
    float64 (VE: sigma(t) = smin (smax/smin)^t at t = 0 and 1)."""
    ve = VESDE(0.01, 50.0)
    t32 = torch.tensor([0.25, 0.75])
    assert ve.sigma(t32).dtype == torch.float32 and VPSDE().s(t32).dtype == torch.float32
    got = ve.sigma(torch.tensor([0, 1]))
    assert got.dtype == f64
    torch.testing.assert_close(got, torch.tensor([0.01, 50.0], dtype=f64))


def test_the_table_chain_through_one_and_two_levels():
    """level_betas through N evenly spaced levels tau_j = j (T-1)/(N-1): N = 1 is the level 0 alone
    (beta = 1 - abar_0), N = 2 the two ends (beta_1 = 1 - abar_{T-1}/abar_0)."""
    abar = torch.tensor([0.9, 0.6, 0.3, 0.1], dtype=f64)
    one, two = DiscreteSDE.from_alpha_bar(abar, N=1), DiscreteSDE.from_alpha_bar(abar, N=2)
    torch.testing.assert_close(one.level_betas(), torch.tensor([0.1], dtype=f64))
    torch.testing.assert_close(two.level_betas(), torch.tensor([0.1, 1 - 0.1 / 0.9], dtype=f64))


def test_per_row_coefficients_take_the_batch_dtype():
    """A float32 batch with float64 per-row times: the marginal's mean and std come back float32 (the per-row
    coefficients are cast to the batch's dtype, not promoting it)."""
    x = torch.ones(2, 1, 2, 2)
    mean, std = VPSDE().marginal(x, torch.tensor([0.2, 0.7], dtype=f64))
    assert mean.dtype == std.dtype == torch.float32
