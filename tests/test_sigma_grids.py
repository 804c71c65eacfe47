"""Every sigma grid against its formula written in numpy float64 (EDM §5.3-§5.4, score SDE's time grid, the DDPM
table's spacing; found by mutation testing, docs/testing.md): each option is handed on, the defaults are the
papers', one- and two-level grids, and the grids are float64 to the last bit that matters (rtol 1e-13)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.methods.gaussian import samplers as S
from difflab.methods.gaussian.sde import VESDE, VPSDE

f64 = torch.float64
TIGHT = dict(rtol=1e-13, atol=0)


def close(got: torch.Tensor, expected) -> None:
    assert got.dtype == f64
    np.testing.assert_allclose(got.numpy(), np.append(np.asarray(expected, dtype=np.float64), 0.0), **TIGHT)


def frac(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) / max(n - 1, 1)


def vp_sigma(t, beta_d, beta_min):
    return np.sqrt(np.expm1(0.5 * beta_d * t**2 + beta_min * t))


@pytest.mark.parametrize("n", [1, 2, 7])
def test_the_vp_discretisation_through_the_refit_process(n):
    """t_i = 1 + i/(N-1) (eps_s - 1), sigma(t) of the VP process refit so that sigma(eps_s) = sigma_min and
    sigma(1) = sigma_max (EDM §5.4); eps_s is the caller's (0.01 here), 1e-3 by default."""
    for eps_s, kw in [(0.01, {"epsilon_s": 0.01}), (1e-3, {})]:
        beta_d = 2 * (math.log(0.02**2 + 1) / eps_s - math.log(80.0**2 + 1)) / (eps_s - 1)
        beta_min = math.log(80.0**2 + 1) - 0.5 * beta_d
        t = 1 + frac(n) * (eps_s - 1)
        close(S.sigmas_vp(n, 0.02, 80.0, **kw), vp_sigma(t, beta_d, beta_min))


@pytest.mark.parametrize("n", [1, 2, 7])
def test_the_ve_discretisation_is_geometric_in_sigma_squared(n):
    close(S.sigmas_ve(n, 0.02, 100.0), np.sqrt(100.0**2 * (0.02**2 / 100.0**2) ** frac(n)))


def iddpm_table(C_1: float, C_2: float, M: int) -> np.ndarray:
    abar = lambda j: math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2  # noqa: E731
    u = np.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(abar(j - 1) / abar(j), C_1) - 1)
    return u


@pytest.mark.parametrize("n", [1, 2, 9, 27])
def test_the_iddpm_discretisation_picks_evenly_from_the_table(n):
    """u_j of improved DDPM's cosine table (EDM §5.4) inside [sigma_min, sigma_max] (both ends included), entries
    round(j (len - 1)/(N - 1)) computed in float64 (at N = 27 on the default table float32 picks other entries);
    C_1, C_2 and M are the caller's, 0.001, 0.008 and 1000 by default."""
    u = iddpm_table(0.01, 0.02, 60)
    lo, hi = float(u[50]), float(u[3])  # table entries: the filter keeps both
    inside = u[(u >= lo) & (u <= hi)]
    assert len(inside) == 48
    idx = np.round((len(inside) - 1) * frac(n)).astype(int)
    close(S.sigmas_iddpm(n, lo, hi, C_1=0.01, C_2=0.02, M=60), inside[idx])
    u = iddpm_table(0.001, 0.008, 1000)
    inside = u[(u >= 0.002) & (u <= 81.0)]
    close(S.sigmas_iddpm(n, 0.002, 81.0), inside[np.round((len(inside) - 1) * frac(n)).astype(int)])


@pytest.mark.parametrize("n", [1, 2, 6])
def test_the_logsnr_grid_and_its_defaults(n):
    """Uniform in ln sigma from sigma_max to sigma_min; EDM's [0.002, 80] by default."""
    close(S.sigmas_logsnr(n, 0.01, 20.0), np.exp(np.log(20.0) + frac(n) * (np.log(0.01) - np.log(20.0))))
    close(S.sigmas_logsnr(n), np.exp(np.log(80.0) + frac(n) * (np.log(0.002) - np.log(80.0))))


@pytest.mark.parametrize("n", [2, 5])
def test_the_time_uniform_grid_takes_the_callers_epsilon(n):
    """sigma(linspace(T, eps, N)) of the process: eps is the process's own sampling epsilon unless given."""
    sde = VPSDE(0.1, 20.0)
    for eps in (1e-3, 0.05):
        t = np.linspace(1.0, eps, n)
        kw = {} if eps == sde.t_eps else {"t_eps": eps}
        close(S.sigmas_time_uniform(sde, n, **kw), vp_sigma(t, 19.9, 0.1))
    ve = VESDE(0.01, 50.0)
    close(S.sigmas_time_uniform(ve, n, t_eps=0.0), 0.01 * (50.0 / 0.01) ** np.linspace(1.0, 0.0, n))


def test_the_table_spacing_walks_the_indices_down_in_float64():
    """table[sorted(indices)] from the largest index down, then 0, in float64 whatever the table's dtype."""
    table = torch.tensor([0.1, 0.2, 0.4, 0.8, 1.6], dtype=torch.float32) + 1e-8 * torch.arange(5)
    got = S.sigmas_table(table, [3, 0, 4])
    close(got, table.to(f64)[[4, 3, 0]].numpy())


def test_c_1_clips_the_first_ratio_of_the_iddpm_table():
    """C_1 bounds abar(j-1)/abar(j) from below; only the first ratio (abar(0) = 0) reaches it, so it sets the
    table's largest entry u_0: the whole table with C_1 = 0.01 differs from the default's there."""
    u = iddpm_table(0.01, 0.008, 40)
    lo, hi = float(u[39]), float(u[0])
    close(S.sigmas_iddpm(40, lo, hi, C_1=0.01, M=40), u[:40])
    assert float(S.sigmas_iddpm(40, lo, 1e9, M=40)[0]) != pytest.approx(hi, rel=1e-3)


def test_grids_are_float64_whatever_the_input():
    assert S.append_zero([0.5, 0.25]).dtype == f64
    assert S.append_zero(torch.tensor([0.5], dtype=torch.float32)).dtype == f64
    assert S.sigmas_edm(4, round_sigma=lambda s: s.to(torch.float32)).dtype == f64
