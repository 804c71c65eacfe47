"""Beta diffusion / SDD losses end to end through ``BetaMethod.loss_at`` and ``loss`` against a value computed by
hand in numpy/scipy from specs/beta_sdd.md §3-§5 (the §5.3 test vector feeds alpha_s directly, so it cannot see
the previous-step ratio, the smoothness rescaling, the standardisation wiring or the penalty's sign).

The Gamma draws are made deterministic by monkeypatching ``log_gamma`` to ``ln a`` (the log of the shape = the
Gamma's mean): then the noisy logit is ``logit(alpha_t x0)`` exactly and a Monte-Carlo Dirichlet sample is its
mean ``a / sum a``, so every number below follows by hand. The stub backbone F(x_in, c_noise) =
-0.9 x_in + 0.2 c_noise + (1, -1, 1)_channel keeps x0_hat dependent on the standardised input but gives it
colours of its own, so the SDD penalty P = mean(pen(data) - pen(model)) is positive for colourful images and
negative for grey ones.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import betaln, digamma, expit, gammaln
from torch import nn

from difflab.methods.beta import BetaMethod
from difflab.rng import StackedRandomGenerator

F64 = torch.float64
SHIFT, SCALE = 0.6, 0.39


COLOUR = (1.0, -1.0, 1.0)  # the stub's fixed per-channel logit offsets


class StubNet(nn.Module):
    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        colour = torch.tensor(COLOUR[: x.shape[1]], dtype=x.dtype).reshape(1, -1, 1, 1)
        return -0.9 * x + 0.2 * noise_labels.reshape(-1, 1, 1, 1) + colour


@pytest.fixture
def mean_gammas(monkeypatch):
    """ln G(a) := ln a for the noisy logit and for the penalty's Dirichlet draws."""
    fake = lambda rng, a, precise=True: torch.log(a)
    monkeypatch.setattr("difflab.methods.beta.method.log_gamma", fake)
    monkeypatch.setattr("difflab.methods.beta.divergences.log_gamma", fake)


# ---- the spec by hand ------------------------------------------------------------------------------------

def logit_alpha(t, c0=10.0, c1=-13.0, p=1.0):
    """§3: logit alpha(t) = c0 + (c1 - c0) t^p."""
    return c0 + (c1 - c0) * t**p


def standardise(la: np.ndarray, eta: float) -> tuple[np.ndarray, np.ndarray]:
    """§4.1: mean and std of l_t for x0 ~ U[Shift, Shift + Scale] (101-point trapezoid for V3, V4)."""
    k = (eta * expit(la))[:, None]
    lo, hi, ks = SHIFT, SHIFT + SCALE, k[:, 0] * SCALE
    e1 = (gammaln(k[:, 0] * hi) - gammaln(k[:, 0] * lo)) / ks
    e2 = (gammaln(eta - k[:, 0] * lo) - gammaln(eta - k[:, 0] * hi)) / ks
    v1 = (digamma(k[:, 0] * hi) - digamma(k[:, 0] * lo)) / ks
    v2 = (digamma(eta - k[:, 0] * lo) - digamma(eta - k[:, 0] * hi)) / ks
    g = lo + SCALE * np.arange(101) / 100
    w = np.ones(101)
    w[[0, -1]] = 0.5
    v3 = np.maximum(0, (digamma(k * g) ** 2 * w).sum(1) / 100 - e1**2)
    v4 = np.maximum(0, (digamma(eta - k * g) ** 2 * w).sum(1) / 100 - e2**2)
    return e1 - e2, np.sqrt(v1 + v2 + v3 + v4)


def kl_beta(a1, b1, a2, b2):
    """§5.1: KL(Beta(a1, b1) || Beta(a2, b2))."""
    return (betaln(a2, b2) - betaln(a1, b1) + (a1 - a2) * digamma(a1) + (b1 - b2) * digamma(b1)
            + (a2 - a1 + b2 - b1) * digamma(a1 + b1))


def hpd(a_p, a_q, gamma=1.8, kappa=0.5):
    """§5.4 item 4: symmetrised Hölder pseudo-divergence of Dirichlets over the channel axis (axis 1)."""
    F = lambda th: gammaln(th).sum(1) - gammaln(th.sum(1))
    gc = gamma / (gamma - 1)
    h = lambda g1, g2: F(g1 * a_p + kappa) / g1 + F(g2 * a_q + kappa) / g2 - F(a_p + a_q + kappa)
    return 0.5 * (h(gamma, gc) + h(gc, gamma))


def smoothness_of_mean(a):
    """S(E D) for D ~ Dir(a) over axis 1: what a Monte-Carlo penalty sees when every draw is the mean."""
    d = a / a.sum(1, keepdims=True)
    return (np.diff(d, axis=1) ** 2).sum(1)


def expected_smoothness(a):
    """E[S(D)], D ~ Dir(a) over axis 1, from the Dirichlet moments: Var D_c = m_c (1 - m_c)/(a0 + 1),
    Cov(D_c, D_c') = -m_c m_c'/(a0 + 1)."""
    a0 = a.sum(1, keepdims=True)
    m = a / a0
    var = m * (1 - m) / (a0 + 1)
    cov = -m[:, 1:] * m[:, :-1] / (a0 + 1)
    return (var[:, 1:] + var[:, :-1] - 2 * cov + np.diff(m, axis=1) ** 2).sum(1)


def hand_loss(x0: np.ndarray, t: np.ndarray, *, variant="sdd", loss_type="hkd", eta=1e4, prev_ratio=0.95,
              smooth_lambda=2e-6, penalty="mc", weights=None, sigmoid_power=1.0):
    """The whole per-example loss of §3-§5 with the stub backbone and mean Gamma draws."""
    n = x0.shape[0]
    col = lambda v: v.reshape(n, 1, 1, 1)
    lt, ls = logit_alpha(t, p=sigmoid_power), logit_alpha(prev_ratio * t, p=sigmoid_power)
    alpha_t, alpha_s = col(expit(lt)), col(expit(ls))
    delta = alpha_s - alpha_t
    ell = np.log(eta * alpha_t * x0) - np.log(eta * (1 - alpha_t * x0))  # logit(alpha_t x0)
    if smooth_lambda:  # §4.1 SDD: divide by m = mean_pixels exp(lambda sum_c (l_{c+1} - l_c)^2)
        m = np.exp(smooth_lambda * (np.diff(ell, axis=1) ** 2).sum(1)).mean(axis=(1, 2))
        ell = ell / col(m)
    mu, std = standardise(lt, eta)
    x_in = ((ell - col(mu)) / col(std)).astype(np.float32)  # the backbone runs in float32
    c_noise = (-lt / 8).astype(np.float32)
    colour = np.float32(COLOUR[: x0.shape[1]]).reshape(1, -1, 1, 1)
    out = -np.float32(0.9) * x_in + np.float32(0.2) * col(c_noise) + colour
    logit_x = np.clip((x_in + out).astype(np.float64), -30, 30)
    x_hat = expit(logit_x) * SCALE + SHIFT
    x = x0
    if variant == "sdd":
        x, x_hat = np.clip(x, SHIFT, SHIFT + SCALE), np.clip(x_hat, SHIFT, SHIFT + SCALE)
    P = None
    if penalty != "off":
        pen = smoothness_of_mean if penalty == "mc" else expected_smoothness
        P = col((pen(eta * delta * x) - pen(eta * delta * x_hat)).mean(axis=(1, 2)))
    offset = (lambda term: term) if P is None else (lambda term: np.maximum(0, term - np.maximum(0, P)))
    cond_h, cond_d = (eta * delta * x_hat, eta * (1 - alpha_s * x_hat)), (eta * delta * x, eta * (1 - alpha_s * x))
    marg_h, marg_d = (eta * alpha_t * x_hat, eta * (1 - alpha_t * x_hat)), (eta * alpha_t * x, eta * (1 - alpha_t * x))
    if loss_type == "elbo":
        cond, marg = kl_beta(*cond_d, *cond_h), kl_beta(*marg_d, *marg_h)  # data first
    else:
        cond, marg = kl_beta(*cond_h, *cond_d), kl_beta(*marg_h, *marg_d)  # model first (KLUB)
    w_cond, w_marg = weights
    total = w_cond * offset(cond) + w_marg * offset(marg)
    if loss_type == "hkd":
        h = np.maximum(0, hpd(eta * delta * x, eta * delta * x_hat))[:, None]
        total = total + 0.7 * offset(h)  # one value per pixel, counted for each of the C channels
    return total.reshape(n, -1).sum(1), (x_in, P)


# ---- data -------------------------------------------------------------------------------------------------

def images() -> torch.Tensor:
    """Four 3 x 2 x 2 images in mapped units: two colourful (P > 0), two nearly grey (P < 0). Two values lie
    just outside [Shift, Shift + Scale] (as augmented data can), where SDD clamps and Beta diffusion does not."""
    colourful = torch.tensor([[0.595, 0.99, 0.6, 0.95], [0.98, 0.6, 0.996, 0.62], [0.61, 0.97, 0.6, 0.99]],
                             dtype=F64)
    grey = torch.tensor([[0.8, 0.81, 0.79, 0.8], [0.8, 0.8, 0.82, 0.79], [0.81, 0.79, 0.8, 0.8]], dtype=F64)
    return torch.stack([colourful, colourful.flip(1), grey, 0.5 * (grey + grey.roll(1, 0))]).reshape(4, 3, 2, 2)


T_VALUES = torch.tensor([0.5, 0.08, 0.93, 0.3], dtype=F64)

CASES = {  # BetaMethod kwargs -> hand_loss kwargs
    "sdd-hkd-paper": ({}, dict(weights=(0.97, 0.03))),
    "sdd-klub-expected": (dict(loss_type="klub", penalty="expected", smooth_lambda=0.01, prev_ratio=0.8),
                          dict(loss_type="klub", penalty="expected", smooth_lambda=0.01, prev_ratio=0.8,
                               weights=(0.96, 0.04))),
    "sdd-hkd-small-eta": (dict(eta=200.0, smooth_lambda=0.02), dict(eta=200.0, smooth_lambda=0.02,
                                                                     weights=(0.97, 0.03))),
    "sdd-elbo": (dict(loss_type="elbo", eta=500.0), dict(loss_type="elbo", eta=500.0, weights=(0.99, 0.01))),
    "betadiff-klub": (dict(variant="betadiff"), dict(variant="betadiff", loss_type="klub", smooth_lambda=0,
                                                     penalty="off", weights=(0.99, 0.01))),
    "betadiff-elbo-prev-power": (dict(variant="betadiff", loss_type="elbo", prev_ratio=0.7, sigmoid_power=2.0),
                                 dict(variant="betadiff", loss_type="elbo", smooth_lambda=0, penalty="off",
                                      prev_ratio=0.7, sigmoid_power=2.0, weights=(0.99, 0.01))),
}


class InputSpy(StubNet):
    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        self.inputs.append((x.detach().clone(), noise_labels.detach().clone()))
        return super().forward(x, noise_labels)


@pytest.mark.parametrize("case", list(CASES))
def test_loss_at_equals_the_hand_computed_value(case, mean_gammas):
    method_kw, hand_kw = dict(CASES[case][0]), CASES[case][1]  # a copy: the table is shared by every run
    net = InputSpy()
    m = BetaMethod(net, 3, 2, variant=method_kw.pop("variant", "sdd"), **method_kw)
    x0 = images()
    got = m.loss_at(x0, T_VALUES, StackedRandomGenerator("cpu", range(4)))
    assert got.dtype == torch.float32  # per-example losses leave in float32 (the loop sums them)
    got = got.double().numpy()
    want, (x_in, P) = hand_loss(x0.numpy(), T_VALUES.numpy(), **hand_kw)
    np.testing.assert_allclose(net.inputs[0][0].numpy(), x_in, rtol=1e-6, atol=1e-6)  # standardised input
    power = hand_kw.get("sigmoid_power", 1.0)
    np.testing.assert_allclose(net.inputs[0][1].numpy(), -logit_alpha(T_VALUES.numpy(), p=power) / 8, rtol=1e-6)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    if P is not None:  # the penalty takes both signs here, so its clamp max(0, P) is exercised both ways
        assert (P > 0).any() and (P < 0).any(), P.ravel()


@pytest.mark.parametrize("case", ["sdd-hkd-small-eta", "betadiff-klub"])
def test_float32_inputs_are_computed_in_float64(case, mean_gammas):
    """The loop hands loss_at float32 images (encode) and t; the Beta maths runs in float64 regardless: with
    eta = 1e4 float32 KL terms would be off by far more than the tolerance."""
    method_kw, hand_kw = dict(CASES[case][0]), CASES[case][1]
    m = BetaMethod(StubNet(), 3, 2, variant=method_kw.pop("variant", "sdd"), **method_kw)
    x0, t = images().float(), T_VALUES.float()
    got = m.loss_at(x0, t, StackedRandomGenerator("cpu", range(4))).double().numpy()
    want, _ = hand_loss(x0.double().numpy(), t.double().numpy(), **hand_kw)
    np.testing.assert_allclose(got, want, rtol=2e-6)


@pytest.mark.parametrize("penalty", ["mc", "expected"])
@pytest.mark.parametrize("shape", [(4, 2, 2, 2), (4, 3, 1, 2)])
def test_sdd_loss_with_two_channels_or_one_row(shape, penalty, mean_gammas):
    """The channel-wise pieces (smoothness factor, penalty, HPD) at C = 2 and on a one-row image."""
    gen = torch.Generator().manual_seed(7)
    x0 = SHIFT + SCALE * torch.rand(shape, generator=gen, dtype=F64)
    x0[2:] = x0[2:].mean(dim=1, keepdim=True) + 0.002 * torch.randn(2, *shape[1:], generator=gen, dtype=F64)
    m = BetaMethod(StubNet(), shape[1], 2, variant="sdd", eta=200.0, smooth_lambda=0.02, penalty=penalty)
    got = m.loss_at(x0, T_VALUES, StackedRandomGenerator("cpu", range(4))).double().numpy()
    want, (_, P) = hand_loss(x0.numpy(), T_VALUES.numpy(), eta=200.0, smooth_lambda=0.02, penalty=penalty,
                             weights=(0.97, 0.03))
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert np.abs(P).max() > 1e-4


def test_the_penalty_and_smoothing_are_observable(mean_gammas):
    """Self-check of the cases above: switching off the penalty, flipping its sign, multiplying instead of
    dividing by the smoothness factor or taking s = t changes the hand value by far more than the 2e-6
    tolerance, so those wirings are pinned."""
    x0, t = images().numpy(), T_VALUES.numpy()
    rel = lambda a, b: np.abs(a - b).max() / np.abs(a).max()
    base, _ = hand_loss(x0, t, eta=200.0, smooth_lambda=0.02, weights=(0.97, 0.03))
    assert rel(base, hand_loss(x0, t, eta=200.0, smooth_lambda=0.02, weights=(0.97, 0.03), penalty="off")[0]) > 1e-3
    grown, _ = hand_loss(x0, t, eta=200.0, smooth_lambda=0.02 * 1.5, weights=(0.97, 0.03))
    assert rel(base, grown) > 1e-4  # a different smoothness factor is visible
    base2, _ = hand_loss(x0, t, loss_type="klub", penalty="expected", smooth_lambda=0.01, prev_ratio=0.8,
                         weights=(0.96, 0.04))
    other, _ = hand_loss(x0, t, loss_type="klub", penalty="expected", smooth_lambda=0.01, prev_ratio=0.95,
                         weights=(0.96, 0.04))
    assert rel(base2, other) > 1e-2


def test_loss_draws_t_uniformly_on_t_min_to_one_from_each_seed(mean_gammas):
    """loss() = loss_at at t = 1 + u (t_min - 1), u the first uniform of each example's generator (§3)."""
    m = BetaMethod(StubNet(), 3, 2, variant="sdd", t_min=0.2)
    seeds = [5, 6, 7, 8]
    got = m.loss(images(), None, StackedRandomGenerator("cpu", seeds)).double().numpy()
    u = np.array([float(torch.rand((), generator=torch.Generator().manual_seed(s), dtype=F64)) for s in seeds])
    want, _ = hand_loss(images().numpy(), 1 + u * (0.2 - 1), weights=(0.97, 0.03))
    np.testing.assert_allclose(got, want, rtol=2e-6)


def test_hand_logit_is_the_patched_draw(mean_gammas):
    """The premise of the file: with ln G(a) = ln a, l_t = logit(alpha_t x0)."""
    from difflab.methods.beta import method as beta_method

    a = torch.tensor([[2.0, 5.0]], dtype=F64)
    assert torch.equal(beta_method.log_gamma(None, a), torch.log(a))
    assert math.isclose(float(np.log(1e4 * 0.3 * 0.8) - np.log(1e4 * (1 - 0.3 * 0.8))),
                        math.log(0.24 / 0.76), rel_tol=1e-12)


# ---- the sampler (§6) by hand ------------------------------------------------------------------------------

LABEL_COLOUR = ((1.0, -1.0, 1.0), (-0.5, 0.5, 0.0))


class LabelStubNet(nn.Module):
    """F = -0.9 x_in + 0.2 c_noise + a colour chosen by the class label (so dropped labels show); records its
    inputs."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        self.inputs.append(x.detach().numpy().copy())
        colour = torch.tensor(LABEL_COLOUR, dtype=x.dtype)[class_labels].reshape(-1, 3, 1, 1)
        return -0.9 * x + 0.2 * noise_labels.reshape(-1, 1, 1, 1) + colour


def hand_grid(steps: int, grid: str, c0=10.0, c1=-13.0, p=1.0) -> np.ndarray:
    """§6 time grid: alpha_j = sigma(c1)^((N - j)/N) (logit +inf at j = N), or t_i = 1 - i (1 - 1e-5)/(N - 1)
    with t_N = 0."""
    if grid == "alpha":
        log_alpha = (steps - np.arange(steps + 1)) / steps * -np.log1p(np.exp(-c1))
        with np.errstate(divide="ignore"):
            return log_alpha - np.log(-np.expm1(log_alpha))
    t = np.append(1 - np.arange(steps) * (1 - 1e-5) / (steps - 1), 0.0)
    return logit_alpha(t, c0, c1, p)


def hand_sample(x_init: np.ndarray, labels: list[int], steps: int, grid: str, eta: float, smooth_lambda: float,
                schedule=(10.0, -13.0, 1.0)):
    """§6 with mean Gamma draws: l_0 = logit(alpha_0 x_init) (SDD: / m), then per step x0_hat = D(l, alpha_j),
    l_p = logit of the innovation, l <- LSE(l, l_p, l + l_p); returns (x0_hat, z0 = sigma(l_N)/alpha_N) and the
    backbone inputs of every step."""
    n = len(labels)
    logits = hand_grid(steps, grid, *schedule)
    alpha = expit(logits)
    x = np.broadcast_to(x_init, (n, *x_init.shape))
    ell = np.log(eta * alpha[0] * x) - np.log(eta * (1 - alpha[0] * x))
    if smooth_lambda:
        ell = ell / np.exp(smooth_lambda * (np.diff(ell, axis=1) ** 2).sum(1)).mean(axis=(1, 2)).reshape(n, 1, 1, 1)
    colour = np.float32(LABEL_COLOUR)[labels].reshape(n, 3, 1, 1)
    inputs = []
    for j in range(steps):
        mu, std = standardise(np.array([logits[j]]), eta)
        x_in = ((ell - mu[0]) / std[0]).astype(np.float32)
        inputs.append(x_in)
        out = -np.float32(0.9) * x_in + np.float32(0.2) * np.float32(-logits[j] / 8) + colour
        x_hat = expit(np.clip((x_in + out).astype(np.float64), -30, 30)) * SCALE + SHIFT
        delta = alpha[j + 1] - alpha[j]
        ell_p = np.log(eta * delta * x_hat) - np.log(eta * (1 - alpha[j + 1] * x_hat))
        ell = np.logaddexp.reduce(np.stack([ell, ell_p, ell + ell_p]), axis=0)
    return x_hat, expit(ell) / alpha[-1], inputs


class _OneMean:
    def __init__(self, mean):
        self.mean = mean

    def mean_image(self):
        return self.mean

    def __len__(self):
        return 1


@pytest.mark.parametrize("variant,grid,steps,prior,schedule", [
    ("sdd", "alpha", 8, None, (10.0, -13.0, 1.0)), ("betadiff", "alpha", 8, None, (10.0, -13.0, 1.0)),
    ("sdd", "t", 6, "mean", (10.0, -13.0, 1.0)), ("betadiff", "t", 5, "constant", (10.0, -13.0, 1.0)),
    ("sdd", "alpha", 7, "mean", (10.0, -2.0, 1.0)), ("betadiff", "t", 6, None, (4.0, -2.5, 2.0))])
def test_sampler_trajectory_by_hand(variant, grid, steps, prior, schedule, mean_gammas):
    """The whole sampler with mean Gamma draws and a label-dependent stub: the backbone input of every step
    and both outputs equal the hand recursion. The outputs forget the start (its weight decays like
    alpha_0/alpha_j), the first backbone input does not; a short schedule (sigmoid_end -2, alpha_0 = 0.12)
    makes the start's second Gamma shape eta (1 - alpha_0 x) visible, a fitted mean image SDD's rescaling of
    l_0 (a constant prior has no colour differences, so m = 1 there)."""
    net = LabelStubNet()
    smooth = 0.05 if variant == "sdd" else 0.0
    c0, c1, power = schedule
    m = BetaMethod(net, 3, 2, variant=variant, eta=300.0, smooth_lambda=smooth, prior=prior, sigmoid_start=c0,
                   sigmoid_end=c1, sigmoid_power=power)
    mean_u8 = np.array([[[20.0, 240.0], [128.0, 60.0]], [[200.0, 10.0], [90.0, 255.0]], [[0.0, 128.0], [30, 180]]])
    m.fit_data(_OneMean(mean_u8))
    prior = prior or ("constant" if variant == "sdd" else "mean")
    x_init = (mean_u8 / 255 * SCALE + SHIFT) if prior == "mean" else np.full((3, 2, 2), SHIFT + SCALE / 2)
    labels = [1, 0]
    x_hat, z0 = m.sample(StackedRandomGenerator("cpu", [0, 1]), class_labels=torch.tensor(labels), steps=steps,
                         grid=grid, output="both")
    assert x_hat.dtype == z0.dtype == torch.float32
    want_x, want_z, want_inputs = hand_sample(x_init.astype(np.float32).astype(np.float64), labels, steps, grid,
                                              300.0, smooth, schedule)
    assert len(net.inputs) == steps
    for got_in, want_in in zip(net.inputs, want_inputs):
        np.testing.assert_allclose(got_in, want_in, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x_hat.numpy(), want_x, rtol=2e-6)
    np.testing.assert_allclose(z0.numpy(), want_z, rtol=2e-6)
    assert np.abs(want_x[0] - want_x[1]).max() > 1e-3  # the label changes the trajectory
