"""2 gloo ranks give exactly the statistics and metrics of 1 process (issue 3, item 4; IS: issue 13)."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from difflab.metrics.evaluate import calc_images, make_ref
from difflab.metrics.fid import FeatureStats
from tests.test_metrics_is import HeadedStandIn


def write_folder(path, n: int, seed: int, size: int = 16) -> None:
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size, size, 3))
    for i in range(n):
        img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        PIL.Image.fromarray(img).save(path / f"{i:04d}.png")


def run_all(tmp: str, tag: str) -> dict:
    """The work each rank does; with no process group it is the 1-process reference."""
    det = HeadedStandIn(dim=12)  # the pixel-projection stand-in plus a 3-class head
    feats = torch.randn(23, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    stats = FeatureStats(12)
    stats.update(feats[rank::world])  # uneven shares: 12 and 11 rows
    stats.all_reduce()
    mu, sigma = stats.mu_sigma()
    # chunks of 4 images: the ranks share them out (and the resume points of calc_images) unevenly
    ref = make_ref(f"{tmp}/real", f"{tmp}/ref-{tag}.npz", detector=det, batch=3, keep_features=True,
                   use_cache=False, chunk=4)
    res = calc_images(f"{tmp}/fake", f"{tmp}/ref-{tag}.npz", metrics=["fid", "kid", "pr", "is"], num=19, seed=1,
                      batch=3, detector=det, kid_subsets=5, kid_subset_size=8, chunk=4, is_splits=3)
    return {"count": stats.count, "mu": mu.tolist(), "sigma": sigma.tolist(), "ref_mu": ref["mu"].tolist(),
            "ref_sigma": ref["sigma"].tolist(), **res}


def _worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        out = run_all(tmp, "dist")
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the spawned ranks inherit it
    write_folder(tmp_path / "real", 21, seed=0)
    write_folder(tmp_path / "fake", 25, seed=1)
    single = run_all(str(tmp_path), "single")
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["count"] == 23 and got["num_images"] == 19
        for key in ("mu", "sigma", "ref_mu", "ref_sigma"):
            np.testing.assert_allclose(got[key], single[key], rtol=1e-12, atol=1e-12)
        for key in ("fid", "kid", "kid_std", "precision", "recall", "is", "is_std"):
            assert got[key] == pytest.approx(single[key], rel=1e-9, abs=1e-12), key
    assert (tmp_path / "ref-dist.npz").exists()
