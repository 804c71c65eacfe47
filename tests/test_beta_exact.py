"""Beta / SDD building blocks pinned exactly (specs/beta_sdd.md §3, §4.1, §5.4, §6): the log-space Gamma
sampler replayed draw for draw in numpy, the sampler grid's edges, the smoothness factor and the penalty
integrals at two and one channels, the Monte-Carlo penalty's chunking and tilt by hand, and the method's data
mapping, mean-image fitting and label plumbing. The statistical tests elsewhere (moments, KS) cannot see a
wrong branch boundary or a changed random stream; these can."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from difflab.errors import UserError
from difflab.methods.beta import BetaMethod
from difflab.methods.beta import divergences as dv
from difflab.methods.beta.divergences import holder_pseudo_divergence, penalty_expected, penalty_mc
from difflab.methods.beta.process import log_gamma, sampler_logit_grid, smoothness_factor
from difflab.rng import StackedRandomGenerator

F64 = torch.float64
SHIFT, SCALE = 0.6, 0.39


# ---- log-space Gamma draws (§6 "Numerics") -------------------------------------------------------------

def _mt(d, n, u):
    """Marsaglia-Tsang on d = a - 1/3: v = (1 + n/sqrt(9d))^3, accept iff v > 0 and
    ln u < n^2/2 + d - d v + d ln v; ln G = ln d + ln v."""
    w = 1 + n / np.sqrt(9 * d)
    ok = w > 0
    log_v = 3 * np.log(np.where(ok, w, 1.0))
    return np.log(d) + log_v, ok & (np.log(u) < 0.5 * n * n + d - d * np.exp(log_v) + d * log_v)


def replay_log_gamma(seeds, a: np.ndarray) -> tuple[np.ndarray, int]:
    """The sampler's documented stream per row: 2 candidates (normals, then uniforms) per element, one boost
    uniform per element, then (normal, uniform) pairs for the still-rejected elements in row-major order,
    round after round; shapes a < 1 use ln G(a) = ln G(a + 1) + ln(1 - U)/a. Returns the draws and how many
    elements needed a retry."""
    out = np.empty_like(a)
    retried = 0
    for r, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        ar = a[r].ravel()
        boost = ar < 1
        d = np.where(boost, ar + 1, ar) - 1 / 3
        n = torch.randn((2, ar.size), generator=g, dtype=F64).numpy()
        u = torch.rand((2, ar.size), generator=g, dtype=F64).numpy()
        u_boost = torch.rand(ar.size, generator=g, dtype=F64).numpy()
        lg0, ok0 = _mt(d, n[0], u[0])
        lg1, ok1 = _mt(d, n[1], u[1])
        val, accept = np.where(ok0, lg0, lg1), ok0 | ok1
        retried += int((~accept).sum())
        while not accept.all():
            idx = np.flatnonzero(~accept)
            n_r = torch.randn(idx.size, generator=g, dtype=F64).numpy()
            u_r = torch.rand(idx.size, generator=g, dtype=F64).numpy()
            lg, ok = _mt(d[idx], n_r, u_r)
            val[idx] = np.where(ok, lg, val[idx])
            accept[idx] = ok
        out[r] = np.where(boost, val + np.log1p(-u_boost) / ar, val).reshape(a[r].shape)
    return out, retried


def test_log_gamma_equals_the_replayed_algorithm():
    """Shapes on both sides of the boost boundary (0.3, exactly 1, 1.5) and large ones, in rows of 3000:
    float64 draws equal the replay to 1e-12, including ~0.25% of elements that need the retry loop."""
    cols = 3000
    a = np.stack([np.full(cols, 0.3), np.full(cols, 1.0), np.tile([1.5, 2.0, 7.0, 1e4, 1e-3, 0.999], cols // 6)])
    seeds = [11, 12, 13]
    got = log_gamma(StackedRandomGenerator("cpu", seeds), torch.tensor(a).reshape(3, 3, 10, 100))
    assert got.dtype == F64
    want, retried = replay_log_gamma(seeds, a.reshape(3, 3, 10, 100))
    assert retried > 5  # the per-row retry path ran
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    # the default is the precise path: float32 candidates would differ from the float64 replay by ~1e-7
    assert np.abs(got.numpy() - want).max() < 1e-10


def test_log_gamma_refuses_a_batch_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"^first dimension 2 != number of seeds 3$"):
        log_gamma(StackedRandomGenerator("cpu", [0, 1, 2]), torch.ones(2, 5, dtype=F64))


# ---- the sampler grid (§6 "Time grid") ----------------------------------------------------------------

def test_grid_auto_switches_exactly_above_350_steps_and_keeps_the_dtype():
    alpha = sampler_logit_grid(350, 10.0, -13.0, 1.0)  # "auto" is the default
    assert torch.isinf(alpha[-1]) and torch.equal(alpha, sampler_logit_grid(350, 10.0, -13.0, 1.0, "alpha"))
    t = sampler_logit_grid(351, 10.0, -13.0, 1.0)
    assert float(t[-1]) == 10.0 and torch.equal(t, sampler_logit_grid(351, 10.0, -13.0, 1.0, "t"))
    for grid in ("alpha", "t"):
        g32 = sampler_logit_grid(4, 10.0, -13.0, 1.0, grid, dtype=torch.float32)
        assert g32.dtype == torch.float32


def test_t_grid_needs_two_steps_and_unknown_grids_are_named():
    two = sampler_logit_grid(2, 10.0, -13.0, 1.0, "t")
    np.testing.assert_allclose(two.numpy(), [-13.0, 10 - 23 * 1e-5, 10.0], rtol=1e-12)
    with pytest.raises(ValueError, match=r"^the t grid needs at least 2 steps$"):
        sampler_logit_grid(1, 10.0, -13.0, 1.0, "t")
    with pytest.raises(ValueError, match=r"^unknown grid 'linear'$"):
        sampler_logit_grid(4, 10.0, -13.0, 1.0, "linear")


# ---- the smoothness factor and the penalty integrals (§4.1, §5.4) ---------------------------------------

def test_smoothness_factor_with_two_channels_one_channel_and_the_cap():
    ell = torch.tensor([[[[0.0, 3.0]], [[2.0, -1.0]]], [[[1.0, 1.0]], [[1.0, 4.0]]]], dtype=F64)  # [2, 2, 1, 2]
    lam = 0.01
    want = [np.mean(np.exp(lam * np.array([4.0, 16.0]))), np.mean(np.exp(lam * np.array([0.0, 9.0])))]
    got = smoothness_factor(ell, lam)
    assert got.shape == (2, 1, 1, 1) and got.dtype == F64
    np.testing.assert_allclose(got.flatten().numpy(), want, rtol=1e-14)
    one = smoothness_factor(ell[:, :1], lam)
    assert one.shape == (2, 1, 1, 1) and one.dtype == F64 and bool((one == 1).all())
    assert bool((smoothness_factor(ell, 0.0) == 1).all())
    huge = smoothness_factor(torch.tensor([[[[0.0]], [[1e4]]]], dtype=F64), 1.0)
    assert float(huge) == math.exp(50)  # the exponent is capped at 50


def _dirichlet_expected_smoothness(a: np.ndarray) -> np.ndarray:
    """E sum_c (D_{c+1} - D_c)^2 for D ~ Dir(a) along axis 1, from the Dirichlet moments."""
    a0 = a.sum(1, keepdims=True)
    m = a / a0
    var, cov = m * (1 - m) / (a0 + 1), -m[:, 1:] * m[:, :-1] / (a0 + 1)
    return (var[:, 1:] + var[:, :-1] - 2 * cov + np.diff(m, axis=1) ** 2).sum(1)


def test_penalties_with_two_channels_and_one():
    a = torch.tensor([2.0, 5.0, 0.5, 3.0], dtype=F64).reshape(2, 2, 1, 1).expand(2, 2, 3, 2).contiguous()
    want = _dirichlet_expected_smoothness(a.numpy())
    np.testing.assert_allclose(penalty_expected(a).numpy(), want, rtol=1e-13)
    # two channels: D_2 - D_1 = 1 - 2 D_1 with D_1 ~ Beta(a_1, a_2), so E = 1 - 4 m + 4 (var + m^2)
    m1 = 2 / 7
    assert float(penalty_expected(a)[0, 0, 0]) == pytest.approx(1 - 4 * m1 + 4 * (m1 * (1 - m1) / 8 + m1**2))
    mc = penalty_mc(StackedRandomGenerator("cpu", [0, 1]), a, samples=3000)
    np.testing.assert_allclose(mc.numpy(), want, rtol=0.06)
    for pen in (penalty_expected(a[:, :1]), penalty_mc(StackedRandomGenerator("cpu", [0, 1]), a[:, :1])):
        assert pen.shape == (2, 3, 2) and pen.dtype == F64 and bool((pen == 0).all())


def test_penalty_mc_defaults_are_the_spec_constants():
    """S = 100 samples, delta_pen = 1e-6, T = 0.02 (§5.4 item 3)."""
    a = torch.tensor([2.0, 5.0, 0.5], dtype=F64).reshape(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous()
    rng = lambda: StackedRandomGenerator("cpu", [3, 4])
    torch.testing.assert_close(penalty_mc(rng(), a), penalty_mc(rng(), a, samples=100, delta=1e-6, temperature=0.02),
                               rtol=0, atol=0)


def test_penalty_mc_chunks_and_tilts_by_hand(monkeypatch):
    """Record the Dirichlet draws (softmax of log-Gammas over the channels): the estimate is
    sum_s w_s S(D_s) with w = softmax_s(-delta S / T), S the squared channel differences, over all samples,
    drawn in chunks of at most chunk_elements / (N C H W) samples."""
    drawn = []

    def spy(rng, shape, precise=True):
        lg = log_gamma(rng, shape, precise)
        drawn.append(lg.detach().numpy().copy())
        return lg

    monkeypatch.setattr(dv, "log_gamma", spy)
    a = torch.tensor([2.0, 5.0, 0.5], dtype=F64).reshape(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous()
    got = penalty_mc(StackedRandomGenerator("cpu", [0, 1]), a, samples=7, delta=3.0, temperature=0.5,
                     chunk_elements=2 * 12 * 3)  # N C H W = 24: chunks of 3, 3, 1 samples
    assert [d.shape[1] for d in drawn] == [3, 3, 1]
    lg = np.concatenate(drawn, axis=1)  # [N, S, C, H, W]
    D = np.exp(lg - lg.max(axis=2, keepdims=True))
    D /= D.sum(axis=2, keepdims=True)
    S = (np.diff(D, axis=2) ** 2).sum(2)  # [N, S, H, W]
    w = np.exp(-3.0 * S / 0.5)
    w /= w.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got.numpy(), (w * S).sum(1), rtol=1e-5)  # float32 draws (precise=False)


def test_hpd_needs_a_hoelder_exponent_above_one():
    p = torch.ones(1, 3, 1, 1, dtype=F64)
    with pytest.raises(ValueError, match=r"^the Hölder exponent must be > 1$"):
        holder_pseudo_divergence(p, p, gamma=1.0)
    assert float(holder_pseudo_divergence(p, p, gamma=1.0001)) >= 0


# ---- the method's data mapping, mean image and labels (§1, §6) -----------------------------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        self.seen.append((class_labels, augment_labels))
        return torch.zeros_like(x)


def test_decode_clips_out_of_range_values():
    m = BetaMethod(Net(), 1, 2, variant="betadiff")
    x = torch.tensor([SHIFT - 0.2, SHIFT, SHIFT + SCALE, SHIFT + 3 * SCALE], dtype=F64).reshape(1, 1, 2, 2)
    assert m.decode(x).flatten().tolist() == [0, 0, 255, 255]


class _Items:
    """A dataset of bare arrays (no label tuples), optionally with a fast mean and no item access."""

    def __init__(self, images, mean_only=False):
        self.images, self.mean_only = images, mean_only
        if mean_only:
            self.mean_image = lambda: images.mean(axis=0)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if self.mean_only:
            raise AssertionError("fit_data must use mean_image() when the dataset has one")
        return self.images[i]


def test_fit_data_uses_a_fast_mean_or_any_items_and_refuses_an_empty_set():
    rs = np.random.default_rng(1)
    images = rs.integers(0, 256, size=(5, 3, 2, 2)).astype(np.uint8)
    want = images.mean(axis=0) / 255 * SCALE + SHIFT
    for ds in (_Items(images, mean_only=True), _Items(images), _Items(images[:1])):
        m = BetaMethod(Net(), 3, 2, variant="betadiff")
        m.fit_data(ds)
        expect = want if len(ds) == 5 else images[0] / 255 * SCALE + SHIFT
        np.testing.assert_allclose(m.prior_mean.numpy(), expect, rtol=1e-6)
    with pytest.raises(UserError, match=r"^the training dataset is empty; cannot compute its mean image$"):
        BetaMethod(Net(), 3, 2, variant="betadiff").fit_data(_Items(images[:0]))


def test_loss_hands_the_labels_to_the_backbone():
    net = Net()
    m = BetaMethod(net, 1, 2, variant="betadiff", label_dim=3)
    labels, aug = torch.tensor([2, 0]), torch.zeros(2, 9)
    m.loss(torch.full((2, 1, 2, 2), 0.8, dtype=F64), labels, StackedRandomGenerator("cpu", [0, 1]), aug)
    assert net.seen[-1][0] is labels and net.seen[-1][1] is aug


@pytest.mark.parametrize("kwargs,message", [
    (dict(sampler="heun"), "sampler='heun' is unknown"), (dict(grid="linear"), "grid='linear' is unknown"),
    (dict(prior="zeros"), "prior='zeros' is unknown"), (dict(output="z1"), "output='z1' is unknown"),
    (dict(grid="t", steps=1), "steps must be >= 2 with the t grid")])
def test_sampler_options_are_named_in_the_error(kwargs, message):
    with pytest.raises(UserError, match="^" + message):
        BetaMethod(Net(), 1, 2, variant="sdd").sample(StackedRandomGenerator("cpu", [0]), **kwargs)


def test_t_grid_runs_with_two_steps():
    x = BetaMethod(Net(), 1, 2, variant="sdd").sample(StackedRandomGenerator("cpu", [0]), steps=2, grid="t")
    assert x.shape == (1, 1, 2, 2) and bool(torch.isfinite(x).all())


# ---- construction: defaults are the paper's, boundaries are where the spec puts them -------------------

def test_constructor_defaults_are_the_paper_settings():
    m = BetaMethod(Net(), 3, 4)
    assert (m.variant, m.label_dim, m.loss_type, m.eta, m.penalty, m.prior) == ("sdd", 0, "hkd", 1e4, "mc", "constant")
    assert (m.penalty_samples, m.penalty_delta, m.penalty_temperature) == (100, 1e-6, 0.02)  # §5.4 item 3
    assert (m.t_min, m.prev_ratio, m.sampler_grid) == (1e-5, 0.95, "auto")
    assert torch.equal(m.prior_mean, torch.full((3, 4, 4), SHIFT + SCALE / 2))  # before fit_data: the constant
    assert BetaMethod(Net(), 3, 4, label_dim=10).label_dim == 10
    assert BetaMethod(Net(), 3, 4, kl_weights=(0.5, 0.5)).kl_weights == (0.5, 0.5)


@pytest.mark.parametrize("kwargs", [dict(eta=0.5), dict(scale=0.01), dict(sigmoid_start=-12.9),
                                    dict(t_min=0.99), dict(prev_ratio=0.01), dict(prev_ratio=0.99),
                                    dict(penalty_samples=1), dict(penalty="expected", penalty_samples=0)])
def test_constructor_accepts_the_edges_of_the_valid_range(kwargs):
    BetaMethod(Net(), 3, 4, **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(variant="gauss"), "^variant='gauss' is unknown; choose one of: betadiff, sdd$"),
    (dict(scale=0.0), "^shift=0.6, scale=0.0: need"), (dict(sigmoid_start=-13.0), r"\(alpha must decrease with t\)$"),
    (dict(t_min=1.0), "^t_min=1.0 and prev_ratio"), (dict(t_min=1.5), "^t_min=1.5"),
    (dict(prev_ratio=0.0), "prev_ratio=0.0 must both"), (dict(prev_ratio=1.0), "prev_ratio=1.0 must both"),
    (dict(prev_ratio=1.5), "prev_ratio=1.5 must both"),
    (dict(kl_weights=(1.0,)), r"^kl_weights=\(1.0,\): give two numbers"),
    (dict(penalty="sometimes"), "^penalty='sometimes' is unknown"),
    (dict(penalty_samples=0), "^penalty_samples=0 must be >= 1"),
    (dict(prior="zeros"), "^prior='zeros' is unknown"), (dict(sampler_grid="x"), "^sampler_grid='x' is unknown"),
    (dict(sampler_steps="abc"), "^steps='abc' must be a positive integer$"),
    (dict(loss_type="klubb"), "^loss_type 'klubb' is unknown; choose one of: klub, elbo, hkd, snr_weighted_elbo,")])
def test_constructor_errors_name_the_option(kwargs, message):
    with pytest.raises(UserError, match=message):
        BetaMethod(Net(), 3, 4, **kwargs)


# ---- the loss's plumbing ---------------------------------------------------------------------------------

def test_loss_draws_t_in_float64_exactly(monkeypatch):
    seen = []
    monkeypatch.setattr(BetaMethod, "loss_at", lambda self, x0, t, rng, *a: seen.append(t) or torch.zeros(len(t)))
    m = BetaMethod(Net(), 1, 2, variant="betadiff", t_min=0.25)
    m.loss(torch.full((2, 1, 2, 2), 0.8), None, StackedRandomGenerator("cpu", [8, 9]))
    u = torch.stack([torch.rand((), generator=torch.Generator().manual_seed(s), dtype=F64) for s in (8, 9)])
    assert seen[0].dtype == F64 and torch.equal(seen[0], 1 + u * (0.25 - 1))


def test_penalty_integral_uses_the_methods_monte_carlo_settings(monkeypatch):
    from difflab.methods.beta import method as beta_method

    calls = []

    def spy(rng, a, **kw):
        calls.append(kw)
        return torch.zeros((a.shape[0],) + tuple(a.shape[2:]), dtype=a.dtype)

    monkeypatch.setattr(beta_method, "penalty_mc", spy)
    m = BetaMethod(Net(), 3, 2, variant="sdd", penalty_samples=3, penalty_delta=5.0, penalty_temperature=0.5)
    m.loss_at(torch.full((2, 3, 2, 2), 0.8, dtype=F64), torch.tensor([0.3, 0.6], dtype=F64),
              StackedRandomGenerator("cpu", [0, 1]))
    assert calls == [dict(samples=3, delta=5.0, temperature=0.5)] * 2  # data side and model side


def test_hkd_uses_the_given_hoelder_offset():
    from difflab.methods.beta.losses import elementwise_loss

    gen = torch.Generator().manual_seed(3)
    x0, xh = (SHIFT + SCALE * torch.rand(2, 3, 2, 2, generator=gen, dtype=F64) for _ in range(2))
    at, as_ = torch.tensor(0.2, dtype=F64), torch.tensor(0.3, dtype=F64)
    args = (x0, xh, at, as_, as_ - at, 50.0)
    hkd = elementwise_loss(*args, "hkd", (0.97, 0.03), hpd_weight=1.0, hpd_offset=0.2)
    klub = elementwise_loss(*args, "klub", (0.97, 0.03))
    hpd = holder_pseudo_divergence(50.0 * (as_ - at) * x0, 50.0 * (as_ - at) * xh, offset=0.2)
    torch.testing.assert_close(hkd, klub + hpd.expand_as(klub), rtol=1e-12, atol=1e-12)


def test_penalties_on_a_one_row_image_and_one_sample_chunks(monkeypatch):
    a = torch.tensor([2.0, 5.0, 0.5], dtype=F64).reshape(1, 3, 1, 1).expand(2, 3, 1, 2).contiguous()
    np.testing.assert_allclose(penalty_expected(a).numpy(), _dirichlet_expected_smoothness(a.numpy()), rtol=1e-13)
    shapes = []
    real = dv.log_gamma
    monkeypatch.setattr(dv, "log_gamma", lambda rng, shape, precise=True: shapes.append(shape.shape[1])
                        or real(rng, shape, precise))
    penalty_mc(StackedRandomGenerator("cpu", [0, 1]), a, samples=3, chunk_elements=12)  # N C H W = 12: 1 each
    assert shapes == [1, 1, 1]
