"""Discrete-time beta schedules, their sigma table and step subsequences (specs/gaussian_and_dddm.md §2.1,
§2.3, §2.5, §3).

All tables are float64 and 0-based: index ``i = t - 1`` ("index 0 means one step of noise"). A DDPM point
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n`` is the σ-framework point ``x = s (x0 + sigma n)`` with
``s = sqrt(abar)`` and ``sigma = sqrt((1 - abar) / abar)`` (§1), so the shared σ samplers apply.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from difflab.errors import UserError

SCHEDULE_ALIASES = {"l": "linear", "linear": "linear", "cos": "cosine", "cosine": "cosine",
                    "dns": "DNS", "dnst": "DNST"}


def schedule_name(name: str) -> str:
    """Canonical schedule name for ``l|linear|cos|cosine|DNS|DNST`` (case-insensitive)."""
    key = str(name).lower()
    if key not in SCHEDULE_ALIASES:
        raise UserError(f"--schedule {name!r} is unknown; choose one of l, linear, cos, cosine, DNS, DNST")
    return SCHEDULE_ALIASES[key]


def _scaled_bounds(low: float, high: float, num_timesteps: int) -> tuple[float, float]:
    """Scale (low, high) by 1000/T so any T keeps Ho's overall amount of noise (§2.1, §2.5)."""
    scale = 1000.0 / num_timesteps
    l, h = low * scale, high * scale
    if not (h > l >= 0):
        raise UserError(f"--schedule-low {low} / --schedule-high {high}: need 0 <= low < high")
    if h > 1:
        raise UserError(f"--schedule-high {high} x 1000/T = {h:.4g} exceeds 1; "
                        "lower it or raise --num-timesteps")
    return l, h


def cosine_alpha_bar_fn(u: np.ndarray | float, s: float = 0.008) -> np.ndarray:
    """iDDPM's ``f(u) = cos^2((u + s)/(1 + s) * pi/2)`` (§2.1); ``abar_t = f(t/T)/f(0)``."""
    return np.cos((np.asarray(u, dtype=np.float64) + s) / (1 + s) * math.pi / 2) ** 2


def get_betas(schedule: str = "linear", num_timesteps: int = 1000, low: float = 1e-4, high: float = 0.02,
              max_beta: float = 0.999) -> torch.Tensor:
    """Beta table ``[T]`` (float64) for the named schedule (§2.1, §2.5).

    * linear: ``linspace(l, h, T)`` with ``(l, h) = (low, high) * 1000/T``;
    * cosine: ``beta_i = min(1 - f((i+1)/T)/f(i/T), max_beta)`` (low/high unused);
    * DNS / DNST: ``beta_i = l + (h - l) ((i + off)/(T + 1 + off))^2`` with off = 5 / off = T.
    """
    T = int(num_timesteps)
    if T < 1:
        raise UserError(f"--num-timesteps must be >= 1, got {num_timesteps}")
    name = schedule_name(schedule)
    i = np.arange(T, dtype=np.float64)
    if name == "cosine":
        betas = 1 - cosine_alpha_bar_fn((i + 1) / T) / cosine_alpha_bar_fn(i / T)
        betas = np.minimum(betas, max_beta)
    else:
        l, h = _scaled_bounds(low, high, T)
        if name == "linear":
            betas = np.linspace(l, h, T, dtype=np.float64)
        else:
            off = 5.0 if name == "DNS" else float(T)
            betas = l + (h - l) * ((i + off) / (T + 1 + off)) ** 2
    return torch.from_numpy(betas)


def alpha_bar(betas: torch.Tensor) -> torch.Tensor:
    """``abar_i = prod_{j<=i} (1 - beta_j)`` (float64)."""
    return torch.cumprod(1 - betas.to(torch.float64), dim=0)


def sigmas_from_alpha_bar(abar: torch.Tensor) -> torch.Tensor:
    """The σ table ``sigma_i = sqrt((1 - abar_i)/abar_i)`` (§1; increasing in i)."""
    abar = abar.to(torch.float64)
    return ((1 - abar) / abar).sqrt()


def alpha_bar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`sigmas_from_alpha_bar`: ``abar = 1/(1 + sigma^2)``."""
    return 1 / (1 + sigma.to(torch.float64) ** 2)


# ---- respacing (§2.3) ---------------------------------------------------------------------------

def space_timesteps(num_timesteps: int, spec: str | int) -> list[int]:
    """Indices kept by improved-diffusion's ``timestep_respacing`` spec (§2.3).

    ``"N"`` or ``"a,b,c"``: split ``[0, T)`` into equal sections (the first ``T % n`` one longer) and take
    in each the given count evenly spaced, both ends included (``round(j (size-1)/(n-1))``).
    ``"ddimN"``: the first integer stride ``i`` with ``len(range(0, T, i)) == N``.
    """
    T = int(num_timesteps)
    spec = str(spec).strip()
    if spec.startswith("ddim"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise UserError(f"respacing {spec!r}: write ddimN with an integer N, e.g. ddim50") from None
        for stride in range(1, T + 1):
            if len(range(0, T, stride)) == n:
                return list(range(0, T, stride))
        raise UserError(f"respacing {spec!r}: no integer stride gives exactly {n} of {T} steps; "
                        "try another N")
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise UserError(f"respacing {spec!r}: use N, a,b,c or ddimN (integers)") from None
    sections = len(counts)
    size_per, extra = divmod(T, sections)
    kept: list[int] = []
    start = 0
    for k, n in enumerate(counts):
        size = size_per + (1 if k < extra else 0)
        if n < 1 or n > size:
            raise UserError(f"respacing {spec!r}: section {k} has {size} steps, cannot keep {n}")
        if n == 1:
            kept.append(start)
        else:
            stride = (size - 1) / (n - 1)
            kept.extend(start + round(j * stride) for j in range(n))
        start += size
    return sorted(set(kept))


def respace_betas(abar: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """Betas of the chain through the kept indices: ``beta'_k = 1 - abar_{K_k}/abar_{K_{k-1}}`` (abar = 1
    before the first kept index), so the new chain's abar equals the old one at every kept index (§2.3)."""
    a = abar.to(torch.float64)[torch.as_tensor(kept, dtype=torch.long)]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    return 1 - a / prev


def ddim_timesteps(num_timesteps: int, steps: int, skip: str = "uniform") -> list[int]:
    """DDIM's increasing index subsequence (§3): ``uniform`` = ``range(0, T, T // S)``;
    ``quad`` = ``int(linspace(0, sqrt(0.8 T), S)^2)`` (duplicates, possible for tiny T, are dropped)."""
    T, S = int(num_timesteps), int(steps)
    if not 1 <= S <= T:
        raise UserError(f"--steps {steps}: DDIM needs 1 <= steps <= num_timesteps ({T})")
    if skip == "uniform":
        return list(range(0, T, T // S))
    if skip == "quad":
        seq = (np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(np.int64)
        return sorted(set(int(s) for s in seq))
    raise UserError(f"--skip {skip!r}: choose uniform or quad")
