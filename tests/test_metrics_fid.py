"""FID/KID/precision-recall/IS statistics (issue 3 "Must show"), with the fast stand-in detector."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from difflab.errors import UserError
from difflab.metrics.evaluate import parse_metrics, score
from difflab.metrics.fid import (
    FeatureStats,
    compute_fid_from_batches,
    fid_from_stats,
    iter_batches,
    kid_from_features,
    load_ref,
    precision_recall,
    save_ref,
)
from difflab.metrics.sources import select_indices, shard, stats_from_features, unshard
from difflab.metrics.standin import PixelProjectionDetector


def smooth_images(n: int, seed: int, size: int = 16, kind: str = "blobs") -> torch.Tensor:
    """A toy "dataset": random smooth colour blobs (or stripes, a different distribution)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centre = torch.rand(n, 2, 1, 1, generator=g) * 1.2 - 0.6
    colour = torch.rand(n, 3, 1, 1, generator=g)
    if kind == "blobs":
        r2 = (xx - centre[:, :1]) ** 2 + (yy - centre[:, 1:]) ** 2
        img = colour * torch.exp(-r2 / 0.2)
    else:
        freq = 2 + 4 * torch.rand(n, 1, 1, 1, generator=g)
        img = colour * (0.5 + 0.5 * torch.sin(freq * 3.1416 * xx + centre[:, :1] * 5))
    return (img * 255).round().clamp(0, 255).to(torch.uint8)


def test_fid_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert fid_from_stats(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-10)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(UserError, match="do not match"):
        fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_match_numpy_mean_and_unbiased_cov_for_any_batching():
    feats = torch.randn(37, 6, generator=torch.Generator().manual_seed(1)) * 3 + 1
    for batch in (1, 5, 37):
        stats = FeatureStats(6)
        for i in range(0, 37, batch):
            stats.update(feats[i : i + batch])
        mu, sigma = stats.mu_sigma()
        np.testing.assert_allclose(mu, feats.double().numpy().mean(0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(feats.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        stats.update(torch.zeros(2, 5))


def test_fid_of_a_set_against_its_own_statistics_is_zero_and_against_another_is_the_formula():
    """Self-FID is 0; against another set's statistics the streamed FID equals |mu1 - mu2|^2 +
    Tr(S1 + S2 - 2 sqrtm(S1 S2)) written straight in numpy/scipy on the same features (a FID that returned 0,
    or dropped the trace term, would fail the second check)."""
    import scipy.linalg

    det = PixelProjectionDetector(dim=16)
    images, others = smooth_images(200, seed=0), smooth_images(150, seed=1, kind="stripes")
    mu, sigma = stats_from_features(det.features(images))
    fid = compute_fid_from_batches(iter_batches(images, 64), (mu, sigma), detector=det)
    assert abs(fid) < 1e-6
    f1, f2 = det.features(images).double().numpy(), det.features(others).double().numpy()
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    s1 = np.cov(f1, rowvar=False)
    mean_term = float(((f1.mean(0) - mu2) ** 2).sum())
    want = mean_term + float(np.real(np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2))))
    got = compute_fid_from_batches(iter_batches(images, 64), (mu2, s2), detector=det)
    assert want > 1.5 * mean_term > 0  # both terms matter here
    assert got == pytest.approx(want, rel=1e-6)


def test_fid_grows_monotonically_with_noise():
    det = PixelProjectionDetector(dim=16)
    images = smooth_images(300, seed=0)
    ref = stats_from_features(det.features(images))
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
    fids = []
    for strength in (0, 8, 16, 32, 64):
        noisy = (images.float() + strength * noise).round().clamp(0, 255).to(torch.uint8)
        fids.append(compute_fid_from_batches(iter_batches(noisy, 100), ref, detector=det))
    assert all(b > a for a, b in itertools.pairwise(fids)), fids


def test_fid_between_halves_is_much_lower_than_against_another_dataset():
    det = PixelProjectionDetector(dim=16)
    blobs = det.features(smooth_images(400, seed=0))
    stripes = det.features(smooth_images(200, seed=1, kind="stripes"))
    half_a, half_b = stats_from_features(blobs[:200]), stats_from_features(blobs[200:])
    other = stats_from_features(stripes)
    fid_halves = fid_from_stats(*half_a, *half_b)
    fid_other = fid_from_stats(*half_a, *other)
    assert fid_halves * 10 < fid_other, (fid_halves, fid_other)


def kid_u_statistic(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 over whole pools, written out pair by pair (the estimator's expectation)."""
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3
    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


def test_kid_is_unbiased_for_its_pool_u_statistic():
    # Subsets of size m drawn from pools: E[estimate] = the pools' U-statistic (exact answer above).
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.5, 1, (8, 2)), rng.normal(0, 1, (8, 2))
    est_mean, est_std = kid_from_features(x, y, num_subsets=3000, max_subset_size=3, seed=1)
    exact = kid_u_statistic(x, y)
    stderr = est_std / np.sqrt(3000)
    assert abs(est_mean - exact) < 4 * stderr, (est_mean, exact, stderr)
    # the biased (V-statistic) estimate at m = 3 would sit far away: the test can tell them apart
    d = 2
    v_stat = lambda a, b: ((a @ b.T / d + 1) ** 3).mean()
    biased = v_stat(x, x) + v_stat(y, y) - 2 * v_stat(x, y)
    assert abs(biased - exact) > 20 * stderr


def test_kid_matches_closed_form_mmd_for_1d_uniforms():
    # k(x,y) = (xy + 1)^3 = 1 + 3xy + 3x^2y^2 + x^3y^3 => MMD^2 = 3 dm1^2 + 3 dm2^2 + dm3^2 (raw moments).
    rng = np.random.default_rng(2)
    c = 0.3
    x = rng.uniform(c, c + 1, (4000, 1))
    y = rng.uniform(0, 1, (4000, 1))
    moment = lambda lo, k: ((lo + 1) ** (k + 1) - lo ** (k + 1)) / (k + 1)
    exact = sum(w * (moment(c, k) - moment(0, k)) ** 2 for w, k in ((3, 1), (3, 2), (1, 3)))
    kid, _ = kid_from_features(x, y, num_subsets=8, max_subset_size=1000, seed=0)
    assert kid == pytest.approx(exact, rel=0.05)
    same, std = kid_from_features(x, rng.uniform(c, c + 1, (4000, 1)), num_subsets=8, max_subset_size=1000)
    assert abs(same) < 0.05 * exact


def test_precision_recall_identical_disjoint_and_half_overlap():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 8))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    fake = np.concatenate([rng.normal(size=(100, 8)), rng.normal(size=(100, 8)) + 100.0])
    precision, recall = precision_recall(real, fake)
    assert 0.35 < precision <= 0.5  # the far half is outside; most of the near half inside
    assert recall > 0.9
    with pytest.raises(UserError, match="k=3"):
        precision_recall(real[:3], real)


def test_score_with_stand_in_detector_and_metrics_list(tmp_path):
    det = PixelProjectionDetector(dim=16)
    images = smooth_images(120, seed=0)
    feats = det.features(images).numpy()
    mu, sigma = stats_from_features(feats)
    ref = tmp_path / "ref.npz"
    save_ref(ref, mu, sigma, features=feats, detector=np.array(det.name))
    res = score(iter_batches(images, 50), ref, metrics=["fid", "kid", "pr"], detector=det)
    assert res["num_images"] == 120
    assert abs(res["fid"]) < 1e-6
    assert (res["precision"], res["recall"]) == (1.0, 1.0)
    stripes = det.features(smooth_images(120, seed=1, kind="stripes")).numpy()
    assert abs(res["kid"]) < 0.05 * kid_from_features(feats, stripes)[0]
    with pytest.raises(UserError, match="logits"):
        score(iter_batches(images, 50), ref, metrics=["is"], detector=det)
    with pytest.raises(UserError, match="detector"):
        score(iter_batches(images, 50), ref, detector=PixelProjectionDetector(dim=16, seed=1))
    with pytest.raises(UserError, match="--metrics"):
        parse_metrics("fid,foo")


def test_load_ref_validates_the_file(tmp_path):
    good = tmp_path / "good.npz"
    save_ref(good, np.zeros(4), np.eye(4))
    assert load_ref(good)["sigma"].shape == (4, 4)
    cases = {
        "keys.npz": lambda p: np.savez(p, mean=np.zeros(4)),
        "shape.npz": lambda p: np.savez(p, mu=np.zeros(4), sigma=np.eye(3)),
        "text.npz": lambda p: p.write_text("not a zip"),
        "nan.npz": lambda p: np.savez(p, mu=np.full(2, np.nan), sigma=np.eye(2)),
    }
    for name, write in cases.items():
        write(tmp_path / name)
        with pytest.raises(UserError, match=name):
            load_ref(tmp_path / name)
    with pytest.raises(UserError, match="fid ref"):
        load_ref(tmp_path / "missing.npz")
    with pytest.raises(UserError, match="--features"):
        load_ref(good, with_features=True)


def test_subset_selection_and_shards():
    assert list(select_indices(5, None)) == [0, 1, 2, 3, 4]
    a, b = select_indices(100, 10, seed=3), select_indices(100, 10, seed=3)
    assert list(a) == list(b) and len(set(a)) == 10 and list(a) == sorted(a)
    assert list(select_indices(100, 10, seed=4)) != list(a)
    with pytest.raises(UserError, match="--num 10"):
        select_indices(5, 10)
    items = torch.arange(11)
    parts = [shard(items, r, 3) for r in range(3)]
    assert torch.equal(unshard(parts), items)


def test_eigh_route_equals_scipy_sqrtm():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(40, 24)), rng.normal(size=(30, 24)) @ rng.normal(size=(24, 24))
    for n in (40, 10):  # full rank and rank-deficient covariances
        s1, s2 = np.cov(a[:n], rowvar=False), np.cov(b[:n], rowvar=False)
        mu1, mu2 = a[:n].mean(0), b[:n].mean(0)
        exact = fid_from_stats(mu1, s1, mu2, s2, method="sqrtm")
        assert fid_from_stats(mu1, s1, mu2, s2, method="eigh") == pytest.approx(exact, rel=1e-6)


def fake_images_for(seeds) -> torch.Tensor:
    """Deterministic per-seed images, standing in for a network."""
    return torch.cat([smooth_images(1, seed=int(s)) for s in seeds])


def test_calc_network_scores_generated_batches(monkeypatch):
    """calc_network loads the run once, merges its sampler defaults with the overrides and scores what
    generate_batches yields."""
    from types import SimpleNamespace

    import difflab.generate as gen
    from difflab.metrics.evaluate import calc_network

    det = PixelProjectionDetector(dim=16)
    seeds = list(range(40))
    ref = stats_from_features(det.features(fake_images_for(seeds)))
    cfg = SimpleNamespace(sampler={"sampler": "ddim", "steps": 50})
    monkeypatch.setattr(gen, "load_run", lambda network, device=None: ("model", cfg, {}))
    monkeypatch.setattr(gen, "check_sampler_options", lambda model, defaults, overrides, flags=None: overrides)
    seen = []

    def generate_batches(model, seeds, batch, kw, device, rank, world, progress=True):
        assert model == "model" and (rank, world) == (0, 1)
        seen.append(dict(kw))
        for i in range(0, len(seeds), batch):
            yield seeds[i : i + batch], fake_images_for(seeds[i : i + batch])

    monkeypatch.setattr(gen, "generate_batches", generate_batches)
    res = calc_network("run", ref, seeds, batch=7, detector=det, sampler_overrides={"steps": 5})
    assert abs(res["fid"]) < 1e-6 and res["num_images"] == 40
    assert seen == [{"sampler": "ddim", "steps": 5}]


def test_dataset_ref_stats_of_a_dataset_object(tmp_path, monkeypatch):
    from difflab.metrics.fid import dataset_ref_stats

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    images = smooth_images(30, seed=0)
    dataset = [(img.numpy(), -1, i) for i, img in enumerate(images)]
    det = PixelProjectionDetector(dim=16)
    ref = dataset_ref_stats(dataset, detector=det, batch=7)
    mu, sigma = stats_from_features(det.features(images))
    np.testing.assert_allclose(ref["mu"], mu, rtol=1e-12)
    np.testing.assert_allclose(ref["sigma"], sigma, rtol=1e-10, atol=1e-14)
    assert len(list((tmp_path / "difflab" / "features").glob("*.npz"))) == 1
    assert dataset_ref_stats(dataset, detector=det, batch=7) is ref  # memoised
    assert compute_fid_from_batches(iter_batches(images, 8), ref, detector=det) == pytest.approx(0, abs=1e-6)
    sub = dataset_ref_stats(dataset, detector=det, max_images=10, seed=2)
    assert sub is not ref and not np.allclose(sub["mu"], mu)
