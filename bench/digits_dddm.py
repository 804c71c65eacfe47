"""DDDM on the digits: FID at K = 1, 2, 4, 8 fixed-point steps, and how varied the samples are.

Trains the `digits-dddm` preset (skipped when RUN already finished), scores 1000 samples per K against the
digits reference, and prints per K: FID, KID, the per-pixel standard deviation across samples (the digits
have 0.30 on the [0, 1] scale; a collapsed model gives ~0), and the mean distance of each sample to its
nearest digit and to the mean digit. Prints one markdown table (docs/methods/dddm.md "Measured results").

    python bench/digits_dddm.py --run runs/digits-dddm --ref runs/digits-table/digits-ref.npz

Run it alone (or with OMP_NUM_THREADS=1 beside other jobs): training is a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def difflab(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "difflab", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"difflab {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def probe(pipe, data: np.ndarray, n: int = 512) -> None:
    """What the trained ``f(x_T, N, xbar)`` depends on (docs/methods/dddm.md): mean squared differences."""
    import torch

    m = pipe.model
    g = torch.Generator().manual_seed(0)
    x0 = torch.from_numpy(data[:n].astype(np.float32) * 2 - 1).reshape(n, 1, 8, 8)
    with torch.no_grad():
        x_t, xbar, xbar2, x_t2 = (torch.randn(n, 1, 8, 8, generator=g) for _ in range(4))
        out = m.f(x_t, m.num_timesteps, xbar)
        rows = [("f vs its context xbar ~ N(0, I)", out, xbar),
                ("f vs x0, context = x0", m.f(x_t, m.num_timesteps, x0), x0),
                ("the same x_T, another xbar", out, m.f(x_t, m.num_timesteps, xbar2)),
                ("another x_T, the same xbar", out, m.f(x_t2, m.num_timesteps, xbar))]
    print(f"\nvariance of xbar {float(xbar.var()):.2f}, of the data {float(x0.var()):.2f}")
    for name, a, b in rows:
        print(f"| {name} | {float(((a - b) ** 2).mean()):.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/digits-dddm")
    ap.add_argument("--ref", default="runs/digits-table/digits-ref.npz")
    ap.add_argument("--steps", default="1,2,4,8")
    ap.add_argument("--num", type=int, default=1000)
    args = ap.parse_args()
    run, ref = Path(args.run), Path(args.ref)
    if not ref.exists():
        difflab("fid", "ref", "--data", "digits", "--dest", str(ref), "--features", "--no-progress")
    if not (run / "done").exists():
        difflab("train", "--preset", "digits-dddm", "--run-dir", str(run), "--no-progress")
        (run / "done").write_text("1\n")

    from sklearn.datasets import load_digits

    import difflab as dl

    data = load_digits().images.reshape(-1, 64) / 16.0  # [0, 1]
    pipe = dl.load(run)
    rows = []
    for k in [int(s) for s in args.steps.split(",")]:
        res = run / f"fid-steps{k}.json"
        if not res.exists():
            difflab("fid", "calc", "--network", str(run), "--ref", str(ref), "--num", str(args.num), "--metrics",
                    "fid,kid", "--opt", f"steps={k}", "--json", str(res), "--no-progress")
        scores = json.loads(res.read_text())
        x = pipe.sample(seeds=range(args.num), steps=k).reshape(args.num, -1).numpy().astype(np.float64) / 255.0
        nearest = np.sqrt(((x[:, None, :] - data[None]) ** 2).sum(-1)).min(1).mean()
        to_mean = np.sqrt(((x - data.mean(0)) ** 2).sum(-1)).mean()
        rows.append((k, scores["fid"], scores["kid"], x.std(0).mean(), nearest, to_mean))
        dl.save_grid(pipe.sample(seeds=range(64), steps=k), run / f"grid-steps{k}.png")
    print(f"\ndigits: per-pixel std {data.std(0).mean():.3f}, distance of a digit to the mean digit "
          f"{np.sqrt(((data - data.mean(0)) ** 2).sum(-1)).mean():.3f}")
    probe(pipe, data)
    print("\n| K (NFE) | FID | KID | per-pixel std | distance to nearest digit | distance to mean digit |")
    print("|---|---|---|---|---|---|")
    for k, fid, kid, std, nearest, to_mean in rows:
        print(f"| {k} | {fid:.2f} | {kid:.4f} | {std:.3f} | {nearest:.3f} | {to_mean:.3f} |")


if __name__ == "__main__":
    main()
