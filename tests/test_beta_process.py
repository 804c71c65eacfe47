"""Beta / SDD forward process (specs/beta_sdd.md §8 items 1-5, 7)."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import stats

from difflab.methods.beta.process import (
    alpha_gap,
    log_beta_logit,
    log_gamma,
    logit_alpha,
    logit_moments,
    reverse_logit_update,
    sampler_logit_grid,
    smoothness_factor,
)
from difflab.rng import StackedRandomGenerator

F64 = torch.float64
C0, C1 = 10.0, -13.0


def _draws(a: float, n: int, seeds=(0, 1, 2, 3)) -> np.ndarray:
    """``n`` draws of ``ln G(a)`` spread over a few per-seed rows."""
    rng = StackedRandomGenerator("cpu", seeds)
    shape = torch.full((len(seeds), n // len(seeds)), a, dtype=F64)
    return log_gamma(rng, shape).flatten().numpy()


# ---- item 1: schedule --------------------------------------------------------------------------
@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_schedule_endpoints_and_monotone(power):
    t = torch.linspace(0, 1, 1001, dtype=F64)
    la = logit_alpha(t, C0, C1, power)
    assert la[0] == C0 and la[-1] == C1
    assert bool((la.diff() < 0).all())
    tt = t[1:]
    alpha = lambda x: torch.sigmoid(logit_alpha(x, C0, C1, power))
    assert bool((alpha(0.95 * tt) > alpha(tt)).all())


@pytest.mark.parametrize("steps", [1, 10, 200])
def test_alpha_grid_is_geometric(steps):
    la = sampler_logit_grid(steps, C0, C1, 1.0, grid="alpha")
    log_alpha = torch.nn.functional.logsigmoid(la)
    assert la.shape == (steps + 1,)
    assert torch.isclose(la[0], torch.tensor(C1, dtype=F64), atol=1e-12)
    assert la[-1] == math.inf and log_alpha[-1] == 0
    step = math.log(1 / (1 + math.exp(13))) / steps
    np.testing.assert_allclose(log_alpha.diff().numpy(), -step, rtol=1e-10)


def test_auto_grid_switches_to_t_grid_above_350():
    assert sampler_logit_grid(350, C0, C1, 1.0, "auto")[-1] == math.inf
    la = sampler_logit_grid(400, C0, C1, 1.0, "auto")
    torch.testing.assert_close(la, sampler_logit_grid(400, C0, C1, 1.0, "t"))
    assert la[0] == C1 and la[-1] == C0 and bool((la.diff() > 0).all())
    # t_{N-1} = 1e-5, t_N = 0 (§6).
    assert math.isclose(float(la[-2]), C0 + (C1 - C0) * 1e-5, rel_tol=1e-12)


def test_alpha_gap_matches_high_precision():
    mpmath.mp.dps = 50
    near_data = (C0 + (C1 - C0) * 0.95e-5, C0 + (C1 - C0) * 1e-5)
    cases = [near_data, (-0.925, -1.5), (-11.85, -13.0), (math.inf, 2.7)]
    for hi, lo in cases:
        got = float(alpha_gap(torch.tensor(hi, dtype=F64), torch.tensor(lo, dtype=F64)))
        want = (1 if hi == math.inf else 1 / (1 + mpmath.exp(-hi))) - 1 / (1 + mpmath.exp(-lo))
        assert math.isclose(got, float(want), rel_tol=1e-12), (hi, lo, got, want)


# ---- item 2: log-Gamma sampler ---------------------------------------------------------------------
@pytest.mark.parametrize("a", [1e-4, 1e-2, 0.5, 5.0, 1e4])
def test_log_gamma_moments(a):
    x = _draws(a, 100_000)
    assert np.isfinite(x).all()
    a64 = torch.tensor(a, dtype=F64)
    mean, var = float(torch.special.digamma(a64)), float(torch.special.polygamma(1, a64))
    assert abs(x.mean() - mean) / math.sqrt(var / x.size) < 5
    assert abs(x.var() / var - 1) < 0.05


@pytest.mark.parametrize("a", [1e-4, 1e-2, 0.5, 1.0, 5.0, 1e4])
def test_log_gamma_law_ks(a):
    # scipy's loggamma(c) is the law of log(X), X ~ Gamma(c).
    x = _draws(a, 20_000, seeds=(11, 12))
    assert stats.kstest(x, stats.loggamma(a).cdf).pvalue > 1e-3


def test_log_gamma_does_not_floor():
    # float32 Gamma samplers floor at tiny (ln = -87.3); the log-space sampler goes far below, finitely.
    x = _draws(1e-2, 20_000)
    assert np.isfinite(x).all() and (x < -87.4).mean() > 0.3


def test_log_gamma_rows_independent_of_batch_mates():
    """Row k's draws (and what it draws next) depend on seed k alone, even with rejections."""
    shape_a = torch.tensor([[0.5] * 300, [1e-3] * 300, [2.0] * 300], dtype=F64)
    full = StackedRandomGenerator("cpu", [3, 7, 11])
    alone = StackedRandomGenerator("cpu", [7])
    first_full, first_alone = log_gamma(full, shape_a), log_gamma(alone, shape_a[1:2])
    torch.testing.assert_close(first_full[1:2], first_alone, rtol=0, atol=0)
    torch.testing.assert_close(full.rand([3, 5])[1:2], alone.rand([1, 5]), rtol=0, atol=0)
    with pytest.raises(ValueError):
        log_gamma(alone, shape_a)


# ---- item 3: forward marginal ----------------------------------------------------------------------
@pytest.mark.parametrize("eta,alpha,x0", [(1e4, 0.3, 0.8), (20.0, 0.6, 0.7), (1e4, 2e-5, 0.6)])
def test_forward_marginal_moments(eta, alpha, x0):
    n = 100_000
    rng = StackedRandomGenerator("cpu", [5, 6])
    a = torch.full((2, n // 2), eta * alpha * x0, dtype=F64)
    z = torch.sigmoid(log_beta_logit(rng, a, eta - a)).flatten().numpy()
    m, v = alpha * x0, alpha * x0 * (1 - alpha * x0) / (eta + 1)
    assert abs(z.mean() - m) / math.sqrt(v / n) < 5
    assert abs(z.var() / v - 1) < 0.03


# ---- item 4: stick-breaking consistency --------------------------------------------------------------
@pytest.mark.parametrize("eta", [1e4, 30.0])
def test_stick_breaking_forward_and_reverse(eta):
    n, x0 = 40_000, 0.8
    alpha_s, alpha_t = 0.35, 0.2
    rng = StackedRandomGenerator("cpu", [21, 22])

    def full(v: float) -> torch.Tensor:
        return torch.full((2, n // 2), v, dtype=F64)

    # Forward: z_t = z_s * pi, pi ~ Beta(eta a_t x0, eta (a_s - a_t) x0).
    z_s = torch.sigmoid(log_beta_logit(rng, full(eta * alpha_s * x0), full(eta * (1 - alpha_s * x0))))
    pi = torch.sigmoid(log_beta_logit(rng, full(eta * alpha_t * x0), full(eta * (alpha_s - alpha_t) * x0)))
    marg_t = stats.beta(eta * alpha_t * x0, eta * (1 - alpha_t * x0))
    assert stats.kstest((z_s * pi).flatten().numpy(), marg_t.cdf).pvalue > 1e-3
    # Reverse in logit space: logit z_s = LSE(l_t, l_p, l_t + l_p),
    # p ~ Beta(eta (a_s - a_t) x0, eta (1 - a_s x0)).
    ell_t = log_beta_logit(rng, full(eta * alpha_t * x0), full(eta * (1 - alpha_t * x0)))
    ell_p = log_beta_logit(rng, full(eta * (alpha_s - alpha_t) * x0), full(eta * (1 - alpha_s * x0)))
    z_s2 = torch.sigmoid(reverse_logit_update(ell_t, ell_p)).flatten().numpy()
    marg_s = stats.beta(eta * alpha_s * x0, eta * (1 - alpha_s * x0))
    assert stats.kstest(z_s2, marg_s.cdf).pvalue > 1e-3
    # A wrong kernel (p scaled by z_t instead of 1 - z_t) must be caught by the same test.
    z_bad = (torch.sigmoid(ell_t) * (1 + torch.sigmoid(ell_p))).flatten().numpy()
    assert stats.kstest(z_bad, marg_s.cdf).pvalue < 1e-6


# ---- item 5: logit update --------------------------------------------------------------------------
def test_logit_update_matches_mpmath():
    mpmath.mp.dps = 60
    gen = torch.Generator().manual_seed(0)
    noise = 20 * torch.randn(2, 60, generator=gen, dtype=F64)
    ell_t = torch.cat([torch.tensor([-1e3, -87.0, 0.0, 30.0], dtype=F64), noise[0]])
    ell_p = torch.cat([torch.tensor([-3.0, 5.0, -40.0, 2.0], dtype=F64), noise[1]])
    got = reverse_logit_update(ell_t, ell_p)
    for lt, lp, g in zip(ell_t.tolist(), ell_p.tolist(), got.tolist()):
        zt, p = 1 / (1 + mpmath.exp(-lt)), 1 / (1 + mpmath.exp(-lp))
        zs = zt + (1 - zt) * p
        want = float(mpmath.log(zs / (1 - zs)))
        assert math.isclose(g, want, rel_tol=1e-13, abs_tol=1e-12), (lt, lp, g, want)


def test_logit_update_with_underflowed_state_is_the_innovation():
    ell_p = torch.tensor([-5.0, 0.0, 7.5], dtype=F64)
    out = reverse_logit_update(torch.full_like(ell_p, -math.inf), ell_p)
    torch.testing.assert_close(out, ell_p, rtol=0, atol=0)


# ---- item 7: standardisation -------------------------------------------------------------------------
def test_standardisation_reference_values():
    la = torch.tensor([10.0, 2.70, 0.0, -6.10, -13.0], dtype=F64)
    mu, std = logit_moments(la, 1e4, 0.6, 0.39)
    np.testing.assert_allclose(mu.numpy(), [1.582056, 1.165145, -0.421752, -6.369006, -66.566077], rtol=1e-5)
    np.testing.assert_allclose(std.numpy(), [0.813049, 0.502293, 0.172808, 0.284708, 58.007314], rtol=1e-5)


@pytest.mark.parametrize("la", [-6.10, 0.0])
def test_standardisation_mean_is_exact(la):
    n, eta = 200_000, 1e4
    k = eta / (1 + math.exp(-la))
    gen = torch.Generator().manual_seed(3)
    x0 = 0.6 + 0.39 * torch.rand(2, n // 2, generator=gen, dtype=F64)
    ell = log_beta_logit(StackedRandomGenerator("cpu", [8, 9]), k * x0, eta - k * x0).flatten()
    mu, _ = logit_moments(torch.tensor(la, dtype=F64), eta, 0.6, 0.39)
    assert abs(float(ell.mean()) - float(mu)) < 5 * float(ell.std()) / math.sqrt(n)


def test_smoothness_factor():
    ell = torch.tensor([[[[0.0]], [[1000.0]], [[0.0]]], [[[1.0]], [[1.0]], [[1.0]]]], dtype=F64)
    m = smoothness_factor(ell, 2e-6).flatten()
    torch.testing.assert_close(m, torch.tensor([math.exp(2e-6 * 2e6), 1.0], dtype=F64))
    assert bool((smoothness_factor(ell[:, :1], 2e-6) == 1).all())
    assert torch.isfinite(smoothness_factor(ell * 1e6, 2e-6)).all()
