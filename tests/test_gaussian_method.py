"""GaussianMethod's own wiring (difflab/methods/gaussian/base.py): classifier-free guidance with a learned-variance
head and x0 clipping, labels per seed, the sigma grids and their option checks, how ``sample`` resolves the
run's stored defaults and hands options to the sampler, and the bits/dim of ``ode_bpd`` against the Gaussian
closed form (specs/gaussian_and_dddm.md §4.6, §5.4)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from difflab.errors import UserError
from difflab.methods.gaussian import samplers as S
from difflab.methods.gaussian.base import GRIDS, work_dtype
from difflab.methods.gaussian.ddpm import DDPMMethod
from difflab.methods.gaussian.edm import EDMMethod
from difflab.rng import StackedRandomGenerator

f64 = torch.float64


def rng_of(n: int, seed: int = 0) -> StackedRandomGenerator:
    return StackedRandomGenerator("cpu", [seed + i for i in range(n)])


def test_work_dtype_is_float64_except_on_mps():
    assert work_dtype("cpu") == f64 and work_dtype(torch.device("cpu")) == f64
    assert work_dtype("mps") == torch.float32


# ---- classifier-free guidance and clipping ------------------------------------------------------------------
def tuple_denoiser(calls):
    """(x0, v) with x0 = x + label (the null label -1 included) and v = 10 x: both outside [-1, 1]."""

    def denoise(x, sigma, class_labels=None):
        calls.append((x, sigma, class_labels))
        lab = class_labels.to(x.dtype).reshape(-1, 1, 1, 1)
        return x + lab, 10 * x

    return denoise


def test_guidance_mixes_x0_and_keeps_the_conditional_variance_head():
    """w != 1: x0 = u + w (c - u) from one call on [x; x] with [labels; -1], sigma broadcast in x's dtype;
    a learned-variance head v is the conditional half, untouched by the mixing."""
    m = EDMMethod(nn.Identity(), 1, 2, label_dim=3)
    calls = []
    m.denoise = tuple_denoiser(calls)
    x = torch.randn(3, 1, 2, 2, dtype=f64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1])
    x0, v = m.guided_denoiser(labels, guidance=2.5)(x, 0.3)
    (xin, sig, lab), = calls
    assert torch.equal(xin, torch.cat([x, x])) and lab.tolist() == [0, 2, 1, -1, -1, -1]
    assert sig.dtype == f64 and sig.tolist() == [0.3] * 6
    cond, uncond = x + labels.to(f64).reshape(-1, 1, 1, 1), x - 1
    torch.testing.assert_close(x0, uncond + 2.5 * (cond - uncond), rtol=1e-15, atol=1e-15)
    assert torch.equal(v, 10 * x)
    plain = m.guided_denoiser(labels, guidance=1.0)(x, 0.3)  # w = 1: the conditional call alone
    assert len(calls) == 2 and calls[-1][2] is labels and torch.equal(plain[0], cond)


def test_clip_clamps_x0_to_the_data_range_on_both_sides_and_leaves_v():
    m = EDMMethod(nn.Identity(), 1, 2, label_dim=3)
    m.denoise = tuple_denoiser([])
    x = torch.tensor([-3.0, -0.5, 0.25, 4.0], dtype=f64).reshape(1, 1, 2, 2)
    for w in (1.0, 2.0):
        x0, v = m.guided_denoiser(torch.tensor([0]), guidance=w, clip=True)(x, 1.0)
        assert x0.flatten().tolist() == ([-1.0, -0.5, 0.25, 1.0] if w == 1 else [-1.0, 0.5, 1.0, 1.0])
        assert torch.equal(v, 10 * x)
    m.denoise = lambda x, sigma, class_labels=None: 2 * x
    assert m.guided_denoiser(None, clip=True)(x, 1.0).flatten().tolist() == [-1.0, -1.0, 0.5, 1.0]
    assert m.guided_denoiser(None, clip=False)(x, 1.0).flatten().tolist() == [-6.0, -1.0, 0.5, 8.0]
    assert m.clip_for("heun", True) is True and m.clip_for("heun", None) is False


def test_draw_labels():
    """A conditional model draws one class per seed when none is given; given ones become long, one per seed."""
    m = EDMMethod(nn.Identity(), 1, 2, label_dim=5)
    drawn = m.draw_labels(rng_of(4), None)
    assert drawn.dtype == torch.long and drawn.shape == (4,) and 0 <= int(drawn.min()) <= int(drawn.max()) < 5
    assert torch.equal(drawn, m.draw_labels(rng_of(4), None))
    given = m.draw_labels(rng_of(3), [1.0, 4.0, 0.0])
    assert given.dtype == torch.long and given.tolist() == [1, 4, 0]
    with pytest.raises(UserError, match=r"^got 2 class labels for 3 samples$"):
        m.draw_labels(rng_of(3), [1, 2])
    assert EDMMethod(nn.Identity(), 1, 2).draw_labels(rng_of(3), [1, 2, 3]) is None


# ---- sigma grids ---------------------------------------------------------------------------------------------
def test_sigma_grids_by_hand():
    """karras: EDM's rho = 7 grid on [0.002, 80]; sigma_min / sigma_max / rho move it within the run's sigma
    range; logsnr (= exponential):
    log-uniform on the same range; time-uniform: the process's own; each ends with 0, in float64."""
    m = EDMMethod(nn.Identity(), 1, 2)
    n = 5

    def karras(lo, hi, rho):
        i = torch.arange(n, dtype=f64)
        return (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho

    def close(a, b):
        torch.testing.assert_close(a[:-1], b, rtol=1e-12, atol=0)
        assert a.dtype == f64 and float(a[-1]) == 0.0 and len(a) == n + 1

    close(m.sigma_grid("heun", n), karras(0.002, 80.0, 7.0))
    close(m.sigma_grid("heun", n, sigma_min=0.01, sigma_max=10.0, rho=3.0), karras(0.01, 10.0, 3.0))
    close(m.sigma_grid("heun", n, sigma_max=200.0), karras(0.002, 200.0, 7.0))  # EDM's network takes any sigma
    ve = EDMMethod(nn.Identity(), 1, 2, variant="ve")
    close(ve.sigma_grid("heun", n, sigma_max=200.0), karras(0.02, 100.0, 7.0))  # clamped to VE's [0.02, 100]
    log_uniform = torch.logspace(math.log10(80.0), math.log10(0.002), n, dtype=f64)
    close(m.sigma_grid("dpmpp_2m", n, grid="logsnr"), log_uniform)
    close(m.sigma_grid("dpmpp_2m", n, grid="exponential", sigma_max=80.0), log_uniform)
    close(m.sigma_grid("dpmpp_2m", n, grid="logsnr", sigma_min=0.02, sigma_max=8.0),
          torch.logspace(math.log10(8.0), math.log10(0.02), n, dtype=f64))
    t = torch.equal(m.sigma_grid("heun", n, grid="time-uniform"), S.sigmas_time_uniform(m.sde, n))
    assert t and len(m.sigma_grid("heun", n, grid="time-uniform")) == n + 1


def test_sigma_grid_option_errors_name_the_options():
    m = EDMMethod(nn.Identity(), 1, 2)
    end = "apply to --grid karras (sigma_min/sigma_max also to logsnr), not --grid"
    for kw, names, grid in [({"sigma_min": 0.1}, "['sigma_min']", "time-uniform"),
                            ({"sigma_max": 5.0}, "['sigma_max']", "time-uniform"),
                            ({"rho": 5.0, "sigma_min": 0.1}, "['sigma_min', 'rho']", "time-uniform"),
                            ({"rho": 5.0, "sigma_min": 0.1}, "['rho']", "logsnr"),
                            ({"rho": 5.0}, "['rho']", "exponential")]:
        with pytest.raises(UserError) as e:
            m.sigma_grid("heun", 4, grid=grid, **kw)
        assert str(e.value) == f"sampler option(s) {names} {end} {grid}", str(e.value)
    with pytest.raises(UserError, match=r"^sampler option\(s\) \['respacing', 'skip'\] apply to --grid table only "
                                        r"\(DDPM runs\)$"):
        m.sigma_grid("ddim", 4, skip="quad", respacing="4")
    with pytest.raises(UserError, match=r"^--grid table needs a discrete DDPM run; edm has no table$"):
        m.sigma_grid("ddim", 4, grid="table")
    with pytest.raises(UserError) as e:
        m.sigma_grid("heun", 4, grid="cosine")
    assert str(e.value) == f"--grid 'cosine' is unknown; choose one of: {', '.join(GRIDS)}"
    assert ", " in str(e.value)


# ---- sample: stored defaults, options, what the sampler is given ----------------------------------------------
def record(monkeypatch, name):
    real = getattr(S, f"sample_{name}")
    calls = []

    @functools.wraps(real)  # the same signature: sample() inspects what a sampler takes
    def rec(*a, **k):
        calls.append((a, k))
        return real(*a, **k)

    monkeypatch.setattr(S, f"sample_{name}", rec)
    return calls


def oracle_edm(label_dim=3, variant="edm", defaults=None):
    m = EDMMethod(nn.Identity(), 1, 2, label_dim=label_dim, variant=variant)
    m.denoise = lambda x, sigma, class_labels=None: 0.5 * x
    if defaults is not None:
        m.sampler_defaults = lambda: dict(defaults)
    return m


def spy_guidance(m, monkeypatch):
    seen = []
    real = m.guided_denoiser

    def spy(labels, guidance=1.0, clip=False):
        seen.append((labels, guidance, clip))
        return real(labels, guidance, clip)

    monkeypatch.setattr(m, "guided_denoiser", spy)
    return seen


def test_sample_takes_the_runs_stored_sampler_steps_and_guidance(monkeypatch):
    """A run's stored defaults: its sampler, its step count (for that sampler only: another sampler gets its
    own default), its guidance; the latents are the seeds' float64 normals."""
    euler, heun = record(monkeypatch, "euler"), record(monkeypatch, "heun")
    m = oracle_edm(defaults={"sampler": "euler", "steps": 7, "guidance": 2.0})
    seen = spy_guidance(m, monkeypatch)
    m.sample(rng_of(2), class_labels=torch.tensor([0, 1]))
    (a, k), = euler
    assert torch.equal(a[2], m.sigma_grid("euler", 7)) and seen[-1][1:] == (2.0, False)
    assert a[1].dtype == f64 and torch.equal(a[1], rng_of(2).randn([2, 1, 2, 2], dtype=f64))
    m.sample(rng_of(2), sampler="heun")
    assert len(heun[-1][0][2]) == 18 + 1 and not heun[-1][1].get("S_churn")
    m.sampler_defaults = lambda: {}
    m.sample(rng_of(2), class_labels=torch.tensor([0, 1]))
    assert len(heun[-1][0][2]) == 18 + 1 and seen[-1][1] == 1.0  # the class's defaults: heun 18, no guidance
    m.sample(rng_of(2), sampler="euler", steps=1, clip_denoised=True, S_churn=None)
    assert len(euler[-1][0][2]) == 2 and seen[-1][2] is True and "S_churn" not in euler[-1][1]
    with pytest.raises(UserError, match=r"^--steps 0: must be a positive integer$"):
        m.sample(rng_of(2), sampler="euler", steps=0)


def test_sample_drops_stored_options_another_sampler_does_not_take(monkeypatch):
    """generate passes the run's stored options with every call: one another sampler does not take is dropped
    while it equals the stored value, and refused when the user changed it."""
    calls = record(monkeypatch, "dpmpp_2m")
    m = oracle_edm(defaults={"sampler": "heun", "steps": 18, "S_churn": 30.0, "skip": "quad"})
    m.sample(rng_of(2), sampler="dpmpp_2m", steps=3, S_churn=30.0, skip="quad")
    assert len(calls) == 1 and "S_churn" not in calls[0][1] and "skip" not in calls[0][1]
    with pytest.raises(UserError, match=r"^sampler option\(s\) \['S_churn'\] do not apply to --sampler dpmpp_2m"):
        m.sample(rng_of(2), sampler="dpmpp_2m", steps=3, S_churn=10.0)
    ddim = record(monkeypatch, "ddim")
    m.sample(rng_of(2), sampler="ddim", steps=3, skip="quad")  # no table on an EDM run: the stored skip goes
    assert torch.equal(ddim[-1][0][2], m.sigma_grid("ddim", 3))


def test_sample_keeps_a_ddpm_runs_table_options_only_on_the_table(monkeypatch):
    ddim = record(monkeypatch, "ddim")
    m = DDPMMethod(nn.Identity(), 1, 2, num_timesteps=100)
    m.denoise = lambda x, sigma, class_labels=None: 0.5 * x
    m.sampler_defaults = lambda: {"sampler": "ancestral", "skip": "quad"}
    m.sample(rng_of(2), sampler="ddim", steps=5, skip="quad")  # the table is ddim's default grid: skip applies
    assert torch.equal(ddim[-1][0][2], m.sigma_grid("ddim", 5, grid="table", skip="quad"))
    assert not torch.equal(ddim[-1][0][2], m.sigma_grid("ddim", 5, grid="table", skip="uniform"))
    m.sample(rng_of(2), sampler="ddim", steps=5, grid="karras", skip="quad")  # not on another grid
    assert torch.equal(ddim[-1][0][2], m.sigma_grid("ddim", 5, grid="karras"))
    seen = spy_guidance(m, monkeypatch)
    m.sample(rng_of(2), sampler="ddim", steps=5)
    m.sample(rng_of(2), sampler="heun", steps=5)
    assert [c for _, _, c in seen] == [True, False]  # the run's clip_denoised, on the table samplers only


def test_sample_hands_round_sigma_and_the_ablation_options(monkeypatch):
    heun, abl = record(monkeypatch, "heun"), record(monkeypatch, "ablation")
    m = oracle_edm(variant="iddpm", label_dim=0)
    m.sample(rng_of(2), steps=3)
    assert heun[-1][1]["round_sigma"] == m.round_sigma
    rng = rng_of(2)
    m.sample(rng, sampler="ablation", steps=4, rho=5.0, solver="euler")
    a, k = abl[-1]
    lo, hi = m.sigma_range
    assert a[2] == rng.randn_like and k["num_steps"] == 4 and k["rho"] == 5.0 and k["solver"] == "euler"
    assert (k["net_sigma_min"], k["net_sigma_max"]) == (lo, hi) and k["round_sigma"] == m.round_sigma


# ---- bits/dim against the closed form ---------------------------------------------------------------------------
MU = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=f64).reshape(1, 1, 2, 2)
SD = 0.4


def class_gaussian(x, sigma, class_labels=None):
    """E[x0 | x] for x0 ~ N(MU + 0.2 c, SD^2 I) given its class c (VE, a = 1)."""
    mu = MU + 0.2 * (0 if class_labels is None else class_labels.to(x.dtype).reshape(-1, 1, 1, 1))
    sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return mu + SD**2 / (SD**2 + sig**2) * (x - mu)


def gaussian_bpd(m, x, labels):
    """The probability-flow ODE of N(mu_c, SD^2 I) data is affine: x_T = mu_c + r (x - mu_c) with
    r^2 = (SD^2 + sigma_T^2) / (SD^2 + sigma_eps^2), so log p(x) = log N(x_T; 0, sigma_T^2 I) + d log r (the
    model's prior at T = 1, sigma_T = 100); in bits/dim with the [-1, 1] offset of 7 bits."""
    s_eps, s_T = (float(m.sde.sigma(torch.tensor(t, dtype=f64))) for t in (1e-5, 1.0))
    r = math.sqrt((SD**2 + s_T**2) / (SD**2 + s_eps**2))
    mu = MU + 0.2 * labels.to(f64).reshape(-1, 1, 1, 1)
    x_T = (mu + r * (x - mu)).flatten(1)
    logp = -0.5 * 4 * math.log(2 * math.pi * s_T**2) - 0.5 * (x_T**2).sum(1) / s_T**2 + 4 * math.log(r)
    return -logp / (4 * math.log(2)) + 7.0


def test_ode_bpd_equals_the_gaussian_closed_form():
    """VE process on [0.02, 100], class-conditional Gaussian data, the default tolerances: bits/dim of the
    dequantised images (u the first draw of each seed), of the undequantised ones, one image alone, and with
    the exact divergence; Rademacher probes are exact for this diagonal Jacobian, Gaussian ones are not.
    Rows finish at different times, and each keeps its own class label (a label batch that did not follow
    the unfinished rows broke this before)."""
    m = oracle_edm(variant="ve", label_dim=3)
    m.denoise = class_gaussian
    images = torch.tensor([[120, 140, 131, 127], [150, 110, 135, 128], [128, 128, 128, 128]], dtype=torch.uint8)
    images = images.reshape(3, 1, 2, 2)
    labels = torch.tensor([0, 2, 1])
    u = rng_of(3, 5).rand([3, 1, 2, 2], dtype=f64)
    x = -1 + 2 * (images.to(f64) + u) / 256
    info = {}
    bpd = m.ode_bpd(images, rng_of(3, 5), class_labels=labels, info=info)
    torch.testing.assert_close(bpd, gaussian_bpd(m, x, labels), rtol=0, atol=1e-4)
    assert info["nfe"] > 10
    plain = -1 + 2 * images.to(f64) / 255
    torch.testing.assert_close(m.ode_bpd(images, rng_of(3, 5), class_labels=labels, dequantize=False),
                               gaussian_bpd(m, plain, labels), rtol=0, atol=1e-4)
    one = m.ode_bpd(images[1:2], rng_of(1, 6), class_labels=labels[1:2], exact=True)
    x1 = -1 + 2 * (images[1:2].to(f64) + rng_of(1, 6).rand([1, 1, 2, 2], dtype=f64)) / 256
    torch.testing.assert_close(one, gaussian_bpd(m, x1, labels[1:2]), rtol=0, atol=1e-4)
    gauss = m.ode_bpd(images, rng_of(3, 5), class_labels=labels, probe="gaussian")
    exact = m.ode_bpd(images, rng_of(3, 5), class_labels=labels, probe="gaussian", exact=True)
    torch.testing.assert_close(exact, bpd, rtol=0, atol=1e-6)
    assert float((gauss - exact).abs().max()) > 1e-3
    seen = []

    def uncond(x, sigma, class_labels=None):
        seen.append(class_labels)
        return class_gaussian(x, sigma, None)

    m.denoise = uncond  # a conditional model scored without labels: the unconditional branch, no drawn labels
    torch.testing.assert_close(m.ode_bpd(images, rng_of(3, 5)), gaussian_bpd(m, x, torch.zeros(3)), rtol=0,
                               atol=1e-4)
    assert seen and all(lab is None for lab in seen)
    m0 = oracle_edm(variant="ve", label_dim=0)  # an unconditional model
    m0.denoise = class_gaussian
    torch.testing.assert_close(m0.ode_bpd(images, rng_of(3, 5), class_labels=labels),
                               gaussian_bpd(m, x, torch.zeros(3)), rtol=0, atol=1e-4)
