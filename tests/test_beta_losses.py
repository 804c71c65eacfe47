"""Beta / SDD divergences and losses (specs/beta_sdd.md §8 items 6, 8, 9; §5.4 penalty)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats
from scipy.optimize import minimize_scalar

from difflab.errors import UserError
from difflab.methods.beta.divergences import (
    holder_pseudo_divergence,
    kl_beta,
    penalty_expected,
    penalty_mc,
)
from difflab.methods.beta.losses import canonical_loss_type, default_kl_weights, elementwise_loss
from difflab.rng import StackedRandomGenerator

F64 = torch.float64


def t64(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=F64)


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


# The §5.3 test vector: eta = 1e4, t = 0.5, s = 0.475 on the default schedule (10 -> -13).
ETA = 1e4
ALPHA_T, ALPHA_S = t64(_sig(-1.5)), t64(_sig(-0.925))
DELTA = ALPHA_S - ALPHA_T


def _loss(x0: float, xh, loss_type: str, variant: str = "betadiff", **kw) -> torch.Tensor:
    xh = xh if isinstance(xh, torch.Tensor) else t64(xh)
    weights = default_kl_weights(variant, loss_type)
    return elementwise_loss(t64(x0).expand_as(xh), xh, ALPHA_T, ALPHA_S, DELTA, ETA, loss_type, weights, **kw)


# ---- item 6: KL between Betas --------------------------------------------------------------------
def test_kl_check_values():
    assert math.isclose(float(kl_beta(t64(2), t64(3), t64(4), t64(1.5))), 1.4897365804, rel_tol=1e-9)
    assert math.isclose(float(kl_beta(t64(0.5), t64(0.7), t64(1.2), t64(2))), 0.4930226482, rel_tol=1e-9)


SHAPES = [(2, 3, 4, 1.5), (0.5, 0.7, 1.2, 2), (30, 7, 25, 9), (0.9, 40, 2, 33)]


@pytest.mark.parametrize("a1,b1,a2,b2", SHAPES)
def test_kl_matches_numerical_integration(a1, b1, a2, b2):
    lnb_p, lnb_q = special.betaln(a1, b1), special.betaln(a2, b2)

    def integrand(u: float) -> float:
        # In logit coordinates z = sigmoid(u) the endpoint singularities of shapes < 1 disappear
        # (the Jacobian z(1 - z) cancels the -1 exponents of the density).
        log_z, log_1mz = -math.log1p(math.exp(-u)), -math.log1p(math.exp(u))
        log_ratio = (a1 - a2) * log_z + (b1 - b2) * log_1mz - lnb_p + lnb_q
        return math.exp(a1 * log_z + b1 * log_1mz - lnb_p) * log_ratio

    want, err = integrate.quad(integrand, -60, 60, limit=500, epsabs=1e-13, epsrel=1e-12, points=[0.0])
    assert err < 1e-9
    assert abs(float(kl_beta(t64(a1), t64(b1), t64(a2), t64(b2))) - want) < 1e-8


def test_kl_zero_on_equal_and_nonnegative_over_wide_shapes():
    gen = torch.Generator().manual_seed(0)
    log_shapes = torch.empty(4, 200_000, dtype=F64).uniform_(math.log(1e-3), math.log(1e5), generator=gen)
    shapes = torch.exp(log_shapes)
    kl = kl_beta(*shapes)
    assert torch.isfinite(kl).all() and bool((kl >= 0).all())
    assert bool((kl_beta(shapes[0], shapes[1], shapes[0], shapes[1]) == 0).all())


def test_kl_gradient_finite_at_tiny_shapes():
    x_hat = torch.tensor([0.61, 0.8, 0.98], dtype=F64, requires_grad=True)
    for scale in (1e-6, 1e-2, 1e4):
        data = (scale * t64(0.7, 0.75, 0.9), t64(5e3, 6e3, 7e3))
        loss = kl_beta(scale * x_hat, 1e4 * (1 - 0.5 * x_hat), *data)
        (g,) = torch.autograd.grad(loss.sum(), x_hat)
        assert torch.isfinite(g).all() and bool((g != 0).any())


# ---- item 8: loss test vector, zeros, HPD -------------------------------------------------------------
def test_loss_test_vector():
    ref = {("klub_conditional", "betadiff"): 2.461230, ("klub_marginal", "betadiff"): 3.459750,
           ("klub", "betadiff"): 2.471215, ("elbo", "betadiff"): 2.441738, ("klub", "sdd"): 2.501171}
    for (loss_type, variant), want in ref.items():
        got = float(_loss(0.8, 0.75, loss_type, variant))
        assert math.isclose(got, want, rel_tol=1e-6), (loss_type, variant, got, want)


@pytest.mark.parametrize("loss_type", ["klub", "elbo", "snr_weighted_elbo", "klub_conditional",
                                       "klub_marginal_as", "l1", "l2"])
def test_proper_losses_vanish_at_the_data(loss_type):
    x = t64(0.6, 0.7, 0.85, 0.99)
    assert bool((elementwise_loss(x, x, ALPHA_T, ALPHA_S, DELTA, ETA, loss_type, (0.99, 0.01)) == 0).all())
    assert bool((_loss(0.8, 0.75, loss_type) > 0).all())


def test_single_terms_and_argument_order():
    cond = float(_loss(0.8, 0.75, "klub_conditional"))
    marg = float(_loss(0.8, 0.75, "klub_marginal"))
    assert math.isclose(float(_loss(0.8, 0.75, "klub")), 0.99 * cond + 0.01 * marg, rel_tol=1e-12)
    # The _as terms swap the KL arguments: KL(q || p) with data first.
    a_d, b_d = ETA * DELTA * 0.8, ETA * (1 - ALPHA_S * 0.8)
    a_h, b_h = ETA * DELTA * 0.75, ETA * (1 - ALPHA_S * 0.75)
    assert math.isclose(float(_loss(0.8, 0.75, "klub_conditional_as")), float(kl_beta(a_d, b_d, a_h, b_h)),
                        rel_tol=1e-12)
    snr = float(_loss(0.8, 0.75, "snr_weighted_elbo"))
    assert math.isclose(snr, float(_loss(0.8, 0.75, "klub_marginal_as")))
    assert math.isclose(float(_loss(0.8, 0.75, "l2")), 0.05**2)
    assert math.isclose(float(_loss(0.8, 0.75, "l1")), 0.05)


def test_loss_names():
    assert canonical_loss_type("KLUB_AS") == "elbo"
    assert canonical_loss_type("SNR_Weighted_ELBO") == "snr_weighted_elbo"
    with pytest.raises(UserError, match="loss_type"):
        canonical_loss_type("klubb")


def _random_concentrations(n: int, c: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    log_a = torch.empty(n, c, 1, 1, dtype=F64).uniform_(math.log(1e-3), math.log(1e4), generator=gen)
    return torch.exp(log_a)


def test_hpd_properties():
    p, q = _random_concentrations(1000, 3, 1), _random_concentrations(1000, 3, 2)
    hpd = holder_pseudo_divergence(p, q)
    assert hpd.shape == (1000, 1, 1, 1)
    assert bool((hpd >= 0).all())
    assert torch.equal(hpd, holder_pseudo_divergence(q, p))  # exactly symmetric
    assert bool((holder_pseudo_divergence(p, p) > 0).all())  # improper: HPD(p, p) > 0
    # Single-channel data: the Dirichlet log-normaliser is identically 0, so is HPD.
    assert bool((holder_pseudo_divergence(p[:, :1], q[:, :1]) == 0).all())


def test_hpd_offset_is_a_scalar_at_any_size():
    p = _random_concentrations(2 * 5 * 7, 3, 3).reshape(2, 5, 7, 3).permute(0, 3, 1, 2)
    q = _random_concentrations(2 * 5 * 7, 3, 4).reshape(2, 5, 7, 3).permute(0, 3, 1, 2)
    full = holder_pseudo_divergence(p, q)
    assert full.shape == (2, 1, 5, 7)
    pixel = (slice(None), slice(None), slice(3, 4), slice(6, 7))
    torch.testing.assert_close(full[pixel], holder_pseudo_divergence(p[pixel], q[pixel]))


def test_hkd_counts_hpd_per_channel_and_penalty_offsets_terms():
    gen = torch.Generator().manual_seed(5)
    x0 = 0.6 + 0.39 * torch.rand(2, 3, 4, 4, generator=gen, dtype=F64)
    xh = 0.6 + 0.39 * torch.rand(2, 3, 4, 4, generator=gen, dtype=F64)
    w = (0.97, 0.03)
    klub = elementwise_loss(x0, xh, ALPHA_T, ALPHA_S, DELTA, ETA, "klub", w)
    hkd = elementwise_loss(x0, xh, ALPHA_T, ALPHA_S, DELTA, ETA, "hkd", w, hpd_weight=0.7)
    hpd = holder_pseudo_divergence(ETA * DELTA * x0, ETA * DELTA * xh)
    torch.testing.assert_close(hkd, klub + 0.7 * hpd.expand_as(klub))
    # P <= 0 changes nothing; a huge P zeroes every divergence term.
    neg = elementwise_loss(x0, xh, ALPHA_T, ALPHA_S, DELTA, ETA, "hkd", w, penalty=t64(-3.0))
    torch.testing.assert_close(neg, hkd)
    big = elementwise_loss(x0, xh, ALPHA_T, ALPHA_S, DELTA, ETA, "hkd", w, penalty=t64(1e9))
    assert bool((big == 0).all())
    mid = elementwise_loss(x0, xh, ALPHA_T, ALPHA_S, DELTA, ETA, "klub_conditional", (1, 1), penalty=t64(0.5))
    cond = elementwise_loss(x0, xh, ALPHA_T, ALPHA_S, DELTA, ETA, "klub_conditional", (1, 1))
    torch.testing.assert_close(mid, (cond - 0.5).clamp(min=0))


# ---- item 9: KLUB's minimiser is the posterior mean -------------------------------------------------------
def test_klub_is_minimised_by_the_posterior_mean():
    points, weights = (0.62, 0.95), (0.3, 0.7)
    post_mean = sum(w * p for w, p in zip(weights, points))

    def argmin(loss_type: str) -> float:
        def f(v: float) -> float:
            return sum(w * float(_loss(p, v, loss_type)) for w, p in zip(weights, points))
        return minimize_scalar(f, bounds=(0.6, 0.99), method="bounded", options={"xatol": 1e-10}).x

    for loss_type in ("klub", "klub_conditional", "klub_marginal"):
        assert abs(argmin(loss_type) - post_mean) < 1e-6, loss_type
    assert post_mean - argmin("elbo") > 3e-3  # the ELBO is not minimised by the posterior mean


# ---- SDD penalty integral (§5.4 item 3) ---------------------------------------------------------------
def test_penalty_mc_matches_closed_form_and_leaves_global_rng_alone():
    a = _random_concentrations(12, 3, 6).reshape(2, 3, 2, 3) * 0 + t64(2.0, 5.0, 0.5).view(1, 3, 1, 1)
    state = torch.get_rng_state()
    rng = StackedRandomGenerator("cpu", [0, 1])
    est = penalty_mc(rng, a, samples=4000)
    assert torch.equal(state, torch.get_rng_state())
    want = penalty_expected(a)
    assert est.shape == want.shape == (2, 2, 3)
    np.testing.assert_allclose(est.numpy(), want.numpy(), rtol=0.05)
    # Closed form by brute force for one pixel: E[(D2 - D1)^2 + (D3 - D2)^2], D ~ Dir(2, 5, 0.5).
    d = stats.dirichlet([2.0, 5.0, 0.5]).rvs(400_000, random_state=np.random.default_rng(0))
    brute = ((d[:, 1] - d[:, 0]) ** 2 + (d[:, 2] - d[:, 1]) ** 2).mean()
    assert abs(float(want[0, 0, 0]) - brute) < 3e-3
    assert bool((penalty_mc(rng, a[:, :1]) == 0).all()) and bool((penalty_expected(a[:, :1]) == 0).all())


def test_penalty_mc_rows_depend_on_their_seed_only():
    a = t64(2.0, 5.0, 0.5).view(1, 3, 1, 1).expand(3, 3, 2, 2).contiguous()
    full = penalty_mc(StackedRandomGenerator("cpu", [4, 5, 6]), a, samples=20)
    alone = penalty_mc(StackedRandomGenerator("cpu", [5]), a[1:2], samples=20)
    torch.testing.assert_close(full[1:2], alone, rtol=0, atol=0)
