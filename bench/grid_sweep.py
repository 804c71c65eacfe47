"""How much the sigma grid decides at 10-20 NFE, on bench_samplers' Gaussian-mixture oracle (accuracy only).

    PYTHONPATH=. python bench/grid_sweep.py            # sigma_min sweep of the log-SNR grid (about a minute)

The sweep prints the rmse against the exact PF-ODE map for each ``sigma_min`` (sigma_max 80, EDM run). Fitted grids
(``difflab fit-grid``) are scored in bench_samplers.py, next to diffusers.
"""

from __future__ import annotations

import argparse

import bench_samplers as B

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000)
    args = p.parse_args()
    bench = B.Bench(args.n, 8, 0)
    sweep(bench)


if __name__ == "__main__":
    main()
