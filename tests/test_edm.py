"""EDM family: preconditioner rows of §5.1, loss weights of §5.2, samplers of §5.3/5.4 against oracles."""

import math

import pytest
import torch
from torch import nn

from difflab.errors import UserError
from difflab.methods.gaussian import samplers as S
from difflab.methods.gaussian.edm import EDMMethod
from difflab.methods.gaussian.precond import EDMPrecond, IDDPMPrecond, VEPrecond, VPPrecond
from difflab.rng import StackedRandomGenerator
from tests.oracles import finite_denoiser, gaussian_denoiser

f64 = torch.float64

SIG = torch.tensor([1e-3, 0.02, 0.3, 1.0, 7.5, 80.0], dtype=torch.float64)


def test_vp_coefficients_match_spec():
    p = VPPrecond()
    c_skip, c_out, c_in, c_noise = p.coefficients(SIG)
    t = (torch.sqrt(0.1**2 + 2 * 19.9 * torch.log1p(SIG**2)) - 0.1) / 19.9
    assert torch.equal(c_skip, torch.ones_like(SIG))
    assert torch.allclose(c_out, -SIG)
    assert torch.allclose(c_in, 1 / torch.sqrt(SIG**2 + 1))
    assert torch.allclose(c_noise, 999 * t)
    assert torch.allclose(p.sigma(p.sigma_inv(SIG)), SIG, rtol=1e-10)
    assert p.sigma_min == pytest.approx(0.0010, rel=0.01) and p.sigma_max == pytest.approx(152.2, rel=1e-3)


def test_ve_coefficients_match_spec():
    c_skip, c_out, c_in, c_noise = VEPrecond().coefficients(SIG)
    assert torch.equal(c_skip, torch.ones_like(SIG)) and torch.equal(c_in, torch.ones_like(SIG))
    assert torch.allclose(c_out, SIG) and torch.allclose(c_noise, torch.log(SIG / 2))


def test_edm_coefficients_and_weighting():
    p = EDMPrecond()
    sd = 0.5
    c_skip, c_out, c_in, c_noise = p.coefficients(SIG)
    assert torch.allclose(c_skip, sd**2 / (SIG**2 + sd**2))
    assert torch.allclose(c_out, SIG * sd / torch.sqrt(SIG**2 + sd**2))
    assert torch.allclose(c_in**2 * (SIG**2 + sd**2), torch.ones_like(SIG))
    assert torch.allclose(c_noise, torch.log(SIG) / 4)
    assert torch.allclose(p.loss_weight(SIG) * c_out**2, torch.ones_like(SIG))
    z = torch.zeros(1, dtype=torch.float64)
    assert p.coefficients(z)[0].item() == 1 and p.coefficients(z)[1].item() == 0


def test_iddpm_table_and_coefficients():
    p = IDDPMPrecond()
    assert p.u[-1] == 0 and p.sigma_min == pytest.approx(0.00643, rel=2e-3)
    assert p.sigma_max == pytest.approx(2.03e4, rel=5e-3)
    assert torch.all(p.u[:-1] > p.u[1:])  # strictly decreasing
    sig = p.u[[5, 200, 998]]
    c_skip, c_out, c_in, c_noise = p.coefficients(sig)
    assert torch.equal(c_noise, torch.tensor([999 - 5, 999 - 200, 999 - 998], dtype=torch.float64))
    assert torch.allclose(c_out, -sig) and torch.allclose(c_in, 1 / torch.sqrt(sig**2 + 1))
    assert torch.equal(p.round_sigma(sig * 1.0001), sig)


class OracleNet(nn.Module):
    """A backbone that, through a given preconditioner, makes D equal the Gaussian oracle."""

    def __init__(self, precond, mu, s):
        super().__init__()
        self.precond, self.D = precond, gaussian_denoiser(mu, s)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        raise NotImplementedError


@pytest.mark.parametrize("variant", ["vp", "ve", "edm"])
def test_denoise_applies_coefficients(variant):
    """D = c_skip x + c_out F(c_in x; c_noise): check with a linear backbone F(y) = 2y + c_noise."""

    class Lin(nn.Module):
        def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
            return 2 * x + noise_labels.reshape(-1, 1, 1, 1)

    m = EDMMethod(Lin(), 1, 2, variant=variant)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    sig = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = m.precond.coefficients(sig)
    r = lambda v: v.reshape(-1, 1, 1, 1)
    expect = r(c_skip) * x + r(c_out) * (2 * r(c_in) * x + r(c_noise))
    assert torch.allclose(m.denoise(x, sig), expect, atol=1e-5)


def test_loss_is_zero_for_exact_denoiser_of_point_mass():
    """With data a point mass x*, D* = x* has zero loss; the loss sums lambda |D - y|^2 over elements."""

    class PointMass(nn.Module):
        # F such that D = x* exactly: F = (x* - c_skip x)/c_out, recovered from c_in x and c_noise (EDM).
        def forward(self, y, c_noise, class_labels=None, augment_labels=None, context=None):
            sigma = torch.exp(4 * c_noise).reshape(-1, 1, 1, 1)
            sd = 0.5
            x = y * torch.sqrt(sigma**2 + sd**2)
            c_skip = sd**2 / (sigma**2 + sd**2)
            c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
            return (0.25 - c_skip * x) / c_out

    m = EDMMethod(PointMass(), 1, 2, variant="edm")
    x0 = torch.full((4, 1, 2, 2), 0.25)
    loss = m.loss(x0, None, StackedRandomGenerator("cpu", range(4)))
    assert loss.shape == (4,) and loss.abs().max() < 1e-6


def gaussian_heun_std(steps, s=0.5, n=20000, churn=None, solver="heun"):
    mu = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    D = gaussian_denoiser(mu, s)
    rng = StackedRandomGenerator("cpu", range(n))
    z = rng.randn([n, 1, 2, 2], torch.float64)
    kw = dict(churn or {})
    x = S.sample_heun(D, z, S.sigmas_edm(steps), rng.randn_like, solver=solver, **kw)
    return x, mu


def test_heun_reproduces_gaussian_mean_and_cov():
    x, mu = gaussian_heun_std(200, n=20000)
    flat = x.reshape(len(x), -1)
    assert torch.allclose(flat.mean(0), mu.reshape(-1), atol=0.015)  # MC error ~ 0.5/sqrt(2e4)*3
    cov = torch.cov(flat.T)
    assert torch.allclose(cov, 0.25 * torch.eye(4, dtype=torch.float64), atol=0.012)


def test_heun_is_second_order_and_euler_first_order():
    """The sampler is an affine map per sample, so the std error isolates the discretisation error."""
    s = 0.5
    errs = {}
    for solver in ("heun", "euler"):
        errs[solver] = []
        for n in (8, 16, 32):
            x, _ = gaussian_heun_std(n, n=64, solver=solver)
            z = StackedRandomGenerator("cpu", range(64)).randn([64, 1, 2, 2], torch.float64)
            mu = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64).reshape(1, 1, 2, 2)
            # exact solution: x = mu + (z*80 - mu) * sqrt((s^2)/(s^2+80^2))
            exact = mu + (z * 80 - mu) * math.sqrt(s**2 / (s**2 + 80**2))
            errs[solver].append((x - exact).abs().max().item())
    rate = lambda e: math.log2(e[1] / e[2])
    assert rate(errs["heun"]) > 1.7, errs
    assert 0.7 < rate(errs["euler"]) < 1.4, errs
    assert errs["heun"][2] < errs["euler"][2]


def test_churn_sampler_matches_spec_std():
    x, mu = gaussian_heun_std(18, n=20000, churn=dict(S_churn=30, S_min=0.01, S_max=1, S_noise=1.007))
    # spec §5.9: std 0.545 with these settings, mean error < 2e-3 (MC error here ~4e-3)
    assert (x - x.mean(0)).std().item() == pytest.approx(0.545, abs=0.008)
    assert (x.mean(0) - mu[0]).abs().max() < 0.012


def test_heun_18_steps_std_matches_spec():
    x, _ = gaussian_heun_std(18, n=20000)
    # deterministic: std is an affine function of the latent; spec §5.9 reports 0.5275 at N=18
    assert (x - x.mean(0)).std().item() == pytest.approx(0.5275, abs=0.006)


def test_finite_dataset_samples_land_on_points():
    pts = torch.tensor([[1.0, -1.0, 0.5, 0.0], [-0.5, 0.5, -1.0, 1.0], [0.0, 0.9, 0.9, -0.9]],
                       dtype=torch.float64).reshape(3, 1, 2, 2)
    n = 600
    rng = StackedRandomGenerator("cpu", range(n))
    x = S.sample_heun(finite_denoiser(pts), rng.randn([n, 1, 2, 2], torch.float64), S.sigmas_edm(18))
    d = ((x.reshape(n, 1, -1) - pts.reshape(1, 3, -1)) ** 2).sum(-1).sqrt()
    nearest = d.min(1)
    assert nearest.values.max() < 1e-6
    freq = torch.bincount(nearest.indices, minlength=3).double() / n
    assert torch.all((freq - 1 / 3).abs() < 0.07), freq


def test_ablation_sampler_reproduces_heun_and_counts_nfe():
    D0 = gaussian_denoiser(torch.zeros(1, 1, 2, 2, dtype=torch.float64), 0.5)
    calls = []

    def D(x, sigma):
        calls.append(1)
        return D0(x, sigma)

    z = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    a = S.sample_heun(D, z, S.sigmas_edm(18))
    assert len(calls) == 35  # NFE = 2N - 1
    b = S.sample_ablation(D, z, num_steps=18, solver="heun", discretization="edm", schedule="linear",
                          scaling="none")
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)  # same algebra, different association of terms


@pytest.mark.parametrize("disc,sched,scaling,steps", [("vp", "vp", "vp", 64), ("ve", "ve", "none", 256),
                                                       ("iddpm", "linear", "none", 64), ("edm", "vp", "vp", 64)])
def test_ablation_variants_converge_on_gaussian(disc, sched, scaling, steps):
    mu = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    D = gaussian_denoiser(mu, 0.5)
    n = 4000
    rng = StackedRandomGenerator("cpu", range(n))
    x = S.sample_ablation(D, rng.randn([n, 1, 2, 2], torch.float64), num_steps=steps, discretization=disc,
                          schedule=sched, scaling=scaling)
    assert torch.allclose(x.mean(0), mu[0], atol=0.03)
    assert (x - x.mean(0)).std().item() == pytest.approx(0.5, abs=0.02)


def test_seeds_are_batch_independent():
    """The same seeds at batch 1, 7 and 64 give identical samples (DESIGN.md Seeds)."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
            return self.conv(x) * noise_labels.reshape(-1, 1, 1, 1).cos()

    torch.manual_seed(0)
    m = EDMMethod(Tiny(), 1, 4).eval()
    seeds = list(range(64))
    with m.batch_invariant(8):
        full = m.sample(StackedRandomGenerator("cpu", seeds), steps=4, S_churn=5)
        for bs in (1, 7):
            parts = [m.sample(StackedRandomGenerator("cpu", seeds[i:i + bs]), steps=4, S_churn=5)
                     for i in range(0, 64, bs)]
            assert torch.equal(torch.cat(parts), full)


def test_sampler_defaults_of_edm_family_runs():
    """The documented defaults (docs/methods/edm.md, docs/samplers.md): Heun with 18 steps; 18 for every
    EDM-grid solver, the whole 1000-step chain for pc / ode, 50 for DDIM; the fast solvers 20 steps (NFE 20)
    except the two-stage DPM-Solver++(2S), 10 steps (NFE 19); 50 for a sampler with none of its own."""
    m = EDMMethod(nn.Identity(), 1, 2)
    assert m.sampler_defaults() == {"sampler": "heun", "steps": 18}
    expected = {"heun": 18, "euler": 18, "ablation": 18, "pc": 1000, "ode": 1000, "ddim": 50, "dpmpp_2m": 20,
                "dpmpp_3m": 20, "dpmpp_2s": 10, "dpmpp_sde": 20, "unipc": 20, "euler_ancestral": 20, "ipndm": 20,
                "deis": 20, "adaptive": 20, "ancestral": 50, "someone_elses": 50}
    assert {s: m.default_steps(s) for s in expected} == expected
    assert set(S.FAST_SAMPLERS) <= set(expected)


def test_each_preconditioner_samples_on_its_own_process():
    """§5.1: VP samples on its own VP SDE, VE on a VE SDE over [0.02, 100], iDDPM on its u_j table (largest
    first in the table, as the SDE stores it smallest first), EDM on [0.002, 80] clamped to its range."""
    from difflab.methods.gaussian.sde import EDMSDE, VESDE, DiscreteSDE

    vp = EDMMethod(nn.Identity(), 1, 2, variant="vp")
    assert vp.variant == "vp" and vp.sde is vp.precond.sde
    ve = EDMMethod(nn.Identity(), 1, 2, variant="ve")
    assert type(ve.sde) is VESDE and (ve.sde.smin, ve.sde.smax) == (0.02, 100.0)
    idd = EDMMethod(nn.Identity(), 1, 2, variant="iddpm", precond_kwargs={"M": 50})
    t = idd.sde.table
    assert type(idd.sde) is DiscreteSDE and len(t) == 50 and bool((t[1:] > t[:-1]).all())
    assert (float(t[0]), float(t[-1])) == (idd.precond.sigma_min, idd.precond.sigma_max)
    for kw, rng in [({}, (0.002, 80.0)), ({"sigma_min": 0.01, "sigma_max": 20.0}, (0.01, 20.0)),
                    ({"sigma_min": 0.0, "sigma_max": 200.0}, (0.002, 80.0))]:
        edm = EDMMethod(nn.Identity(), 1, 2, variant="edm", precond_kwargs=kw)
        assert type(edm.sde) is EDMSDE and (edm.sde.smin, edm.sde.smax) == rng, kw
    with pytest.raises(UserError, match=r"^--precond 'ddpm' is not an EDM-family preconditioner; use one of "
                                        r"\['vp', 've', 'iddpm', 'edm'\]$"):
        EDMMethod(nn.Identity(), 1, 2, variant="ddpm")
    assert EDMMethod(nn.Identity(), 1, 2).label_dim == 0
    assert EDMMethod.net_out_channels(3) == 3 and EDMMethod.net_out_channels(3, variant="iddpm") == 6


class Recorder(nn.Module):
    """Returns a fixed multiple of its input and records what the method hands the backbone."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.calls.append((x, noise_labels, class_labels, augment_labels))
        return 0.5 * x


def test_denoise_hands_the_backbone_float32_and_forms_D_in_the_input_dtype():
    """D = c_skip x + c_out F(c_in x; c_noise) with σ in float64 for float64 input (σ = 0.3 is not a float32
    number): against the EDM formulas in numpy-precision float64; a scalar σ is broadcast to every row; the
    backbone gets float32 inputs, a float32 c_noise [N], and the class and augmentation labels."""
    net = Recorder()
    m = EDMMethod(net, 2, 4)
    x = torch.randn(3, 2, 4, 4, dtype=f64)
    labels, aug = torch.eye(3)[:, :2], torch.randn(3, 9)
    D = m.denoise(x, 0.3, labels, aug)
    s, sd = 0.3, 0.5
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2), 1 / math.sqrt(s**2 + sd**2)
    F = 0.5 * (c_in * x).to(torch.float32).to(f64)
    assert D.dtype == f64
    torch.testing.assert_close(D, c_skip * x + c_out * F, rtol=1e-15, atol=1e-15)
    xin, c_noise, got_labels, got_aug = net.calls[-1]
    assert xin.dtype == torch.float32 and c_noise.dtype == torch.float32 and c_noise.shape == (3,)
    torch.testing.assert_close(c_noise, torch.full((3,), math.log(0.3) / 4, dtype=torch.float32))
    assert got_labels is labels and got_aug is aug
    per_row = m.denoise(x, torch.tensor([0.3, 0.3, 0.3], dtype=f64), labels, aug)
    assert torch.equal(per_row, D)
    D32 = m.denoise(x.float(), torch.tensor(0.3))
    assert D32.dtype == torch.float32 and net.calls[-1][1].shape == (3,)


def test_the_loss_hands_labels_to_the_backbone():
    net = Recorder()
    m = EDMMethod(net, 2, 4, label_dim=2)
    labels, aug = torch.eye(3)[:, :2], torch.randn(3, 9)
    m.loss(torch.randn(3, 2, 4, 4), labels, StackedRandomGenerator("cpu", [1, 2, 3]), aug)
    assert net.calls[-1][2] is labels and net.calls[-1][3] is aug


def test_round_sigma_is_the_identity_except_for_iddpm():
    """EDM / VP / VE take any σ; iDDPM rounds to the nearest u_j in float64."""
    assert EDMMethod(nn.Identity(), 1, 2).round_sigma(0.3) == 0.3
    idd = EDMMethod(nn.Identity(), 1, 2, variant="iddpm", precond_kwargs={"M": 50})
    r = idd.round_sigma(0.3)
    u = idd.precond.u[:50].to(f64)
    assert r.dtype == f64 and float(r) == float(u[(u - 0.3).abs().argmin()])
