"""The shared ODE integrators (difflab/methods/gaussian/ode.py, specs/gaussian_and_dddm.md §4.5-4.6) against
independent references: the per-row RK45 against scipy's ``solve_ivp(method="RK45")`` to rounding (same
trajectory, same evaluation count), the fixed-step methods against their closed-form one-step polynomials."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from difflab.methods.gaussian import ode

f64 = torch.float64
A = torch.tensor([[-1.0, 2.0], [-3.0, -0.5]], dtype=f64)


def field(y, t, rows):
    """Nonlinear, time-dependent, with a rate of its own per row (so a row must keep its own index)."""
    rate = 0.3 * (1.0 + rows.to(f64))[:, None]
    return rate * (y @ A.T) - torch.tanh(2 * y) + torch.sin(3 * t)[:, None]


# the zero row takes scipy's h0 = 1e-6; the tiny one (below atol = 1e-8, f(0) tiny too) its d0, d1 < 1 branches
Y0 = torch.tensor([[1.0, -0.5], [0.2, 2.0], [3.0, 0.1], [0.0, 0.0], [5e-10, -1e-9]], dtype=f64)


@pytest.mark.parametrize("t0,t1,rtol,atol", [(0.0, 2.0, 1e-6, 1e-8), (2.0, 0.1, 1e-6, 1e-8),
                                             (0.0, 3.0, 1e-2, 1e-3), (1.5, -1.0, 1e-3, 1e-6)])
def test_rk45_follows_scipy_row_by_row(t0, t1, rtol, atol):
    """Each row of the batch solve equals scipy's RK45 on that row alone: y(t1) to rounding and the same
    number of evaluations (so the initial step, the error norm, the safety/min/max factors and the
    no-growth-after-rejection rule are scipy's), forward and backward in time."""
    y, nfe = ode.solve_rk45(field, Y0, t0, t1, rtol=rtol, atol=atol)
    assert y.dtype == f64 and nfe.dtype == torch.long
    for i in range(len(Y0)):
        def fun(t, v, i=i):
            return field(torch.tensor(v)[None], torch.tensor([t], dtype=f64), torch.tensor([i]))[0].numpy()
        ref = solve_ivp(fun, (t0, t1), Y0[i].numpy(), method="RK45", rtol=rtol, atol=atol)
        assert ref.success
        assert int(nfe[i]) == ref.nfev, (i, int(nfe[i]), ref.nfev)  # the same steps, accepted and rejected
        # the tiny row grows 4e10-fold backwards: the order of rounding in a sum shows at 1e-7 there
        np.testing.assert_allclose(y[i].numpy(), ref.y[:, -1], rtol=1e-10 if i < 4 else 1e-6, atol=1e-12)


def test_rk45_rejections_do_not_grow_the_next_step():
    """A stiff-ish start with a loose first guess forces rejections; the evaluation count still equals
    scipy's, which after a rejection never grows the step (a dropped rule changes the count)."""
    def stiff(y, t, rows):
        return -50.0 * (y - torch.cos(t)[:, None])

    y0 = torch.tensor([[0.0], [2.0]], dtype=f64)
    y, nfe = ode.solve_rk45(stiff, y0, 0.0, 1.0, rtol=1e-4, atol=1e-6)
    for i in range(2):
        ref = solve_ivp(lambda t, v: -50.0 * (v - math.cos(t)), (0.0, 1.0), y0[i].numpy(), method="RK45",
                        rtol=1e-4, atol=1e-6)
        assert int(nfe[i]) == ref.nfev
        np.testing.assert_allclose(y[i].numpy(), ref.y[:, -1], atol=1e-12)


def test_rk45_edge_cases():
    y, nfe = ode.solve_rk45(field, Y0, 0.7, 0.7)
    assert torch.equal(y, Y0) and nfe.tolist() == [0] * len(Y0) and y is not Y0
    const, nfe = ode.solve_rk45(lambda y, t, rows: torch.zeros_like(y), Y0, 0.0, 1.0)  # f == 0: scipy's h1 branch
    ref = solve_ivp(lambda t, v: np.zeros_like(v), (0.0, 1.0), Y0[0].numpy(), method="RK45", rtol=1e-5, atol=1e-5)
    assert torch.equal(const, Y0) and nfe.tolist() == [ref.nfev] * len(Y0)
    slow, nfe = ode.solve_rk45(lambda y, t, rows: 1e-9 * y, Y0[:3], 0.0, 1.0)  # scipy's h1 = (0.01/d)^(1/5)
    for i in range(3):
        ref = solve_ivp(lambda t, v: 1e-9 * v, (0.0, 1.0), Y0[i].numpy(), method="RK45", rtol=1e-5, atol=1e-5)
        assert int(nfe[i]) == ref.nfev and np.allclose(slow[i].numpy(), ref.y[:, -1], rtol=1e-14, atol=0)
    with pytest.raises(RuntimeError, match="did not reach t = 2.0 in 3 steps"):
        ode.solve_rk45(field, Y0, 0.0, 2.0, rtol=1e-9, atol=1e-9, max_steps=3)


def _one_step(method, z):
    """The stability polynomial R(z) of one step of y' = λy (z = hλ)."""
    return {"euler": 1 + z, "heun": 1 + z + z**2 / 2, "rk4": 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24}[method]


@pytest.mark.parametrize("method,per_step", [("euler", 1), ("heun", 2), ("rk4", 4)])
def test_fixed_steps_are_their_butcher_tableaux(method, per_step):
    """y' = λy over uneven times: y(t_n) = y0 · Π R(h_i λ) with each method's polynomial, and nfe = steps ×
    stages. A time-only field y' = 3t² + 1 checks the stage times: Heun is the trapezoid rule, RK4 (Simpson)
    is exact for it, Euler is the left Riemann sum."""
    lam = -1.3
    times = torch.tensor([1.0, 0.8, 0.35, 0.1], dtype=f64)
    y0 = torch.tensor([[1.0, -2.0, 0.5], [0.5, 4.0, -1.0]], dtype=f64)  # rows != dims
    seen = []

    def linear(y, t, rows):
        seen.append(rows.clone())
        return lam * y

    y, nfe = ode.solve_fixed(linear, y0, times, method)
    hs = (times[1:] - times[:-1]).tolist()
    expect = y0 * math.prod(_one_step(method, h * lam) for h in hs)
    torch.testing.assert_close(y, expect, rtol=1e-14, atol=0)
    assert nfe.dtype == torch.long and nfe.tolist() == [3 * per_step] * 2 and all(r.tolist() == [0, 1] for r in seen)
    if method == "heun":  # the default
        assert torch.equal(ode.solve_fixed(linear, y0, times)[0], y)

    y, _ = ode.solve_fixed(lambda y, t, rows: (3 * t**2 + 1)[:, None].expand_as(y), y0, times, method)
    t = times.tolist()
    pieces = {"euler": [(b - a) * (3 * a * a + 1) for a, b in zip(t, t[1:])],
              "heun": [(b - a) * (3 * a * a + 3 * b * b + 2) / 2 for a, b in zip(t, t[1:])],
              "rk4": [(b**3 + b) - (a**3 + a) for a, b in zip(t, t[1:])]}[method]
    torch.testing.assert_close(y, y0 + sum(pieces), rtol=1e-14, atol=1e-14)
    assert torch.equal(y0, torch.tensor([[1.0, -2.0, 0.5], [0.5, 4.0, -1.0]], dtype=f64))  # input not modified


def test_fixed_step_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="euler, heun or rk4, got 'rk2'"):
        ode.solve_fixed(field, Y0, torch.tensor([0.0, 1.0]), "rk2")
