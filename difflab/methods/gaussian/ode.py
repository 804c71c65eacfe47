"""ODE integrators shared by the probability-flow sampler and the likelihood (specs/gaussian_and_dddm.md
§4.5, §4.6): an adaptive Dormand-Prince RK45 with a step size of its own for every row, and fixed-step
Euler / Heun / RK4.

Score SDE integrates a whole batch with scipy's ``solve_ivp``, whose error norm mixes all images, so an
image's result depends on its batch-mates. Here each row ``y[i]`` has its own time, step size and error
control (scipy's rules: RMS norm, safety 0.9, factors in [0.2, 10], no growth right after a rejection,
scipy's initial-step heuristic), so a row's trajectory depends on that row alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor
Field = Callable[[Tensor, Tensor, Tensor], Tensor]  # f(y [n, D], t [n], rows [n]) -> dy/dt [n, D]

# Dormand & Prince (1980) RK5(4)7M tableau, as scipy.integrate.RK45.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0


def _rms(x: Tensor) -> Tensor:
    return x.pow(2).mean(dim=1).sqrt()


def solve_rk45(f: Field, y0: Tensor, t0: float, t1: float, rtol: float = 1e-5, atol: float = 1e-5,
               max_steps: int = 100_000) -> tuple[Tensor, Tensor]:
    """Integrate ``dy/dt = f(y, t, rows)`` from ``t0`` to ``t1`` for every row of ``y0`` ``[n, D]``; ``f`` gets the
    indices ``rows`` of the rows it is given (the still-active ones), so per-row data can follow them.

    Returns ``(y(t1), nfe)`` with ``nfe`` ``[n]`` the number of evaluations of ``f`` each row needed.
    """
    y = y0.clone()
    n = y.shape[0]
    direction = 1.0 if t1 >= t0 else -1.0
    t = torch.full((n,), float(t0), dtype=y.dtype, device=y.device)
    nfe = torch.zeros(n, dtype=torch.long)
    if t0 == t1 or n == 0:
        return y, nfe
    span = abs(t1 - t0)

    # scipy's select_initial_step (error order 4)
    every = torch.arange(n)
    fy = f(y, t, every)
    nfe += 1
    scale = atol + y.abs() * rtol
    d0, d1 = _rms(y / scale), _rms(fy / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1).clamp(max=span)
    y1 = y + direction * h0[:, None] * fy
    f1 = f(y1, t + direction * h0, every)
    nfe += 1
    d2 = _rms((f1 - fy) / scale) / h0
    big = torch.maximum(d1, d2)
    h1 = torch.where(big <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3), (0.01 / big) ** (1 / 5))
    h = torch.minimum(100 * h0, h1)

    active = torch.ones(n, dtype=torch.bool)
    rejected = torch.zeros(n, dtype=torch.bool)
    for _ in range(max_steps):
        idx = active.nonzero().flatten()
        if len(idx) == 0:
            break
        ya, ta, fa, ha = y[idx], t[idx], fy[idx], h[idx]
        remaining = (t1 - ta) * direction
        ha = torch.minimum(ha, remaining)
        hd = (ha * direction)[:, None]
        K = [fa]
        for s in range(1, 6):
            dy = sum(a * k for a, k in zip(_A[s], K))
            K.append(f(ya + hd * dy, ta + hd[:, 0] * _C[s], idx))
        y_new = ya + hd * sum(b * k for b, k in zip(_B, K))
        f_new = f(y_new, ta + hd[:, 0], idx)
        K.append(f_new)
        nfe[idx.cpu()] += 6
        err = hd * sum(e * k for e, k in zip(_E, K))
        scale = atol + torch.maximum(ya.abs(), y_new.abs()) * rtol
        norm = _rms(err / scale)
        accept = norm < 1
        safe = torch.where(norm == 0, torch.full_like(norm, MAX_FACTOR), SAFETY * norm.clamp(min=1e-300) ** -0.2)
        grow = safe.clamp(max=MAX_FACTOR)
        grow = torch.where(rejected[idx].to(grow.device), grow.clamp(max=1.0), grow)
        shrink = safe.clamp(min=MIN_FACTOR)
        h_next = torch.where(accept, ha * grow, ha * shrink)
        # accepted rows move on
        acc = accept.cpu()
        ii = idx[acc]
        y[ii], t[ii], fy[ii] = y_new[accept], (ta + hd[:, 0])[accept], f_new[accept]
        h[idx] = h_next
        rejected[idx] = ~acc
        reached = ((t1 - t) * direction <= 1e-12 * max(span, 1.0)).cpu()
        active &= ~reached
    else:
        raise RuntimeError(f"RK45 did not reach t = {t1} in {max_steps} steps")
    return y, nfe


def solve_fixed(f: Field, y0: Tensor, times: Tensor, method: str = "heun") -> tuple[Tensor, Tensor]:
    """Fixed steps along ``times`` (``euler``, ``heun`` or ``rk4``); returns ``(y, nfe)``."""
    if method not in ("euler", "heun", "rk4"):
        raise ValueError(f"fixed-step method must be euler, heun or rk4, got {method!r}")
    y = y0.clone()
    n = y.shape[0]
    ones = torch.ones(n, dtype=y.dtype, device=y.device)
    rows = torch.arange(n)
    f0 = f
    f = lambda y, t: f0(y, t, rows)  # noqa: E731
    nfe = 0
    for i in range(len(times) - 1):
        t, tn = float(times[i]), float(times[i + 1])
        h = tn - t
        k1 = f(y, t * ones)
        if method == "euler":
            y, nfe = y + h * k1, nfe + 1
        elif method == "heun":
            k2 = f(y + h * k1, tn * ones)
            y, nfe = y + h * (k1 + k2) / 2, nfe + 2
        else:
            k2 = f(y + h / 2 * k1, (t + h / 2) * ones)
            k3 = f(y + h / 2 * k2, (t + h / 2) * ones)
            k4 = f(y + h * k3, tn * ones)
            y, nfe = y + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6, nfe + 4
    return y, torch.full((n,), nfe, dtype=torch.long)
