"""Benchmark: TF-FID feature extraction speed on CPU for 32x32 inputs, and the wall time of an N-image FID.

    python bench/bench_fid.py                     # variants on 32 images, then a 1000-image FID
    python bench/bench_fid.py --num 200 --probe 16 --threads 2

Prints figures only (no timed assertions). Wall-clock figures depend on what else runs on the machine,
so the CPU seconds per image of this process are printed too, with the load average.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

from difflab.metrics.fid import FeatureStats, fid_from_stats
from difflab.metrics.inception import InceptionDetector, preprocess


def smooth_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 255
    noise = torch.randn(n, 3, size, size, generator=g) * 20
    up = torch.nn.functional.interpolate(low, size=size, mode="bicubic", align_corners=False)
    return (up + noise).clamp(0, 255).round().to(torch.uint8)


def timed(fn) -> tuple[float, float, object]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def bench_variants(path, probe: int, batch: int) -> None:
    images = smooth_images(probe, seed=0)
    script = InceptionDetector(path, device="cpu", batch_size=batch, backend="script")
    eager = InceptionDetector(path, device="cpu", batch_size=batch, backend="eager")
    x = preprocess(images, "tf")

    def run_script(memory_format):
        return lambda: torch.cat([script.model(x[i : i + batch].contiguous(memory_format=memory_format))
                                  for i in range(0, probe, batch)])

    variants = {
        "script, NCHW, no_grad": (torch.no_grad, run_script(torch.contiguous_format)),
        "script, channels_last, no_grad": (torch.no_grad, run_script(torch.channels_last)),
        "script, channels_last, inference_mode": (torch.inference_mode, run_script(torch.channels_last)),
        "eager folded-BN, channels_last (default)": (torch.inference_mode, lambda: eager.features(images)),
    }
    reference = None
    print(f"feature extraction, {probe} images 32x32 -> 299, batch {batch}, threads {torch.get_num_threads()}")
    for name, (ctx, fn) in variants.items():
        with ctx():
            fn()  # warm-up (allocator, oneDNN primitive cache)
            wall, cpu, feats = timed(fn)
        reference = feats if reference is None else reference
        diff = (feats.float() - reference.float()).abs().max().item()
        print(f"  {name:42s} {probe / wall:6.2f} img/s   {cpu / probe:6.3f} CPU s/img   max|diff| {diff:.1e}")
    for b in (8, 16, 32, 64):
        if b > probe:
            break
        det = InceptionDetector(path, device="cpu", batch_size=b)
        det.features(images[:2])
        wall, cpu, _ = timed(lambda: det.features(images))  # noqa: B023 - called immediately
        print(f"  eager, batch {b:3d}                               {probe / wall:6.2f} img/s   "
              f"{cpu / probe:6.3f} CPU s/img")


def bench_fid(path, num: int, batch: int) -> None:
    det = InceptionDetector(path, device="cpu", batch_size=batch)
    ref_stats = FeatureStats(2048)
    ref_stats.update(det.features(smooth_images(64, seed=123)))
    mu_r, sigma_r = ref_stats.mu_sigma()
    stats = FeatureStats(2048)
    t0 = time.perf_counter()
    c0 = time.process_time()
    done = 0
    for start in range(0, num, batch):
        images = smooth_images(min(batch, num - start), seed=start + 1)
        stats.update(det.features(images))
        done += images.shape[0]
    extract = time.perf_counter() - t0
    cpu = time.process_time() - c0
    mu, sigma = stats.mu_sigma()
    t_sqrtm, _, fid = timed(lambda: fid_from_stats(mu, sigma, mu_r, sigma_r, method="sqrtm"))
    t_eigh, _, fid_e = timed(lambda: fid_from_stats(mu, sigma, mu_r, sigma_r, method="eigh"))
    print(f"{num}-image FID: extraction {extract:.1f} s ({num / extract:.2f} img/s, {cpu / num:.3f} CPU s/img), "
          f"sqrtm {t_sqrtm:.1f} s, eigh {t_eigh:.1f} s -> total {extract + t_sqrtm:.1f} s (sqrtm) / "
          f"{extract + t_eigh:.1f} s (eigh); FID {fid:.4f} vs {fid_e:.4f}")
    for n in (1000, 10000, 50000):
        print(f"  extrapolated extraction for {n:6d} images: {n / (num / extract) / 60:7.1f} min")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=1000, help="images in the FID run (default 1000)")
    p.add_argument("--probe", type=int, default=32, help="images per variant timing (default 32)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--detector", default=None, help="path to default_1.pt (default: installed wheel)")
    p.add_argument("--skip-variants", action="store_true")
    args = p.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    if not args.skip_variants:
        bench_variants(args.detector, args.probe, args.batch)
    bench_fid(args.detector, args.num, args.batch)
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
