"""FID against NFE for several samplers on one trained run (issue 11 item 2); accuracy, not speed.

    python -m difflab train --preset digits-quick --run-dir /tmp/dq --no-progress
    python -m difflab fid ref --data digits --dest /tmp/digits.npz --features
    python bench/fid_vs_nfe.py --network /tmp/dq --ref /tmp/digits.npz --num 1000 \
        --results /tmp/fid_nfe.json --plot docs/img/fid_vs_nfe.png

Each (sampler, NFE) point is one ``difflab fid calc --network`` run (seeds 0..num-1, every sampler on the same
seeds). ``NAME:GRID`` in ``--samplers`` samples on that ``--grid``: ``ipndm:fitted`` uses the grid ``difflab
fit-grid --sampler ipndm --steps N`` stored in the run. Results go to ``--results`` as they come, so a rerun skips
the points already measured; ``--plot`` draws FID vs NFE (needs matplotlib, the ``bench`` extra) and the table is
printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# NFE of ``steps`` for each sampler (sigma grid ending with 0): Heun and DPM-Solver++(2S) skip the second
# evaluation on the last step
NFE = {"heun": lambda n: 2 * n - 1, "dpmpp_2s": lambda n: 2 * n - 1}
SAMPLERS = ("heun", "euler", "ddim", "dpmpp_2m", "unipc", "dpmpp_sde")


def steps_for(sampler: str, nfe: int) -> int:
    """The step count whose NFE is closest to ``nfe`` (not above it for two-evaluation samplers)."""
    if sampler in NFE:
        return max(1, (nfe + 1) // 2)
    return nfe


def nfe_of(sampler: str, steps: int) -> int:
    return NFE.get(sampler, lambda n: n)(steps)


def measure(network: str, ref: str, num: int, label: str, steps: int) -> float:
    sampler, _, grid = label.partition(":")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "fid.json")
        cmd = [sys.executable, "-m", "difflab", "fid", "calc", "--network", network, "--ref", ref, "--num", str(num),
               "--metrics", "fid", "--opt", f"sampler={json.dumps(sampler)}", "--opt", f"steps={steps}",
               "--json", out, "--no-progress"] + (["--opt", f"grid={json.dumps(grid)}"] if grid else [])
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return float(json.load(f)["fid"])


def labels(results: dict) -> list[str]:
    """The samplers measured, in order of first measurement."""
    return list(dict.fromkeys(v["sampler"] for v in results.values()))


def table(results: dict) -> str:
    rows = ["| sampler | " + " | ".join(f"NFE {k}" for k in ("~5", "~10", "~20", "~35")) + " |",
            "|---" * 5 + "|"]
    for sampler in labels(results):
        pts = sorted((v["nfe"], v["fid"]) for k, v in results.items() if v["sampler"] == sampler)
        cells = []
        for target in (5, 10, 20, 35):
            hit = [f"{fid:.2f} ({nfe})" for nfe, fid in pts if abs(nfe - target) <= 1]
            cells.append(hit[0] if hit else "—")
        rows.append(f"| {sampler} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for sampler in labels(results):
        pts = sorted((v["nfe"], v["fid"]) for v in results.values() if v["sampler"] == sampler)
        ax.plot(*zip(*pts), marker="o", label=sampler, linestyle="--" if ":" in sampler else "-")
    ax.set_xlabel("NFE (network evaluations per image)")
    nums = sorted({v.get("num") for v in results.values()} - {None})
    ax.set_ylabel(f"FID ({', '.join(map(str, nums)) or '?'} samples)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--nfe", default="10,20,5,35", help="target NFEs, measured in this order")
    p.add_argument("--results", default="fid_vs_nfe.json")
    p.add_argument("--plot", help="PNG path")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--title", help="plot title (default: the run directory's name)")
    args = p.parse_args()
    results = json.load(open(args.results)) if os.path.exists(args.results) else {}
    if not args.plot_only:
        for nfe in (int(v) for v in args.nfe.split(",")):
            for sampler in args.samplers.split(","):
                steps = steps_for(sampler.partition(":")[0], nfe)
                key = f"{sampler}@{steps}"
                if key in results:
                    continue
                fid = measure(args.network, args.ref, args.num, sampler, steps)
                results[key] = {"sampler": sampler, "steps": steps, "nfe": nfe_of(sampler.partition(":")[0], steps),
                                "fid": fid, "num": args.num}
                print(f"{sampler:14s} steps {steps:3d} NFE {results[key]['nfe']:3d}  FID {fid:8.3f}", flush=True)
                tmp = args.results + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(results, f, indent=1)
                os.replace(tmp, args.results)
    print(table(results))
    if args.plot:
        plot(results, args.plot, f"FID vs NFE, {args.title or os.path.basename(os.path.normpath(args.network))}")


if __name__ == "__main__":
    main()
