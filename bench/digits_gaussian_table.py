"""Every Gaussian method on the digits at one budget: FID (vs the 1797 digits), KID and bits/dim.

Trains each method on digits-quick's 1.2M-parameter DDPM++ network for the same 80 kimg (skipping runs that
already finished), then scores 1000 samples with Heun (18 steps, NFE 35: the same sampler for every method)
and with the method's own default sampler, and the probability-flow ODE bits/dim of 256 digits (plus the
variational bound for DDPM). Prints one markdown table (docs/methods/score_sde.md "Digits results").

    python bench/digits_gaussian_table.py --root runs/digits-table [--methods edm,sde-ve] [--num 1000]

Slow on a CPU (a few minutes per method for training, more for scoring); run it alone, with
OMP_NUM_THREADS=1 if other jobs share the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

METHODS = {  # name -> extra `difflab train` arguments on top of the digits-quick preset
    "edm": ["--preset", "digits-quick"],
    "vp": ["--preset", "digits-quick", "--method", "vp"],
    "ve": ["--preset", "digits-quick", "--method", "ve"],
    "iddpm": ["--preset", "digits-quick", "--method", "iddpm"],
    "ddpm": ["--preset", "digits-quick", "--method", "ddpm"],
    "sde-ve": ["--preset", "digits-sde"],
    "sde-vp": ["--preset", "digits-sde", "--method", "sde-vp"],
    "sde-subvp": ["--preset", "digits-sde", "--method", "sde-subvp"],
}


def difflab(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "difflab", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"difflab {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def fid(run: Path, ref: Path, num: int, opts: list[str]) -> dict:
    res = run / f"fid-{'-'.join(o.replace('=', '') for o in opts) or 'default'}.json"
    if not res.exists():
        args = ["fid", "calc", "--network", str(run), "--ref", str(ref), "--num", str(num), "--metrics", "fid,kid",
                "--json", str(res), "--no-progress"]
        for o in opts:
            args += ["--opt", o]
        t = time.time()
        difflab(*args)
        data = json.loads(res.read_text())
        data["seconds"] = time.time() - t
        res.write_text(json.dumps(data))
    return json.loads(res.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/digits-table")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--nll-num", type=int, default=256)
    ap.add_argument("--skip-own", default="", help="methods whose own-sampler FID is not computed (e.g. the "
                    "score-SDE runs' 500-step predictor-corrector: 1000 NFE per image)")
    args = ap.parse_args()
    root = Path(args.root)
    ref = root / "digits-ref.npz"
    if not ref.exists():
        difflab("fid", "ref", "--data", "digits", "--dest", str(ref), "--features", "--no-progress")
    rows = []
    for name in args.methods.split(","):
        run = root / name
        t = time.time()
        if not (run / "done").exists():
            difflab("train", *METHODS[name], "--run-dir", str(run), "--no-progress")
            (run / "done").write_text(f"{time.time() - t:.0f}\n")
        train_s = float((run / "done").read_text())
        heun = fid(run, ref, args.num, ["sampler=heun", "steps=18"])
        smp = json.loads((run / "training_options.json").read_text())["sampler"]
        same = smp.get("sampler") == "heun" and smp.get("steps") == 18 and len(smp) == 2
        # the run's default is Heun-18: one FID serves both
        skip = name in args.skip_own.split(",")
        own = heun if same else None if skip else fid(run, ref, args.num, [])
        nll_file = run / "nll.txt"
        if not nll_file.exists():
            nll_file.write_text(difflab("nll", "--network", str(run), "--num", str(args.nll_num), "--no-progress"))
        bpd = {line.split(":")[0].split("(")[1].split(")")[0]: line.split(":")[1].split("bits")[0].strip()
               for line in nll_file.read_text().splitlines() if line.startswith("NLL")}
        opts = json.loads((run / "training_options.json").read_text())
        rows.append((name, opts["sampler"].get("sampler"), opts["sampler"].get("steps"), heun, own, bpd, train_s))
        print(f"{name}: done", flush=True)
    print("\n| method | FID heun-18 (NFE 35) | KID heun-18 | own sampler | FID own | bits/dim (PF-ODE) | "
          "bits/dim (VLB) | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, smp, steps, heun, own, bpd, train_s in rows:
        print(f"| {name} | {heun['fid']:.2f} | {heun['kid']:.4f} | {smp} {steps or ''} | "
              f"{'-' if own is None else format(own['fid'], '.2f')} | "
              f"{bpd.get('probability-flow ODE', '-')} | {bpd.get('variational bound', '-')} | {train_s:.0f} |")


if __name__ == "__main__":
    main()
