"""Discrete schedules, σ table, respacing and DDIM subsequences (specs/gaussian_and_dddm.md §2.1, §2.3,
§2.5, §2.7 check 1, §3 check 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.errors import UserError
from difflab.methods.gaussian.schedules import (
    alpha_bar,
    alpha_bar_from_sigma,
    cosine_alpha_bar_fn,
    ddim_timesteps,
    get_betas,
    respace_betas,
    schedule_name,
    sigmas_from_alpha_bar,
    space_timesteps,
)

# §2.5 table [N] (T=1000, low 1e-4, high 0.02), checked to the digits printed there.
TABLE = {
    "linear": ("1.000e-4", "1.004e-2", "2.000e-2", "0.0786", "4.04e-5"),
    "DNS": ("1.005e-4", "5.09e-3", "1.992e-2", "0.409", "1.13e-3"),
    "DNST": ("5.07e-3", "1.127e-2", "1.996e-2", "0.0183", "7.75e-6"),
    "cosine": ("4.13e-5", "3.15e-3", "0.999", "0.494", "2.4e-9"),
}


def half_last_digit(printed: str) -> float:
    """Half a unit in the last printed digit of ``printed`` (its rounding error)."""
    mant, _, exp = printed.partition("e")
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    return 0.5 * 10.0 ** (-decimals + (int(exp) if exp else 0))


@pytest.mark.parametrize("name", list(TABLE))
def test_table_values(name):
    betas = get_betas(name, 1000)
    abar = alpha_bar(betas)
    got = (betas[0], betas[499], betas[999], abar[499], abar[999])
    for g, want in zip(got, TABLE[name]):
        assert abs(float(g) - float(want)) <= half_last_digit(want) * 1.001, (name, float(g), want)


@pytest.mark.parametrize("name,off", [("DNS", 5), ("DNST", 1000)])
def test_dns_formula(name, off):
    """§2.5 literally: w_i = 1 - ((i+off)/(T+1+off))^2, beta_i = l + (h-l)(1 - w_i); ends inside (l, h)."""
    T, low, high = 1000, 1e-4, 0.02
    l, h = low * 1000 / T, high * 1000 / T
    want = []
    for i in range(T):
        w = 1 - ((i + off) / (T + 1 + off)) ** 2
        want.append(l + (h - l) * (1 - w))
    betas = get_betas(name, T, low, high)
    np.testing.assert_allclose(betas.numpy(), want, rtol=1e-13)
    assert l < float(betas[0]) and float(betas[-1]) < h
    assert bool((betas[1:] > betas[:-1]).all())


def test_dns_is_the_default_spelling_and_aliases():
    assert schedule_name("l") == "linear" and schedule_name("cos") == "cosine"
    assert schedule_name("dns") == "DNS" and schedule_name("DNST") == "DNST"
    with pytest.raises(UserError, match="--schedule"):
        schedule_name("quadratic")


def test_cosine_alpha_bar_matches_f_ratio():
    T = 1000
    betas = get_betas("cos", T)
    abar = alpha_bar(betas).numpy()
    t = np.arange(1, T + 1)
    want = cosine_alpha_bar_fn(t / T) / cosine_alpha_bar_fn(0.0)
    unclipped = betas.numpy() < 0.999
    first_clip = int(np.argmin(unclipped)) if not unclipped.all() else T
    np.testing.assert_allclose(abar[:first_clip], want[:first_clip], rtol=1e-10)
    assert first_clip >= T - 2  # the 0.999 clip only bites at the very end


@pytest.mark.parametrize("name", ["linear", "DNS"])
def test_t_scaling(name):
    """Bounds scale by 1000/T: T=4000 linear runs 2.5e-5 .. 5e-3 (§2.1)."""
    betas = get_betas(name, 4000)
    if name == "linear":
        assert float(betas[0]) == pytest.approx(2.5e-5) and float(betas[-1]) == pytest.approx(5e-3)
    assert float(betas.max()) < 5e-3 + 1e-12
    with pytest.raises(UserError, match="schedule-high"):
        get_betas(name, 10, 1e-4, 0.02 * 60)
    with pytest.raises(UserError, match="low < high"):
        get_betas(name, 1000, 0.02, 1e-4)


def test_sigma_table_is_the_vp_point():
    abar = alpha_bar(get_betas("linear", 1000))
    sigma = sigmas_from_alpha_bar(abar)
    assert bool((sigma[1:] > sigma[:-1]).all())
    torch.testing.assert_close(alpha_bar_from_sigma(sigma), abar, rtol=1e-12, atol=0)
    x0, n = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    for i in (0, 300, 999):
        vp = abar[i].sqrt() * x0 + (1 - abar[i]).sqrt() * n
        ve = abar[i].sqrt() * (x0 + sigma[i] * n)
        torch.testing.assert_close(vp, ve, rtol=1e-12, atol=1e-14)


def test_space_timesteps_specs():
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, 10) == space_timesteps(1000, "10")
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    assert space_timesteps(1000, "1000") == list(range(1000))
    kept = space_timesteps(300, "10,15,20")
    sections = [range(0, 100), range(100, 200), range(200, 300)]
    assert [sum(k in s for k in kept) for s in sections] == [10, 15, 20]
    assert {0, 99, 100, 199, 200, 299} <= set(kept)
    # unequal sections: the first T % n are one longer
    kept = space_timesteps(10, "2,2,2")
    assert kept == [0, 3, 4, 6, 7, 9]
    for bad in ("ddimx", "ddim6", "0", "a,b", "200,200"):
        with pytest.raises(UserError, match="respacing"):
            space_timesteps(300 if bad != "ddim6" else 10, bad)


@pytest.mark.parametrize("name", ["linear", "cosine", "DNS", "DNST"])
@pytest.mark.parametrize("spec", ["10", "ddim25", "3,7,20"])
def test_respaced_betas_reproduce_alpha_bar(name, spec):
    abar = alpha_bar(get_betas(name, 1000))
    kept = space_timesteps(1000, spec)
    new_abar = alpha_bar(respace_betas(abar, kept))
    # float64 cancellation in 1 - beta' near beta = 0.999 leaves ~1e-16 absolute error
    torch.testing.assert_close(new_abar, abar[kept], rtol=1e-12, atol=1e-16)


def test_ddim_sequences():
    assert ddim_timesteps(1000, 10, "uniform") == list(range(0, 1000, 100))
    assert ddim_timesteps(1000, 10, "quad") == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]
    want = sorted({int(v) for v in np.linspace(0, math.sqrt(800), 50) ** 2})  # duplicates dropped
    assert ddim_timesteps(1000, 50, "quad") == want
    with pytest.raises(UserError, match="skip"):
        ddim_timesteps(1000, 10, "cubic")
    with pytest.raises(UserError, match="steps"):
        ddim_timesteps(100, 101)


def test_get_betas_defaults_and_its_smallest_chain():
    """The defaults are DDPM's linear 1000-step table (1e-4 to 0.02); T = 1 is a chain (its one beta is
    linspace's start, 1e-4 x 1000/T), T = 0 is refused in one line."""
    ref = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(get_betas().numpy(), ref, rtol=1e-15)
    assert get_betas().dtype == torch.float64
    assert get_betas("linear", 1, high=5e-4).tolist() == pytest.approx([0.1], rel=1e-15)
    with pytest.raises(UserError, match=r"^--num-timesteps must be >= 1, got 0$"):
        get_betas("linear", 0)
