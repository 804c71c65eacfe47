"""BetaMethod: preconditioning, gradients, per-seed determinism, the perfect-denoiser sampler test
and the volume workflow (specs/beta_sdd.md §4, §6, §8 items 10-11)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from difflab.errors import UserError
from difflab.methods.beta import BetaMethod
from difflab.methods.beta.process import log_beta_logit, logit_moments
from difflab.methods.registry import build_method
from difflab.rng import StackedRandomGenerator

F64 = torch.float64
SHIFT, SCALE, ETA = 0.6, 0.39, 1e4


class TinyNet(nn.Module):
    """Stand-in backbone with the shared call signature; per-example (no batch coupling)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.noise = nn.Linear(1, channels)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        return self.conv(x) + self.noise(noise_labels.view(-1, 1)).view(x.shape[0], -1, 1, 1)


class SpyNet(nn.Module):
    """Returns a fixed residual and records what it was fed."""

    def __init__(self, value: float):
        super().__init__()
        self.value, self.calls = value, []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        self.calls.append((x.clone(), noise_labels.clone()))
        return torch.full_like(x, self.value)


def make(variant: str = "sdd", channels: int = 3, res: int = 4, net: nn.Module | None = None,
         **kw) -> BetaMethod:
    return BetaMethod(net or TinyNet(channels), channels, res, variant=variant, **kw)


# ---- data range and construction -------------------------------------------------------------------
def test_encode_decode_round_trip_and_range():
    m = make()
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    x = m.encode(u8)
    assert float(x.min()) == pytest.approx(SHIFT) and float(x.max()) == pytest.approx(SHIFT + SCALE)
    assert torch.equal(m.decode(x), u8)


def test_registry_builds_both_variants_with_paper_defaults():
    bd = build_method("betadiff", TinyNet(3), 3, 4)
    sdd = build_method("sdd", TinyNet(3), 3, 4)
    assert (bd.variant, bd.loss_type, bd.kl_weights, bd.prior, bd.smooth_lambda, bd.penalty) == (
        "betadiff", "klub", (0.99, 0.01), "mean", 0.0, "off")
    assert (sdd.variant, sdd.loss_type, sdd.kl_weights, sdd.prior, sdd.smooth_lambda, sdd.penalty) == (
        "sdd", "hkd", (0.97, 0.03), "constant", 2e-6, "mc")
    assert make("sdd", loss_type="klub").kl_weights == (0.96, 0.04)
    assert sdd.sampler_defaults() == {"sampler": "sdd", "steps": 200, "grid": "auto", "prior": "constant"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="gauss"), "variant"), (dict(eta=0), "eta"), (dict(shift=0.6, scale=0.4), "shift"),
    (dict(shift=0.0), "shift"), (dict(sigmoid_start=-13, sigmoid_end=10), "sigmoid_start"),
    (dict(sigmoid_power=0), "sigmoid_power"), (dict(loss_type="kl"), "loss_type"),
    (dict(penalty="sometimes"), "penalty"), (dict(prior="zeros"), "prior"), (dict(sampler_steps=0), "steps"),
    (dict(t_min=0), "t_min"), (dict(holder_gamma=1.0), "holder_gamma"),
])
def test_bad_options_raise_user_errors(kwargs, match):
    kw = dict(variant="sdd", **{k: v for k, v in kwargs.items() if k != "variant"})
    if "variant" in kwargs:
        kw["variant"] = kwargs["variant"]
    with pytest.raises(UserError, match=match):
        BetaMethod(TinyNet(3), 3, 4, **kw)


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(grid="linear"), "grid"),
    (dict(sampler="heun"), "sampler"), (dict(output="z1"), "output"), (dict(grid="t", steps=1), "steps"),
])
def test_bad_sampler_options_raise_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        make().sample(StackedRandomGenerator("cpu", [0]), **kwargs)


class _MeanDataset:
    def __init__(self, images: np.ndarray, with_mean: bool):
        self.images = images
        if with_mean:
            self.mean_image = lambda: images.mean(axis=0, dtype=np.float64)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], -1, i


@pytest.mark.parametrize("with_mean", [True, False])
def test_fit_data_stores_mapped_mean_image(with_mean):
    rs = np.random.default_rng(0)
    images = rs.integers(0, 256, size=(7, 3, 4, 4)).astype(np.uint8)
    m = make("betadiff")
    m.fit_data(_MeanDataset(images, with_mean))
    want = images.mean(axis=0) / 255 * SCALE + SHIFT
    np.testing.assert_allclose(m.prior_mean.numpy(), want, rtol=1e-6)
    assert "prior_mean" in m.state_dict()
    with pytest.raises(UserError, match="shape"):
        make("betadiff", res=8).fit_data(_MeanDataset(images, with_mean))


# ---- item 11: preconditioner ------------------------------------------------------------------------
def test_preconditioner_maps_inputs_and_output():
    spy = SpyNet(0.3)
    m = make("betadiff", net=spy)
    la = torch.tensor([2.7, -6.1], dtype=F64)
    ell = torch.randn(2, 3, 4, 4, dtype=F64)
    x0_hat = m.denoise(ell, la)
    mu, std = logit_moments(la, ETA, SHIFT, SCALE)
    x_in, c_noise = spy.calls[0]
    want_in = ((ell - mu.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)).float()
    torch.testing.assert_close(x_in, want_in)
    torch.testing.assert_close(c_noise, (-la / 8).float())
    torch.testing.assert_close(x0_hat, torch.sigmoid(want_in.double() + 0.3) * SCALE + SHIFT)
    assert x0_hat.dtype == F64


@pytest.mark.parametrize("value", [-1e4, -40.0, 40.0, 1e4])
def test_x0_hat_strictly_inside_the_data_interval(value):
    x0_hat = make(net=SpyNet(value)).denoise(torch.zeros(2, 3, 4, 4, dtype=F64), torch.tensor([0.0, 5.0]))
    assert bool((x0_hat > SHIFT).all()) and bool((x0_hat < SHIFT + SCALE).all())


def test_network_inputs_finite_where_float32_gamma_would_floor():
    # alpha = sigmoid(-13): eta alpha x0 ~ 0.02, so many float32 Gamma draws would floor at tiny.
    spy = SpyNet(0.0)
    m = make("betadiff", net=spy)
    x0 = torch.full((4, 3, 4, 4), 0.8, dtype=F64)
    m.loss_at(x0, torch.ones(4, dtype=F64), StackedRandomGenerator("cpu", range(4)))
    x_in, c_noise = spy.calls[0]
    assert torch.isfinite(x_in).all() and torch.allclose(c_noise, torch.full((4,), 13 / 8))


# ---- gradients and determinism ------------------------------------------------------------------------
@pytest.mark.parametrize("variant,loss_type,channels", [
    ("betadiff", "klub", 3), ("betadiff", "elbo", 1), ("sdd", "hkd", 3), ("sdd", "klub", 1),
    ("sdd", "l2", 3)])
def test_gradients_finite_at_both_schedule_ends(variant, loss_type, channels):
    torch.manual_seed(0)
    m = make(variant, channels=channels, loss_type=loss_type, penalty_samples=4)
    x0 = m.encode(torch.tensor([[0, 255], [128, 7]], dtype=torch.uint8).repeat(4, channels, 2, 2))
    t = torch.tensor([1e-5, 1e-5, 1.0, 1.0], dtype=F64)
    loss = m.loss_at(x0, t, StackedRandomGenerator("cpu", range(4)))
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.sum().backward()
    grads = [p.grad for p in m.net.parameters()]
    assert all(torch.isfinite(g).all() for g in grads) and any(bool((g != 0).any()) for g in grads)


@pytest.mark.parametrize("variant", ["betadiff", "sdd"])
def test_loss_of_an_example_depends_on_its_seed_only(variant):
    m = make(variant, penalty_samples=3)
    gen = torch.Generator().manual_seed(1)
    x0 = m.encode(torch.randint(0, 256, (3, 3, 4, 4), generator=gen).to(torch.uint8))
    state = torch.get_rng_state()
    full = m.loss(x0, None, StackedRandomGenerator("cpu", [10, 11, 12]))
    alone = m.loss(x0[1:2], None, StackedRandomGenerator("cpu", [11]))
    assert torch.equal(state, torch.get_rng_state())  # no global RNG use
    torch.testing.assert_close(full[1:2], alone)


def test_sample_depends_on_seed_only_and_returns_both_outputs():
    torch.manual_seed(0)
    m = make("sdd")
    x_all, z_all = m.sample(StackedRandomGenerator("cpu", [3, 4, 5]), steps=6, output="both")
    x_one = m.sample(StackedRandomGenerator("cpu", [4]), steps=6)
    torch.testing.assert_close(x_all[1:2], x_one)
    assert x_all.shape == z_all.shape == (3, 3, 4, 4) and x_all.dtype == torch.float32
    assert bool((x_all > SHIFT).all()) and bool((x_all < SHIFT + SCALE).all())
    assert bool((z_all >= 0).all()) and bool((z_all <= 1).all())
    assert m.sample(StackedRandomGenerator("cpu", [3]), steps=4, grid="t", output="z0").shape == (1, 3, 4, 4)


# ---- item 10: perfect-denoiser sampler test ---------------------------------------------------------------
def _posterior(points: torch.Tensor, ell: torch.Tensor, logit_alpha: torch.Tensor):
    """Exact posterior weights over a finite dataset given the noisy logit (§8 item 10)."""
    alpha = torch.sigmoid(logit_alpha.to(F64)).view(-1, 1, 1)
    pts = points.reshape(1, points.shape[0], -1)
    a, b = ETA * alpha * pts, ETA * (1 - alpha * pts)
    l = ell.to(F64).reshape(ell.shape[0], 1, -1)
    logw = (a * torch.nn.functional.logsigmoid(l) + b * torch.nn.functional.logsigmoid(-l)
            - (torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b))).sum(-1)
    return torch.softmax(logw, dim=1)


class OracleMethod(BetaMethod):
    """The exact posterior-mean denoiser in place of the network (float64 end to end)."""

    def __init__(self, points: torch.Tensor, **kw):
        super().__init__(nn.Identity(), points.shape[1], points.shape[2], **kw)
        self.points, self.max_weights = points, []

    def denoise(self, ell, logit_alpha_t, class_labels=None, augment_labels=None):
        w = _posterior(self.points, ell, logit_alpha_t)
        self.max_weights.append(w.max(dim=1).values)
        return (w @ self.points.reshape(self.points.shape[0], -1)).reshape(ell.shape)


def _dataset(k: int, seed: int, side: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return SHIFT + SCALE * torch.rand(k, 3, side, side, generator=gen, dtype=F64)


@pytest.mark.parametrize("variant,steps,n,k,side", [
    ("betadiff", 10, 300, 4, 2), ("sdd", 50, 160, 4, 2),
    pytest.param("betadiff", 200, 800, 4, 2, marks=pytest.mark.slow),
    pytest.param("sdd", 200, 800, 8, 4, marks=pytest.mark.slow)])
def test_perfect_denoiser_sampler_returns_data_points(variant, steps, n, k, side):
    points = _dataset(k, 0, side)
    m = OracleMethod(points, variant=variant)
    x0_hat, z0 = m.sample(StackedRandomGenerator("cpu", range(n)), steps=steps, output="both")
    # The final posterior has collapsed onto one point (exactly in float64 from ~50 steps on).
    assert bool((m.max_weights[-1] > 1 - 1e-9).all())
    if steps >= 50:
        assert bool((m.max_weights[-1] == 1).all())
    dist = (x0_hat.double().reshape(n, 1, -1) - points.reshape(1, k, -1).float().double()).abs().amax(-1)
    nearest = dist.argmin(dim=1)
    assert float(dist.min(dim=1).values.max()) == 0.0  # every float32 output is exactly a data point
    z_err = ((z0.double() - points[nearest].reshape(z0.shape)) / SCALE).abs().max()
    assert float(z_err) < 0.05
    counts = torch.bincount(nearest, minlength=k).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3, counts


class OracleNet(nn.Module):
    """The posterior mean behind the real preconditioner: inverts x_in and c_noise, returns F."""

    def __init__(self, points: torch.Tensor):
        super().__init__()
        self.points = points

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        la = -8 * noise_labels.to(F64)
        mu, std = logit_moments(la, ETA, SHIFT, SCALE)
        ell = x.to(F64) * std.view(-1, 1, 1, 1) + mu.view(-1, 1, 1, 1)
        w = _posterior(self.points, ell, la)
        y = ((w @ self.points.reshape(self.points.shape[0], -1)).reshape(x.shape) - SHIFT) / SCALE
        y = y.clamp(1e-9, 1 - 1e-9)
        return (torch.log(y) - torch.log1p(-y) - x.to(F64)).to(x.dtype)


def test_oracle_network_through_preconditioner_reproduces_data():
    u8 = torch.tensor([0, 40, 128, 200, 255, 90, 17, 230, 66, 3, 180, 250], dtype=torch.uint8)
    images = torch.stack([u8.roll(3 * k).view(3, 2, 2) for k in range(4)])
    m0 = make("sdd", res=2)
    points = m0.encode(images).double()
    m = BetaMethod(OracleNet(points), 3, 2, variant="sdd")
    out = m.decode(m.sample(StackedRandomGenerator("cpu", range(120)), steps=12))
    match = (out.view(120, 1, -1) == images.view(1, 4, -1)).all(-1)
    assert bool((match.sum(1) == 1).all())  # every decoded sample is exactly one training image
    assert stats.chisquare(match.sum(0).numpy()).pvalue > 1e-3


# ---- volumes: 3-D NPY set sliced to 2-D, trained and sampled with SDD --------------------------------------
def test_volume_workflow(tmp_path):
    from difflab.data import open_dataset

    rs = np.random.default_rng(0)
    side = np.linspace(-1, 1, 8)
    zz, yy, xx = np.meshgrid(side, side, np.linspace(-1, 1, 6), indexing="ij")
    for v in range(3):
        r = 0.4 + 0.1 * v
        vol = (zz**2 + yy**2 < r**2).astype(np.float32) * (100 + 50 * xx) + rs.normal(0, 5, zz.shape)
        np.save(tmp_path / f"volume{v}.npy", vol.astype(np.float32))
    ds = open_dataset(str(tmp_path), resolution=8, npy_axis=2, use_labels=False)
    assert len(ds) == 3 * 6 and ds[0][0].shape == (1, 8, 8)
    torch.manual_seed(0)
    m = BetaMethod(TinyNet(1), 1, 8, variant="sdd", loss_type="hkd", prior="mean")
    m.fit_data(ds)
    assert not torch.allclose(m.prior_mean, torch.full_like(m.prior_mean, SHIFT + SCALE / 2))
    opt = torch.optim.Adam(m.net.parameters(), lr=1e-2)
    images = torch.as_tensor(np.stack([ds[i][0] for i in range(len(ds))]))
    losses = []
    for step in range(30):
        rng = StackedRandomGenerator("cpu", [step * 100 + i for i in range(len(ds))])
        loss = m.loss(m.encode(images), None, rng)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        losses.append(float(loss.detach().mean()))
    assert all(math.isfinite(v) for v in losses) and np.mean(losses[-10:]) < np.mean(losses[:10])
    out = m.decode(m.sample(StackedRandomGenerator("cpu", range(4)), steps=10))
    assert out.shape == (4, 1, 8, 8) and out.dtype == torch.uint8


def test_log_beta_logit_dtype_and_device_preserved():
    rng = StackedRandomGenerator("cpu", [0, 1])
    a = torch.full((2, 3), 0.5, dtype=torch.float32)
    assert log_beta_logit(rng, a, a).dtype == torch.float32


@pytest.mark.slow
def test_volume_workflow_through_train_and_generate(tmp_path):
    """The how-to of docs/methods/sdd.md on a tiny budget: NPY volumes -> SDD run -> generate."""
    import json

    from PIL import Image

    from difflab.config import RunConfig
    from difflab.generate import generate
    from difflab.train.loop import train

    vol_dir = tmp_path / "vols"
    vol_dir.mkdir()
    rs = np.random.default_rng(1)
    for v in range(2):
        np.save(vol_dir / f"case{v}.npy", rs.normal(100.0, 30.0, size=(8, 8, 5)).astype(np.float32))
    cfg = RunConfig.from_dict({
        "data": {"source": str(vol_dir), "resolution": 8, "npy_axis": 2, "use_labels": False},
        "method": {"name": "sdd", "eta": 5000.0, "shift": 0.55, "scale": 0.4, "loss_type": "hkd",
                   "prior": "mean", "sampler_steps": 4},
        "network": {"name": "ddpmpp", "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                    "attn_resolutions": [], "dropout": 0.0, "channel_mult_emb": 2},
        "train": {"batch": 5, "duration_kimg": 0.01, "lr": 1e-3, "tick_kimg": 0.005, "snapshot_ticks": 1,
                  "workers": 0, "grid_seeds": "0-1", "ema_halflife_kimg": 0.01},
        "sampler": {"sampler": "sdd", "steps": 3},
    })
    run = train(cfg, run_dir=tmp_path / "run", progress=False)
    opts = json.loads((run / "training_options.json").read_text())
    assert opts["method"]["eta"] == 5000.0 and opts["method"]["shift"] == 0.55
    out = generate(run, [0, 1, 2], tmp_path / "out", progress=False)
    img = np.asarray(Image.open(out / "000002.png"))
    assert img.shape == (8, 8) and img.dtype == np.uint8
