"""Fast samplers (issue 11): DPM-Solver++ (2M, 3M, 2S, SDE), UniPC, Euler ancestral, iPNDM, DEIS, adaptive RK45,
and the log-SNR grid. Pinned against closed forms (specs/gaussian_and_dddm.md §7 A: the exact PF-ODE map of
Gaussian data; a 2-D mixture solved to 1e-10), convergence orders, NFE counts and per-seed noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.errors import UserError
from difflab.methods.gaussian import ode
from difflab.methods.gaussian import samplers as S
from difflab.rng import StackedRandomGenerator
from tests.oracles import gaussian_denoiser
from tests.test_score_sde import BatchRNG

f64 = torch.float64
MU = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=f64).reshape(1, 4)
SD = 0.5
D_GAUSS = gaussian_denoiser(MU, SD)
DETERMINISTIC = ["dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "unipc", "ipndm", "deis"]
STOCHASTIC = ["dpmpp_sde", "euler_ancestral"]


def run(name: str, D, z: torch.Tensor, sigmas: torch.Tensor, **kw) -> torch.Tensor:
    return getattr(S, f"sample_{name}")(D, z, sigmas, **kw)


def gaussian_exact(z: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """§7 A: ``x(sigma) - mu = (x(sigma') - mu) sqrt((s^2 + sigma^2)/(s^2 + sigma'^2))`` from ``z sigma_max`` to the
    grid's last nonzero sigma, then the exact ``D`` there (what every sampler's last step takes)."""
    smax, smin = float(sigmas[0]), float(sigmas[-2])
    x = MU + (z * smax - MU) * math.sqrt((SD**2 + smin**2) / (SD**2 + smax**2))
    return D_GAUSS(x, torch.tensor(smin, dtype=f64))


# ---- grids -----------------------------------------------------------------------------------------------------

def test_logsnr_grid_is_uniform_in_log_snr_and_is_the_exponential_and_ve_grid():
    g = S.sigmas_logsnr(7, 0.002, 80.0)
    lam = -g[:-1].log()
    assert g[-1] == 0 and len(g) == 8
    assert torch.allclose(g[0], torch.tensor(80.0, dtype=f64)) and torch.allclose(g[-2], torch.tensor(0.002, dtype=f64))
    assert torch.allclose(lam.diff(), torch.full((6,), math.log(80 / 0.002) / 6, dtype=f64))
    assert S.sigmas_exponential is S.sigmas_logsnr
    assert torch.allclose(g, S.sigmas_ve(7, 0.002, 80.0))  # EDM's "ve" discretisation is geometric in sigma^2


def test_method_grids_and_their_options():
    from tests.test_gaussian_matrix import build

    m = build("edm")
    assert torch.allclose(m.sigma_grid("dpmpp_2m", 5, grid="logsnr"), S.sigmas_logsnr(5, 0.002, 80.0))
    assert torch.allclose(m.sigma_grid("dpmpp_2m", 5, grid="exponential", sigma_min=0.01),
                          S.sigmas_logsnr(5, 0.01, 80.0))
    with pytest.raises(UserError, match="rho"):
        m.sigma_grid("dpmpp_2m", 5, grid="logsnr", rho=3.0)
    with pytest.raises(UserError, match="unknown"):
        m.sigma_grid("dpmpp_2m", 5, grid="cosine")


# ---- the exponential integrator and the VP form -----------------------------------------------------------------

def test_newton_step_integrates_a_quadratic_exactly():
    """(*) with ``D(lambda)`` a quadratic (three nodes) is exact: against a fine numerical integral."""
    lams = [1.3, 0.9, 0.2]  # newest first
    a, b, c = 0.4, -0.7, 0.25
    Dq = lambda lam: a + b * lam + c * lam**2  # noqa: E731
    x, h = torch.tensor([2.0], dtype=f64), 0.8
    got = S._exp_multistep(x, h, [torch.tensor([Dq(v)], dtype=f64) for v in lams], lams)
    u = np.linspace(0, h, 2_000_001)
    want = math.exp(-h) * 2.0 + np.trapezoid(np.exp(u - h) * Dq(lams[0] + u), u)
    assert abs(float(got) - want) < 1e-11


def test_dpmpp_step_in_vp_form_is_the_ve_step():
    """DPM-Solver++ in data prediction does not see the scaling: one 2M step written in VP variables
    (``x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^{-h}) D_d``, sigma and alpha of the VP chain) equals the VE
    step times ``alpha_t``."""
    sig = torch.tensor([3.0, 1.2, 0.4, 0.0], dtype=f64)
    z = torch.tensor([[0.7, -1.1, 0.2, 0.5]], dtype=f64)
    steps = []
    S.sample_dpmpp_2m(D_GAUSS, z, sig, callback=lambda i, x: steps.append(x.clone()))
    # by hand in the VP chain, from the VE state after step 0
    a = lambda s: 1 / math.sqrt(1 + s**2)  # noqa: E731
    svp = lambda s: s / math.sqrt(1 + s**2)  # noqa: E731
    lam = lambda s: math.log(a(s) / svp(s))  # noqa: E731
    x_vp = a(1.2) * steps[0]
    D_prev = D_GAUSS(z * 3.0, torch.tensor(3.0, dtype=f64))
    D_cur = D_GAUSS(steps[0], torch.tensor(1.2, dtype=f64))
    h, h_prev = lam(0.4) - lam(1.2), lam(1.2) - lam(3.0)
    D_d = (1 + h / (2 * h_prev)) * D_cur - h / (2 * h_prev) * D_prev
    x_vp_next = svp(0.4) / svp(1.2) * x_vp + a(0.4) * (1 - math.exp(-h)) * D_d
    assert torch.allclose(x_vp_next / a(0.4), steps[1], rtol=1e-13, atol=1e-13)


# ---- convergence: Gaussian closed form, orders ------------------------------------------------------------

ORDERS = {"dpmpp_2m": 2, "dpmpp_3m": 3, "dpmpp_2s": 2, "unipc": 3, "ipndm": 2, "deis": 3}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_to_the_exact_gaussian_map_at_their_order(name):
    """Max error against §7 A's closed form falls as ``2^-order`` per doubling of the log-SNR grid (iPNDM's
    equal-step coefficients on an uneven grid: order 2; UniPC's corrector lifts order 3 to about 4)."""
    z = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=f64)
    errs = []
    for n in (40, 80, 160):
        sig = S.sigmas_logsnr(n)
        errs.append(float((run(name, D_GAUSS, z, sig) - gaussian_exact(z, sig)).abs().max()))
    rates = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert errs[-1] < 2e-3, errs
    assert min(rates) > ORDERS[name] - 0.4, (errs, rates)


# a small 2-D mixture with its exact denoiser; its PF-ODE map solved to 1e-10
MIX_MU = torch.tensor([[-0.6, 0.2], [0.5, -0.3], [0.1, 0.7]], dtype=f64)
MIX_S = torch.tensor([0.15, 0.25, 0.1], dtype=f64)
MIX_PI = torch.tensor([0.3, 0.5, 0.2], dtype=f64)


def D_mix(x: torch.Tensor, sigma) -> torch.Tensor:
    var = MIX_S[None] ** 2 + torch.as_tensor(sigma, dtype=f64).reshape(-1, 1) ** 2
    d2 = ((x[:, None] - MIX_MU[None]) ** 2).sum(-1)
    w = torch.softmax(MIX_PI.log()[None] - d2 / (2 * var) - var.log(), dim=1)  # d = 2: log of var^(d/2) = var
    means = MIX_MU[None] + (MIX_S[None] ** 2 / var)[..., None] * (x[:, None] - MIX_MU[None])
    return (w[..., None] * means).sum(1)


@pytest.fixture(scope="module")
def mixture_exact():
    z = torch.randn(128, 2, generator=torch.Generator().manual_seed(3), dtype=f64)
    sig = S.sigmas_edm(8)
    y, _ = ode.solve_rk45(lambda y, u, rows=None: y - D_mix(y, u.exp()), z * 80.0, math.log(80.0),
                          math.log(float(sig[-2])), rtol=1e-10, atol=1e-10)
    return z, D_mix(y, torch.tensor(float(sig[-2]), dtype=f64))


@pytest.mark.parametrize("name,kw", [(n, {}) for n in DETERMINISTIC] + [
    ("unipc", {"variant": "bh1", "order": 2}), ("unipc", {"use_corrector": False}),
    ("dpmpp_3m", {"lower_order_final": False}), ("ipndm", {"order": 3}), ("heun", {}), ("euler", {})])
def test_every_sampler_converges_to_the_mixture_map_on_the_karras_grid(name, kw, mixture_exact):
    """On a 2-D Gaussian mixture the error against the exact map shrinks as steps grow, to the 1e-3 level."""
    z, exact = mixture_exact
    errs = [float((run(name, D_mix, z, S.sigmas_edm(n), **kw) - exact).pow(2).mean().sqrt()) for n in (10, 40, 160)]
    assert errs[2] < errs[1] < errs[0], errs
    assert errs[2] < (1e-2 if name == "euler" else 1e-3), errs


def test_adaptive_reaches_its_tolerance_and_reports_nfe(mixture_exact):
    z, exact = mixture_exact
    errs, nfes = [], []
    for tol in (1e-3, 1e-6):
        info: dict = {}
        x = S.sample_adaptive(D_mix, z, S.sigmas_edm(8), rtol=tol, atol=tol, info=info)
        errs.append(float((x - exact).abs().max()))
        nfes.append(info["nfe"])
    assert errs[1] < 1e-4 and errs[1] < errs[0] / 10 and nfes[1] > nfes[0], (errs, nfes)


# ---- stochastic samplers: marginals on Gaussian data, per-seed noise ---------------------------------------------

@pytest.mark.parametrize("name,kw", [("dpmpp_sde", {}), ("dpmpp_sde", {"eta": 0.5}), ("euler_ancestral", {})])
def test_stochastic_samplers_reproduce_gaussian_data(name, kw):
    rng = BatchRNG(4000, seed=2, antithetic=True)
    z = rng.randn([4000, 4], dtype=f64)
    steps = 400 if name == "euler_ancestral" else 100  # first order: std 0.47 at 100 steps, 0.49 at 400
    x = run(name, D_GAUSS, z, S.sigmas_edm(steps), randn_like=rng.randn_like, **kw)
    r = x - MU
    assert abs(float(r.std()) - SD) < 0.015 and float(r.mean(0).abs().max()) < 0.01, (float(r.std()), r.mean(0))
    # the noise is really there: not the ODE's answer
    assert (x - S.sample_dpmpp_2m(D_GAUSS, z, S.sigmas_edm(steps))).abs().max() > 0.05


def test_sde_with_eta_zero_is_dpmpp_2m_and_ancestral_with_eta_zero_is_euler():
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=f64)
    sig = S.sigmas_edm(12)
    assert torch.allclose(S.sample_dpmpp_sde(D_GAUSS, z, sig, eta=0.0), S.sample_dpmpp_2m(D_GAUSS, z, sig),
                          rtol=1e-13, atol=1e-13)
    assert torch.allclose(S.sample_euler_ancestral(D_GAUSS, z, sig, eta=0.0), S.sample_euler(D_GAUSS, z, sig),
                          rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samples_depend_on_their_seed_alone(name):
    seeds = [0, 1, 2, 3, 4]
    sig = S.sigmas_edm(6)

    def sample(seed_list):
        rng = StackedRandomGenerator("cpu", seed_list)
        return run(name, D_GAUSS, rng.randn([len(seed_list), 4], dtype=f64), sig, randn_like=rng.randn_like)

    together = sample(seeds)
    alone = torch.cat([sample([s]) for s in seeds])
    mixed = sample([7, 2, 9])
    assert torch.equal(together, alone) and torch.equal(together[2], mixed[1])


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_through_a_method_are_batch_invariant(name):
    from tests.test_gaussian_matrix import build

    m = build("vp", resolution=8)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seeds = list(range(5))
    with m.batch_invariant(4):
        together = m.sample(StackedRandomGenerator("cpu", seeds), sampler=name, steps=6)
        alone = torch.cat([m.sample(StackedRandomGenerator("cpu", [s]), sampler=name, steps=6) for s in seeds])
    assert torch.equal(together, alone) and together.std() > 0


# ---- the last step, NFE, options --------------------------------------------------------------------------------

class Counting:
    def __init__(self, D):
        self.D, self.calls, self.last = D, 0, None

    def __call__(self, x, sigma):
        self.calls += 1
        self.last = (x.clone(), sigma)
        return self.D(x, sigma)


NFE = {"dpmpp_2s": lambda n: 2 * n - 1}


@pytest.mark.parametrize("name", DETERMINISTIC + STOCHASTIC)
def test_last_step_returns_the_denoiser_and_nfe_per_step(name):
    """The step to sigma = 0 is the first-order ``x = D(x, sigma_min)`` exactly, and NFE is as documented."""
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(5), dtype=f64)
    rng = BatchRNG(6, seed=0)
    for n in (1, 2, 3, 7):
        sig = S.sigmas_edm(n)
        D = Counting(D_GAUSS)
        x = run(name, D, z, sig, randn_like=rng.randn_like)
        assert D.calls == NFE.get(name, lambda n: n)(n), (name, n, D.calls)
        x_last, s_last = D.last
        assert float(s_last) == float(sig[-2]) and torch.equal(x, D_GAUSS(x_last, s_last))


def test_adaptive_nfe_is_the_count_of_calls():
    D = Counting(D_GAUSS)
    info: dict = {}
    S.sample_adaptive(D, torch.ones(1, 4, dtype=f64), S.sigmas_edm(4), rtol=1e-3, atol=1e-3, info=info)
    assert info["nfe"] == D.calls


@pytest.mark.parametrize("sampler,opts,match", [
    ("unipc", {"order": 5}, "order"), ("unipc", {"order": 2.5}, "order"), ("unipc", {"variant": "bh3"}, "variant"),
    ("ipndm", {"order": 0}, "order"), ("deis", {"order": 5}, "order")])
def test_bad_sampler_options_give_one_line(sampler, opts, match):
    with pytest.raises(UserError, match=match) as e:
        run(sampler, D_GAUSS, torch.zeros(1, 4, dtype=f64), S.sigmas_edm(3), **opts)
    assert "\n" not in str(e.value)


def test_options_a_sampler_does_not_take_are_refused():
    with pytest.raises(UserError, match="do not apply"):
        S.check_options("dpmpp_2m", {"eta": 1.0})
    with pytest.raises(UserError, match="do not apply"):
        S.check_options("adaptive", {"rho": 7.0})
    S.check_options("unipc", {"order": 2, "variant": "bh1", "grid": "logsnr", "sigma_min": 0.01})
    S.check_options("dpmpp_sde", {"eta": 0.5, "S_noise": 1.0, "grid": "karras"})


def test_generate_cli_takes_a_fast_sampler_and_a_grid(tmp_path, monkeypatch):
    """``--grid`` reaches the sampler (generate()'s own ``grid`` is the montage) and ``dpmpp-2m`` is an alias."""
    import difflab.generate as G
    from difflab.cli import main

    seen = {}
    monkeypatch.setattr(G, "generate", lambda *a, **kw: seen.update(kw) or tmp_path)
    main(["generate", "--network", "RUN", "--outdir", str(tmp_path), "--sampler", "dpmpp-2m", "--grid", "logsnr",
          "--steps", "10", "--order", "2"])
    assert seen["sampler_grid"] == "logsnr" and seen["grid"] is True and seen["sampler"] == "dpmpp-2m"
    from tests.test_gaussian_matrix import build

    m = build("edm")
    m.denoise = lambda x, sigma, class_labels=None: D_GAUSS(x.reshape(x.shape[0], -1), sigma).reshape(x.shape)
    a = m.sample(StackedRandomGenerator("cpu", [0, 1]), sampler="dpmpp-2m", steps=5, grid="logsnr")
    b = m.sample(StackedRandomGenerator("cpu", [0, 1]), sampler="dpmpp_2m", steps=5, grid="logsnr")
    assert torch.equal(a, b)


def test_adaptive_sampling_of_a_conditional_model_follows_each_rows_label():
    """The adaptive solver evaluates only the rows still running; a class-conditional D must get those rows'
    labels (it used to get all of them and fail). Each image equals the one solved alone, label and all."""
    from difflab.rng import StackedRandomGenerator
    from tests.oracles import gaussian_denoiser
    from tests.test_grid_fit import tiny_model

    model = tiny_model(label_dim=2)
    m = torch.linspace(-0.5, 0.5, 64, dtype=torch.float64).reshape(1, 8, 8)
    scales = torch.tensor([0.05, 0.5], dtype=torch.float64)  # very different curvature: rows finish apart

    def denoise(x, sigma, class_labels=None):
        c = class_labels.reshape(-1, 1, 1, 1)
        mu, s = m * (2.0 * c.to(torch.float64) - 1), scales[c]
        return gaussian_denoiser(mu, s)(x, sigma)

    model.denoise = denoise
    info: dict = {}
    seeds = [0, 1, 2, 3, 4, 5]
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    batch = model.sample(StackedRandomGenerator("cpu", seeds), class_labels=labels, sampler="adaptive", info=info)
    alone = torch.cat([model.sample(StackedRandomGenerator("cpu", [s]), class_labels=labels[i:i + 1],
                                    sampler="adaptive") for i, s in enumerate(seeds)])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-6)
    assert info["nfe"] > 10
