"""How much the sigma grid decides at 10-20 NFE, on bench_samplers' Gaussian-mixture oracle (accuracy only).

    PYTHONPATH=. python bench/grid_sweep.py            # sigma_min sweep of the log-SNR grid (about a minute)
    PYTHONPATH=. python bench/grid_sweep.py --fit      # also fit a 10-NFE grid per sampler (a few minutes)

The sweep prints the rmse against the exact PF-ODE map for each ``sigma_min`` (sigma_max 80, EDM run). ``--fit``
does Nelder-Mead over the interior log-sigmas of a 10-NFE grid (start 80, end 0, kept below 80) on the first
``--pilots`` latents, from the log-SNR grid at sigma_min 0.06, and scores the other latents. The fit uses the
exact oracle. It is an experiment (docs/performance.md), not a difflab grid.
"""

from __future__ import annotations

import argparse

import bench_samplers as B
import numpy as np
import torch

from difflab.methods.gaussian import samplers as S

SAMPLERS = {"ipndm": {}, "unipc bh2 p3": {"order": 3, "variant": "bh2"}, "unipc bh1 p3": {"order": 3, "variant": "bh1"},
            "dpmpp_3m": {}, "deis": {}}


def _name(label: str) -> str:
    return label.split()[0]


def sweep(bench: B.Bench, nfes=(10, 20), smins=(0.002, 0.04, 0.06, 0.08, 0.12, 0.2)) -> None:
    edm = B.method("edm")
    print("| NFE | sigma_min | " + " | ".join(SAMPLERS) + " |")
    print("|---" * (2 + len(SAMPLERS)) + "|")
    for nfe in nfes:
        for smin in smins:
            cells = []
            for label, opts in SAMPLERS.items():
                rec = B.Recorder(bench.mix.denoise)
                sig = edm.sigma_grid(_name(label), nfe, grid="logsnr", sigma_min=smin)
                x = getattr(S, f"sample_{_name(label)}")(rec, bench.z, sig, bench.randn_like(), **opts)
                cells.append(f"{bench.score(rec, x, False)['rmse']:.2e}")
            print(f"| {nfe} | {smin:g} | " + " | ".join(cells) + " |", flush=True)


def fit(bench: B.Bench, pilots: int, nfe: int = 10) -> None:
    from scipy.optimize import minimize

    z = bench.z
    exact = bench.exact(z * 80.0, 80.0)
    top = np.log(79.9)

    def grid(logs: np.ndarray) -> torch.Tensor:
        inner = np.sort(np.minimum(logs, top))[::-1].copy()
        return torch.cat([torch.tensor([80.0], dtype=torch.float64), torch.exp(torch.from_numpy(inner)),
                          torch.zeros(1, dtype=torch.float64)])

    def rmse(logs: np.ndarray, label: str, rows: slice) -> float:
        rec = B.Recorder(bench.mix.denoise)
        x = getattr(S, f"sample_{_name(label)}")(rec, z[rows], grid(logs), None, **SAMPLERS[label])
        assert rec.calls == nfe
        return float(((x - exact[rows]) ** 2).mean().sqrt())

    start = np.log(np.geomspace(80, 0.06, nfe))[1:]
    held = slice(pilots, None)
    for label in ("ipndm", "dpmpp_3m", "unipc bh2 p3"):
        res = minimize(lambda v, label=label: rmse(v, label, slice(0, pilots)), start, method="Nelder-Mead",
                       options={"maxiter": 1500, "xatol": 1e-3, "fatol": 1e-6})
        print(f"- {label}: held-out rmse {rmse(start, label, held):.2e} (log-SNR, sigma_min 0.06) -> "
              f"{rmse(res.x, label, held):.2e} fitted (pilots {res.fun:.2e}); grid "
              f"{[round(float(s), 4) for s in grid(res.x)[1:-1]]}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--fit", action="store_true")
    p.add_argument("--pilots", type=int, default=300)
    args = p.parse_args()
    bench = B.Bench(args.n, 8, 0)
    sweep(bench)
    if args.fit:
        fit(bench, args.pilots)


if __name__ == "__main__":
    main()
