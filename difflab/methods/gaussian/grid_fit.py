"""Fitted sigma grids (docs/samplers.md "Fitted grids"): the sigma grid of a few-step sampler chosen for one
model, in the spirit of Align Your Steps (Sabour et al. 2024, arXiv 2404.14507).

At 10 NFE the grid decides more than the solver. :func:`fit_sigmas` chooses the levels of an ``N``-level grid
(``sigma_max`` fixed, then ``N - 1`` free levels down to ``sigma_min``, then 0) to minimise the root-mean-square error
of the sampler's output against a reference: for a model, the model's own probability-flow ODE solved tightly
(:func:`~difflab.methods.gaussian.samplers.sample_adaptive`) from the same pilot latents. The search is
Nelder-Mead over the log-sigma gaps (derivative-free: the samplers read the grid as floats). AYS minimises a KL
upper bound of the SDE; this fits the deterministic map the ODE samplers approximate, which is what they are
scored on (bench/bench_samplers.py). :func:`fit_grid` runs it for a Gaussian run and reports the held-out
error of the default grid and of the fitted one; ``difflab fit-grid`` stores the result in the run's
``grids.json``, which ``--grid fitted`` reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab.errors import UserError
from difflab.methods.gaussian import samplers as S

Tensor = torch.Tensor
f64 = torch.float64
GRIDS_FILE = "grids.json"  # beside the run's checkpoints
# deterministic sigma-grid samplers (an ODE map to fit); the stochastic ones have no per-latent target
FITTABLE = ("heun", "euler", "dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "unipc", "ipndm", "deis")


def grid_from_weights(p: np.ndarray, sigma_max: float, sigma_min: float) -> Tensor:
    """The search's point ``p`` (``N`` reals) as an ``N``-level grid: ``w = softmax(p)`` splits the log-sigma range
    ``[ln sigma_min, ln sigma_max]`` into ``N`` gaps; the levels are ``sigma_max`` and the ends of the first
    ``N - 1`` gaps (the last gap runs down to ``sigma_min``), then 0. Every gap is positive, so the grid is
    strictly decreasing inside ``[sigma_min, sigma_max]`` for every ``p``, without clipping (a clipped search
    parks levels on a bound, where they cost an NFE and do nothing)."""
    p = np.asarray(p, dtype=np.float64)
    w = np.exp(p - p.max())
    w /= w.sum()
    top, span = math.log(sigma_max), math.log(sigma_max) - math.log(sigma_min)
    levels = np.exp(top - span * np.concatenate([[0.0], np.cumsum(w)[:-1]]))
    levels[0] = sigma_max  # exactly (exp(ln 80) is 80 - 3e-14)
    return torch.cat([torch.from_numpy(levels), torch.zeros(1, dtype=f64)])


def weights_of(grid: Tensor, sigma_min: float) -> np.ndarray:
    """The inverse of :func:`grid_from_weights` for a grid whose last level is ``>= sigma_min`` (a gap of 0 is
    taken as 1e-9 of the range)."""
    levels = grid[grid > 0].log().numpy()
    gaps = np.append(-np.diff(levels), levels[-1] - math.log(sigma_min))
    return np.log(np.maximum(gaps / (levels[0] - math.log(sigma_min)), 1e-9))


def rmse(x: Tensor, reference: Tensor) -> float:
    """The fit's loss: root-mean-square over every element of the batch."""
    return float((x.to(f64) - reference.to(f64)).square().mean().sqrt())


def fit_sigmas(run: Callable[[Tensor], Tensor], reference: Tensor, init: Tensor, sigma_min: float,
               max_evals: int = 500, callback: Callable[[float], None] | None = None) -> tuple[Tensor, float, float]:
    """Nelder-Mead over the levels of ``init`` (decreasing, ending with 0; its first level, sigma_max, is kept;
    parameterised by :func:`grid_from_weights` on ``[sigma_min, sigma_max]``) minimising
    ``rmse(run(grid), reference)``. ``run`` maps a grid to the sampler's output on the pilot latents;
    ``callback`` gets the best loss after every evaluation. Returns ``(grid, initial loss, fitted loss)``; the
    fitted grid is never worse than ``init`` on the pilots."""
    from scipy.optimize import minimize

    init = S._grid(init)
    sigma_max = float(init[0])
    first = rmse(run(init), reference)
    best = [first, init]

    def loss(p: np.ndarray) -> float:
        grid = grid_from_weights(p, sigma_max, sigma_min)
        value = rmse(run(grid), reference)
        if not math.isfinite(value):
            value = math.inf
        if value < best[0]:
            best[:] = [value, grid]
        if callback is not None:
            callback(best[0])
        return value

    if len(init) > 2 and max_evals > 0:
        minimize(loss, weights_of(init, sigma_min), method="Nelder-Mead",
                 options={"maxfev": int(max_evals), "xatol": 1e-4, "fatol": 1e-9 * max(first, 1e-30)})
    return best[1], first, best[0]


def fit_grid(model, sampler: str, steps: int, pilots: int = 64, holdout: int = 64, seed: int = 0,
             rtol: float = 1e-5, max_evals: int = 500, sigma_min: float | None = None,
             sigma_max: float | None = None, progress: bool = True, **options: Any) -> dict[str, Any]:
    """Fit ``sampler``'s ``steps``-level grid to ``model`` (a Gaussian method): pilot latents of seeds
    ``seed .. seed + pilots - 1`` (the held-out ones follow), the reference is the adaptive solve at ``rtol``
    from ``sigma_max`` down to ``sigma_min`` (the default grid's ends), the start is the default (Karras) grid.
    Returns the ``grids.json`` entry: the grid, the held-out rmse of the default and of the fitted grid."""
    from difflab import distributed as dist
    from difflab.rng import StackedRandomGenerator

    if not hasattr(model, "fitted_grids"):  # a GaussianMethod (not imported: base imports this module)
        raise UserError(f"fit-grid: a {model.name} run has no sigma grid to fit (Gaussian runs only)")
    sampler = sampler.replace("-", "_")
    if sampler not in FITTABLE:
        raise UserError(f"fit-grid --sampler {sampler}: fit the grid of a deterministic sampler, one of "
                        f"{', '.join(FITTABLE)}")
    if float(options.get("S_churn") or 0) > 0:
        raise UserError("fit-grid: S_churn > 0 makes heun/euler stochastic; fit with S_churn 0")
    wrong = sorted(set(options) - set(S.SAMPLER_OPTIONS[sampler]))
    if wrong:
        raise UserError(f"fit-grid: option(s) {wrong} are not --sampler {sampler}'s; it takes: "
                        f"{', '.join(S.SAMPLER_OPTIONS[sampler]) or 'none'}")
    for name, value in (("--steps", steps), ("--pilots", pilots), ("--holdout", holdout)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} {value}: must be a positive integer")
    grid_kw = {k: v for k, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)) if v is not None}
    init = model.sigma_grid(sampler, steps, grid="karras", **grid_kw)
    lo = float(init[-2])
    device = next(model.net.parameters()).device
    rng = StackedRandomGenerator(device, list(range(seed, seed + pilots + holdout)))
    latents = rng.randn([pilots + holdout, *model.shape], dtype=S.work_dtype(device))
    labels = model.draw_labels(rng, None)
    denoiser = model.rows_denoiser(labels, float(model.sampler_defaults().get("guidance", 1.0)))
    fn = getattr(S, f"sample_{sampler}")
    fit_rows, held_rows = slice(0, pilots), slice(pilots, None)

    def runner(rows: slice) -> Callable[[Tensor], Tensor]:
        D, z = denoiser(rows), latents[rows]
        return lambda grid: fn(D, z, model.explicit_grid(grid[:-1].tolist()), None, **options)  # as sampled

    info: dict[str, Any] = {}
    with torch.no_grad():
        reference = S.sample_adaptive(denoiser(), latents, init, rtol=rtol, atol=rtol, info=info,
                                      denoise_rows=None if labels is None else denoiser)
        run_held = runner(held_rows)
        bar = dist.progress(max_evals, f"fit-grid {sampler} {steps}", unit="eval", enabled=progress)
        try:
            grid, _, pilot_loss = fit_sigmas(runner(fit_rows), reference[fit_rows], init, lo, max_evals,
                                             callback=lambda best: (bar.update(1), bar.set_postfix(rmse=f"{best:.2e}")))
        finally:
            bar.close()
        held_default = rmse(run_held(init), reference[held_rows])
        held_fitted = rmse(run_held(grid), reference[held_rows])
    return {"sampler": sampler, "steps": int(steps), "sigmas": [float(s) for s in grid[:-1]],
            "options": dict(options), "pilots": pilots, "holdout": holdout, "seed": seed, "max_evals": max_evals,
            "reference": {"sampler": "adaptive", "rtol": rtol, "atol": rtol, "nfe": info.get("nfe")},
            "rmse": {"pilots_fitted": pilot_loss, "holdout_default": held_default, "holdout_fitted": held_fitted}}


# ---- grids.json: the run's fitted grids ------------------------------------------------------------------

def key(sampler: str, steps: int) -> str:
    return f"{sampler}-{int(steps)}"


def read_grids(run_dir: str | Path) -> dict[str, Any]:
    """The fitted grids stored in ``run_dir`` (empty without ``grids.json``); a one-line error if unreadable."""
    path = Path(run_dir) / GRIDS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); delete it and run difflab fit-grid again") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "sigmas" in v for v in data.values()):
        raise UserError(f"{path}: not a difflab grids file; delete it and run difflab fit-grid again")
    return data


def store_grid(run_dir: str | Path, entry: dict[str, Any]) -> Path:
    """Add (or replace) ``entry`` in ``run_dir/grids.json``, atomically; the other grids are kept."""
    from difflab.runio import atomic_write_text

    grids = read_grids(run_dir)
    grids[key(entry["sampler"], entry["steps"])] = entry
    path = Path(run_dir) / GRIDS_FILE
    atomic_write_text(path, json.dumps(grids, indent=2) + "\n")
    return path

