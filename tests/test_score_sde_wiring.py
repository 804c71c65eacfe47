"""ScoreSDEMethod's wiring that the closed-form tests of test_score_sde.py do not reach (found by mutation
testing, docs/testing.md): the data-mean prior (§4.8), the data range of the VE configs (§4.4), the training
times and the per-example loss (§4.3) by hand, the constructor's defaults and its one-line refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from difflab.errors import UserError
from difflab.methods.gaussian.score_sde import ScoreSDEMethod
from difflab.methods.gaussian.sde import VESDE, VPSDE, SubVPSDE
from difflab.rng import StackedRandomGenerator

f64 = torch.float64


class _Items:
    """A dataset of (uint8 image, label) items, optionally with a fast ``mean_image``."""

    def __init__(self, images: np.ndarray, fast_mean: np.ndarray | None = None):
        self.images, self.fast_mean = images, fast_mean
        if fast_mean is not None:
            self.mean_image = lambda: self.fast_mean

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], 0


IMAGES = np.array([[[[0, 255], [51, 102]], [[255, 255], [0, 0]], [[10, 20], [30, 40]]],
                   [[[255, 255], [153, 204]], [[0, 0], [0, 0]], [[50, 60], [70, 80]]]],
                  dtype=np.uint8)  # [N=2, C=3, 2, 2]: the channel count differs from the sizes


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("fast", [False, True])
def test_the_data_prior_mean_is_the_per_channel_mean_in_model_units(centered, fast):
    """prior_mean="data": the per-channel mean of the training images mapped to the model's range ([0, 1] or
    [-1, 1]); a dataset's mean_image() is used when it has one (here deliberately different from its items)."""
    m = ScoreSDEMethod(nn.Identity(), 3, 2, variant="sde-ve", prior_mean="data", centered=centered)
    fast_mean = np.full((3, 2, 2), 51.0) if fast else None
    m.fit_data(_Items(IMAGES, fast_mean))
    per_channel_u8 = np.array([51.0, 51.0, 51.0]) if fast else IMAGES.astype(np.float64).mean(axis=(0, 2, 3))
    unit = per_channel_u8 / 255
    expected = 2 * unit - 1 if centered else unit
    assert m.prior_mean.shape == (3, 1, 1)
    np.testing.assert_allclose(m.prior_mean.flatten().numpy(), expected, rtol=1e-6)
    sde = m.process_sde()
    assert sde is not m.sde and sde.N == m.sde.N and sde.prior_mean.dtype == f64
    np.testing.assert_allclose(sde.prior_mean.flatten().numpy(), expected, rtol=1e-6)
    assert isinstance(m.sde.prior_mean, float) and m.sde.prior_mean == 0.0  # the method's own process is untouched


def test_the_zero_prior_ignores_the_data():
    m = ScoreSDEMethod(nn.Identity(), 3, 2, variant="sde-ve")
    m.fit_data(_Items(IMAGES))
    assert torch.equal(m.prior_mean, torch.zeros(3, 1, 1)) and m.process_sde() is m.sde


def test_default_steps_are_the_processes_levels_for_pc_and_ode():
    m = ScoreSDEMethod(nn.Identity(), 1, 2, variant="sde-vp", num_scales=37)
    assert (m.default_steps("pc"), m.default_steps("ode"), m.default_steps("heun"), m.default_steps("ddim")) \
        == (37, 37, 18, 50)


def test_the_ve_configs_keep_data_in_0_1():
    """encode: u8 / 255 in float32; decode: round(255 x), clipped to [0, 255]."""
    m = ScoreSDEMethod(nn.Identity(), 1, 2, variant="sde-ve")
    u = torch.tensor([0, 1, 127, 255], dtype=torch.uint8).reshape(1, 1, 2, 2)
    x = m.encode(u)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, u.to(torch.float32) / 255, rtol=0, atol=0)
    y = torch.tensor([-0.3, 0.5, 0.5 / 255 - 1e-4, 1.7], dtype=f64).reshape(1, 1, 2, 2)
    assert m.decode(y).flatten().tolist() == [0, 128, 0, 255]
    c = ScoreSDEMethod(nn.Identity(), 1, 2, variant="sde-ve", centered=True)  # the [-1, 1] range of the base
    assert c.decode(torch.tensor([-1.0, 1.0]).reshape(1, 1, 1, 2)).flatten().tolist() == [0, 255]
    torch.testing.assert_close(c.encode(u), u.to(torch.float32) / 127.5 - 1)


def test_training_times_continuous_and_discrete():
    """continuous: t = eps + u (T - eps); discrete: a level k of N drawn uniformly, t = k/(N - 1) T, at least
    eps (k = 0 would put sigma_min's level at t = 0)."""
    seeds = list(range(40))
    m = ScoreSDEMethod(nn.Identity(), 1, 2, variant="sde-vp", train_eps=0.01)
    u = StackedRandomGenerator("cpu", seeds).rand([40], dtype=f64)
    torch.testing.assert_close(m.train_times(StackedRandomGenerator("cpu", seeds), 40), 0.01 + u * 0.99,
                               rtol=1e-15, atol=0)
    d = ScoreSDEMethod(nn.Identity(), 1, 2, variant="sde-ve", continuous=False, num_scales=5, train_eps=0.01)
    k = StackedRandomGenerator("cpu", seeds).randint(5, [40]).to(f64)
    assert set(k.tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0}
    torch.testing.assert_close(d.train_times(StackedRandomGenerator("cpu", seeds), 40), (k / 4).clamp(min=0.01))


class ConstF(nn.Module):
    """F = c everywhere; records the noise labels."""

    def __init__(self, c: float):
        super().__init__()
        self.c, self.seen = c, []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        self.seen.append((x.detach().clone(), noise_labels.detach().clone()))
        return torch.full_like(x, self.c)


@pytest.mark.parametrize("variant", ["sde-ve", "sde-vp", "sde-subvp"])
@pytest.mark.parametrize("reduce_mean", [None, True, False])
def test_the_loss_of_a_constant_net_by_hand(variant, reduce_mean):
    """x = x0 + sigma z; D = x + sigma F (VE) or x - sigma F (VP, sub-VP) with F = c; the per-example loss is
    the mean (reduce_mean, the VP default) or half the sum (the VE default) of |D - x0|^2 / sigma^2 =
    (z +- c)^2; the net sees ln sigma (VE) or 999 t (VP)."""
    seeds = [3, 7, 11]
    c = 0.4
    m = ScoreSDEMethod(nn.Identity(), 1, 2, variant=variant, reduce_mean=reduce_mean, centered=True)
    m.net = ConstF(c)
    x0 = torch.tensor([0.5, -0.25, 1.0, 0.0], dtype=f64).reshape(1, 1, 2, 2).repeat(3, 1, 1, 1)
    got = m.loss(x0, None, StackedRandomGenerator("cpu", seeds))
    ref = StackedRandomGenerator("cpu", seeds)
    t = m.train_times(ref, 3)
    z = ref.randn_like(x0)
    sign = 1 if variant == "sde-ve" else -1
    sq = ((z + sign * c) ** 2).flatten(1)
    mean = reduce_mean if reduce_mean is not None else variant != "sde-ve"
    torch.testing.assert_close(got, sq.mean(1) if mean else 0.5 * sq.sum(1), rtol=1e-6, atol=1e-7)
    labels = m.net.seen[-1][1].to(f64)
    expected = m.sde.sigma(t).log() if variant == "sde-ve" else 999 * t
    torch.testing.assert_close(labels, expected.to(torch.float32).to(f64))


def test_the_vp_denoiser_feeds_s_times_x_and_subtracts_sigma_f():
    """VP: the net sees x_t = s(t) x with t = sigma_inv(sigma), and D = x - sigma F (per row)."""
    m = ScoreSDEMethod(nn.Identity(), 1, 2, variant="sde-vp", centered=True)
    m.net = ConstF(0.5)
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.25, 1.0, -1.0, 2.0]], dtype=f64).reshape(2, 1, 2, 2)
    sig = torch.tensor([0.3, 4.0], dtype=f64)
    D = m.denoise(x, sig)
    s = VPSDE().s(VPSDE().sigma_inv(sig)).reshape(2, 1, 1, 1)
    torch.testing.assert_close(m.net.seen[-1][0].to(f64), (s * x).to(torch.float32).to(f64))
    torch.testing.assert_close(D, x - sig.reshape(2, 1, 1, 1) * 0.5)


@pytest.mark.parametrize("variant", ["sde-ve", "sde-vp"])
def test_a_scalar_sigma_is_float64_and_serves_every_row(variant):
    """denoise(x, 0.3) equals denoise(x, [0.3, 0.3]) in float64 exactly (a float32 0.3 would not), and the net gets
    one noise label per row."""
    m = ScoreSDEMethod(nn.Identity(), 1, 2, variant=variant, centered=True)
    m.net = ConstF(0.5)
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.25, 1.0, -1.0, 2.0]], dtype=f64).reshape(2, 1, 2, 2)
    a = m.denoise(x, 0.3)
    assert m.net.seen[-1][1].shape == (2,)
    assert torch.equal(a, m.denoise(x, torch.tensor([0.3, 0.3], dtype=f64)))


def test_constructor_defaults_by_variant():
    """VE: [0, 1] data, half-sum loss, reverse diffusion + Langevin; VP / sub-VP: [-1, 1] data, mean loss,
    Euler-Maruyama without corrector; the processes carry num_scales, the epsilons and the betas / sigmas."""
    ve = ScoreSDEMethod(nn.Identity(), 1, 2, variant="sde-ve", sigma_min=0.02, sigma_max=30.0, num_scales=50,
                        train_eps=1e-4, sampling_eps=1e-3)
    assert type(ve.sde) is VESDE and ve.sde.N == 50 and ve.sde.t_train_eps == 1e-4 and ve.sde.t_eps == 1e-3
    assert float(ve.sde.sigma(torch.tensor(0.0, dtype=f64))) == pytest.approx(0.02)
    assert float(ve.sde.sigma(torch.tensor(1.0, dtype=f64))) == pytest.approx(30.0)
    assert (ve.centered, ve.reduce_mean, ve.data_range) == (False, False, (0.0, 1.0))
    assert ve.sampler_defaults() == {"sampler": "pc", "steps": None, "predictor": "reverse_diffusion",
                                     "corrector": "langevin", "snr": 0.16, "corrector_steps": 1,
                                     "order": "corrector-first", "norm": "sample", "noise_removal": True}
    vp = ScoreSDEMethod(nn.Identity(), 1, 2, variant="sde-vp", beta_min=0.2, beta_max=10.0)
    assert type(vp.sde) is VPSDE and (vp.sde.beta_min, vp.sde.beta_max, vp.sde.N) == (0.2, 10.0, 1000)
    assert vp.sde.t_eps == VPSDE.t_eps and vp.sde.t_train_eps == 1e-5
    assert (vp.centered, vp.reduce_mean, vp.data_range) == (True, True, (-1.0, 1.0))
    assert (vp.sampler_defaults()["predictor"], vp.sampler_defaults()["corrector"]) == ("euler_maruyama", "none")
    sub = ScoreSDEMethod(nn.Identity(), 1, 2, variant="sde-subvp", predictor="ancestral", corrector="ald", snr=0.2,
                         corrector_steps=2, noise_removal=False)
    assert type(sub.sde) is SubVPSDE
    cfg = sub.sampler_defaults()
    assert (cfg["predictor"], cfg["corrector"], cfg["snr"], cfg["corrector_steps"], cfg["noise_removal"]) \
        == ("ancestral", "ald", 0.2, 2, False)
    assert cfg is not sub.sampler_cfg  # a copy: callers may edit it


@pytest.mark.parametrize("kw,message", [
    (dict(variant="sde-ddpm"), r"^method='sde-ddpm' is not supported; choose one of: sde-ve, sde-vp, sde-subvp$"),
    (dict(num_scales=1), r"^num_scales=1: need at least 2 discretisation levels$"),
    (dict(sigma_min=0.0), r"^sigma_min=0.0, sigma_max=50.0: need 0 < sigma_min < sigma_max$"),
    (dict(sigma_min=50.0), r"^sigma_min=50.0, sigma_max=50.0: need 0 < sigma_min < sigma_max$"),
    (dict(variant="sde-vp", beta_min=-0.1), r"^beta_min=-0.1, beta_max=20.0: need 0 <= beta_min < beta_max$"),
    (dict(variant="sde-vp", beta_min=20.0), r"^beta_min=20.0, beta_max=20.0: need 0 <= beta_min < beta_max$"),
    (dict(train_eps=0.0), r"^train_eps=0.0 must lie in \(0, 1\)$"),
    (dict(train_eps=1.0), r"^train_eps=1.0 must lie in \(0, 1\)$"),
    (dict(prior_mean="image"), r"^prior_mean='image' is not supported; choose one of: zero, data$"),
    (dict(sampler="dpm"), r"^sampler='dpm' is not supported; choose one of: heun, "),
    (dict(norm="l2"), r"^--norm 'l2' is not supported; choose one of: sample, batch$"),
    (dict(order="both"), r"^--order 'both' is not supported; choose one of: corrector-first, predictor-first$"),
    (dict(predictor="heun"), r"^--predictor 'heun' is not supported; choose one of: reverse_diffusion, "),
    (dict(corrector="ula"), r"^--corrector 'ula' is not supported; choose one of: langevin, ald, none$"),
])
def test_constructor_refusals_name_the_option(kw, message):
    """Refused when the run is configured, not hours later when it first samples."""
    with pytest.raises(UserError, match=message):
        ScoreSDEMethod(nn.Identity(), 1, 2, **kw)


def test_boundary_values_are_accepted():
    """beta_min = 0 is a valid VP process; train_eps just inside (0, 1) too."""
    m = ScoreSDEMethod(nn.Identity(), 1, 2, variant="sde-vp", beta_min=0.0, train_eps=0.999, num_scales=2)
    assert m.sde.beta_min == 0.0 and m.sde.N == 2 and math.isclose(m.sde.t_train_eps, 0.999)


class RecordLabels(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        self.seen.append((x.dtype, class_labels, augment_labels))
        return torch.zeros_like(x)


def test_the_loss_hands_labels_on_and_keeps_float32():
    """Class and augmentation labels reach the backbone; a float32 batch gives a float32 loss (sigma and the
    weights are cast to the batch's dtype, not promoted to float64)."""
    m = ScoreSDEMethod(nn.Identity(), 1, 2, label_dim=3, variant="sde-vp")
    m.net = RecordLabels()
    x0 = torch.zeros(2, 1, 2, 2)
    labels, aug = torch.tensor([2, 0]), torch.ones(2, 4)
    loss = m.loss(x0, labels, StackedRandomGenerator("cpu", [0, 1]), aug)
    dtype, got_labels, got_aug = m.net.seen[-1]
    assert loss.dtype == torch.float32 and dtype == torch.float32
    assert torch.equal(got_labels, labels) and torch.equal(got_aug, aug)


def test_labels_steps_and_noise_label_dtype():
    """A conditional score model keeps its label_dim; a stored step count is a sampler default, not a pc option;
    the net's noise labels are float32."""
    m = ScoreSDEMethod(nn.Identity(), 1, 2, label_dim=4, variant="sde-vp", steps=12)
    assert m.label_dim == 4 and m.sampler_defaults()["steps"] == 12
    m.net = ConstF(0.0)
    m.denoise(torch.zeros(2, 1, 2, 2, dtype=f64), torch.tensor([0.5, 1.0], dtype=f64))
    assert m.net.seen[-1][1].dtype == torch.float32
