"""The Beta forward process in logit space (specs/beta_sdd.md §2, §3, §4.1, §6).

Pure functions over tensors: the sigmoid logit-alpha schedule, exact log-space Gamma draws fed by a
:class:`~difflab.rng.StackedRandomGenerator`, the logit-space reverse update and the analytic
standardisation of the noisy logit. Nothing here knows about networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difflab.rng import StackedRandomGenerator


def calc_dtype(device: torch.device) -> torch.dtype:
    """float64 wherever the device has it (MPS does not): the spec's precision-critical maths."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


# ---- schedule (§3, §6) ----------------------------------------------------------------------
def logit_alpha(
    t: torch.Tensor, sigmoid_start: float, sigmoid_end: float, sigmoid_power: float
) -> torch.Tensor:
    """``logit alpha(t) = c0 + (c1 - c0) t^p`` (§3); decreasing from ``c0`` at t=0 to ``c1`` at t=1."""
    return sigmoid_start + (sigmoid_end - sigmoid_start) * t**sigmoid_power


def alpha_gap(logit_hi: torch.Tensor, logit_lo: torch.Tensor) -> torch.Tensor:
    """``alpha_hi - alpha_lo`` from two logits without cancellation (§3 computes it in float64).

    ``sigma(a) - sigma(b) = sigma(a) sigma(-b) (1 - e^(b - a))``; exact also for ``a = +inf``.
    """
    return torch.sigmoid(logit_hi) * torch.sigmoid(-logit_lo) * -torch.expm1(logit_lo - logit_hi)


def sampler_logit_grid(
    steps: int, sigmoid_start: float, sigmoid_end: float, sigmoid_power: float, grid: str = "auto",
    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``logit alpha_j``, j = 0..N, increasing (noise -> data) (§6 "Time grid").

    ``grid="alpha"``: geometric in alpha, ``alpha_j = sigma(c1)^((N - j)/N)``, so ``alpha_N = 1``
    (logit +inf, never fed to the network). ``grid="t"``: ``t_i = 1 - i(1 - 1e-5)/(N - 1)`` plus
    ``t_N = 0``. ``"auto"`` is the reference's choice: alpha grid for N <= 350, else t grid.
    """
    if grid == "auto":
        grid = "alpha" if steps <= 350 else "t"
    if grid == "alpha":
        log_alpha_min = F.logsigmoid(torch.tensor(sigmoid_end, dtype=torch.float64))
        j = torch.arange(steps + 1, dtype=torch.float64)
        log_alpha = (steps - j) / steps * log_alpha_min
        # logit = log(alpha) - log(1 - alpha); the last entry is log(1) - log(0) = +inf.
        logits = log_alpha - torch.log(-torch.expm1(log_alpha))
    elif grid == "t":
        if steps < 2:
            raise ValueError("the t grid needs at least 2 steps")
        i = torch.arange(steps, dtype=torch.float64)
        t = torch.cat([1 - i * (1 - 1e-5) / (steps - 1), torch.zeros(1, dtype=torch.float64)])
        logits = logit_alpha(t, sigmoid_start, sigmoid_end, sigmoid_power)
    else:
        raise ValueError(f"unknown grid {grid!r}")
    return logits.to(device=device, dtype=dtype)


# ---- exact log-space Gamma draws (§6 "Numerics") ---------------------------------------------
def _marsaglia_tsang_log(
    d: torch.Tensor, n: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Marsaglia-Tsang for shape ``d + 1/3 >= 1``: ``ln G`` of candidate (n normal, u uniform) and
    whether it is accepted (exact test ``ln u < n^2/2 + d - d v + d ln v``, ``v = (1 + n/sqrt(9d))^3``)."""
    w = 1 + n / torch.sqrt(9 * d)
    ok = w > 0
    log_v = 3 * torch.log(torch.where(ok, w, torch.ones_like(w)))
    accept = ok & (torch.log(u) < 0.5 * n * n + d - d * torch.exp(log_v) + d * log_v)
    return torch.log(d) + log_v, accept


def log_gamma(rng: StackedRandomGenerator, shape_param: torch.Tensor, precise: bool = True) -> torch.Tensor:
    """``ln G`` with ``G ~ Gamma(shape_param, rate 1)``, element-wise, never underflowing (§6).

    Marsaglia-Tsang on ``a' = a + 1`` when ``a < 1`` and the exact boost
    ``ln G(a) = ln G(a + 1) + ln(U)/a``, all in log space, so tiny shapes (1e-4) give large negative
    but finite values instead of a floored ``ln(tiny)``. Row k of ``shape_param`` draws only from
    generator k of ``rng``: two candidates per element, then the rejected elements of each row are
    redrawn from that row's generator alone, so a row's stream never depends on its batch-mates.
    ``precise=False`` works in float32 (for Monte-Carlo estimates that do not need float64).
    """
    if shape_param.shape[0] != len(rng):
        raise ValueError(f"first dimension {shape_param.shape[0]} != number of seeds {len(rng)}")
    dtype = shape_param.dtype
    wdtype = calc_dtype(shape_param.device) if precise else torch.float32
    a = shape_param.to(wdtype)
    boost = a < 1
    d = torch.where(boost, a + 1, a) - 1 / 3
    # Two candidates per element up front: acceptance is >= 0.95 each, so only ~0.25% of the
    # elements (and few rows) need the slower per-row retry below.
    pair = (a.shape[0], 2) + tuple(a.shape[1:])
    n = rng.randn(pair, dtype=wdtype)
    u = rng.rand(pair, dtype=wdtype)
    u_boost = rng.rand(a.shape, dtype=wdtype)
    lg, ok = _marsaglia_tsang_log(d.unsqueeze(1), n, u)
    out = torch.where(ok[:, 0], lg[:, 0], lg[:, 1])
    accept = ok[:, 0] | ok[:, 1]
    n_rows = a.shape[0]
    out, accept, d_flat = out.reshape(n_rows, -1), accept.reshape(n_rows, -1), d.reshape(n_rows, -1)
    while not bool(accept.all()):
        rows, cols = torch.nonzero(~accept, as_tuple=True)  # row-major, so grouped by row
        counts = torch.bincount(rows, minlength=n_rows).tolist()
        draws_n, draws_u = [], []
        for r, k in enumerate(counts):
            if k:
                g = rng.generators[r]
                draws_n.append(torch.randn(k, generator=g, dtype=torch.float64))
                draws_u.append(torch.rand(k, generator=g, dtype=torch.float64))
        n_r = torch.cat(draws_n).to(device=a.device, dtype=wdtype)
        u_r = torch.cat(draws_u).to(device=a.device, dtype=wdtype)
        lg, ok = _marsaglia_tsang_log(d_flat[rows, cols], n_r, u_r)
        out[rows, cols] = torch.where(ok, lg, out[rows, cols])
        accept[rows, cols] = ok
    out = out.reshape(a.shape)
    # 1 - U lies in (0, 1], so the boost term is finite for any positive shape.
    out = torch.where(boost, out + torch.log1p(-u_boost) / a, out)
    return out.to(dtype)


def log_beta_logit(rng: StackedRandomGenerator, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``logit`` of a ``Beta(a, b)`` draw as ``ln G(a) - ln G(b)`` (§2 "Logit / Gamma representation")."""
    return log_gamma(rng, a) - log_gamma(rng, b)


def reverse_logit_update(ell_t: torch.Tensor, ell_p: torch.Tensor) -> torch.Tensor:
    """``logit(z_t + (1 - z_t) p) = LSE(l_t, l_p, l_t + l_p)`` (§2 "Logit form of the reverse step")."""
    return torch.logsumexp(torch.stack([ell_t, ell_p, ell_t + ell_p]), dim=0)


# ---- analytic standardisation of the noisy logit (§4.1) ----------------------------------------
def logit_moments(
    logit_alpha_t: torch.Tensor, eta: float, shift: float, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of ``l_t`` assuming ``x0 ~ U[shift, shift + scale]`` (§4.1), element-wise in alpha.

    The mean is exact; the std follows the reference formula (it omits the covariance term of the
    law of total variance, see the caveat in §4.1) because it is only a normaliser.
    """
    lg, dg = torch.lgamma, torch.digamma
    alpha = torch.sigmoid(logit_alpha_t)
    k = eta * alpha
    xmin, xmax = shift, shift + scale
    ks = k * scale
    e1 = (lg(k * xmax) - lg(k * xmin)) / ks
    e2 = (lg(eta - k * xmin) - lg(eta - k * xmax)) / ks
    v1 = (dg(k * xmax) - dg(k * xmin)) / ks
    v2 = (dg(eta - k * xmin) - dg(eta - k * xmax)) / ks
    g = xmin + scale * torch.arange(101, dtype=k.dtype, device=k.device) / 100
    w = torch.ones(101, dtype=k.dtype, device=k.device)
    w[0] = w[-1] = 0.5
    kg = k.unsqueeze(-1) * g
    m1 = (dg(kg) ** 2 * w).sum(-1) / 100
    m2 = (dg(eta - kg) ** 2 * w).sum(-1) / 100
    v3 = (m1 - e1**2).clamp(min=0)
    v4 = (m2 - e2**2).clamp(min=0)
    return e1 - e2, torch.sqrt(v1 + v2 + v3 + v4)


def smoothness_factor(ell: torch.Tensor, smooth_lambda: float) -> torch.Tensor:
    """SDD's rescaling factor ``m = mean_pixels exp(lambda sum_c (l_{c+1} - l_c)^2)`` (§4.1), one per
    example (shape [N,1,1,1]); 1 for single-channel data. The exponent is capped at 50 so a freak
    logit can never overflow ``m`` to inf."""
    if ell.shape[1] < 2 or smooth_lambda == 0:
        return torch.ones(ell.shape[0], 1, 1, 1, dtype=ell.dtype, device=ell.device)
    s = (ell[:, 1:] - ell[:, :-1]).square().sum(dim=1)
    return torch.exp((smooth_lambda * s).clamp(max=50)).mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
