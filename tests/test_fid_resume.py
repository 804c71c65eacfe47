"""`fid ref` / `fid calc` resume a killed feature extraction from the last finished chunk, end with the
statistics of an uninterrupted run, and rebuild damaged cache entries (docs/evaluation.md "Feature cache")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from difflab.cli import main
from difflab.metrics import cli as metrics_cli
from difflab.metrics.evaluate import calc_images, make_ref
from difflab.metrics.sources import FeatureCache
from difflab.metrics.standin import PixelProjectionDetector

N, CHUNK, BATCH = 30, 8, 4  # chunks of 8, 8, 8, 6 images; two detector batches per full chunk


class Counting:
    """A detector that counts the images it sees and can die (like a SIGINT) before its k-th batch."""

    def __init__(self, det, die_at: int | None = None):
        self.det, self.die_at, self.batches, self.images = det, die_at, 0, 0
        self.name, self.feature_dim, self.has_logits = det.name, det.feature_dim, False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.batches == self.die_at:
            raise KeyboardInterrupt("killed")
        self.batches += 1
        self.images += len(x)
        return self.det.features(x)


def write_folder(path: Path, n: int = N, seed: int = 0) -> Path:
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "difflab" / "features"


def ref(data, dest, det, **kw):
    return make_ref(data, dest, detector=det, batch=BATCH, chunk=CHUNK, keep_features=True, **kw)


def test_killed_ref_resumes_from_its_last_chunk(tmp_path, cache):
    det = PixelProjectionDetector(dim=8)
    real = write_folder(tmp_path / "real")
    ref(real, tmp_path / "whole.npz", Counting(det), use_cache=False)
    with pytest.raises(KeyboardInterrupt):  # dies in the third chunk, after five batches
        ref(real, tmp_path / "cut.npz", Counting(det, die_at=5))
    assert len(list(cache.glob("*.npz"))) == 2 and not (tmp_path / "cut.npz").exists()
    (tmp_path / ".cut.npz.k1ll3d.tmp").write_bytes(b"torn")  # a kill while writing the result leaves this
    again = Counting(det)
    ref(real, tmp_path / "cut.npz", again)
    assert again.images == N - 2 * CHUNK
    assert (tmp_path / "cut.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()
    assert not list(tmp_path.glob(".*.tmp")) and not list(cache.glob(".*.tmp"))
    # and those statistics are the images' own: features in index order, mean and covariance
    images = torch.from_numpy(np.stack([np.asarray(PIL.Image.open(p)).transpose(2, 0, 1)
                                        for p in sorted(real.glob("*.png"))]))
    feats = det.features(images).double().numpy()
    with np.load(tmp_path / "cut.npz") as z:
        np.testing.assert_allclose(z["features"], feats, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(z["mu"], feats.mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(z["sigma"], np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-7)


def test_damaged_cache_entries_are_rebuilt_with_one_warning_each(tmp_path, cache, capsys):
    det = PixelProjectionDetector(dim=8)
    real = write_folder(tmp_path / "real")
    ref(real, tmp_path / "first.npz", Counting(det))
    entries = sorted(cache.glob("*.npz"))
    assert len(entries) == 4
    sizes = []
    for path, damage in zip(entries, ("truncate", "checksum", "garbage")):
        with np.load(path) as z:
            feats, key, digest = z["features"], z["key"], z["sha256"]
        sizes.append(len(feats))
        if damage == "truncate":  # what a crash does to a file written without fsync
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif damage == "checksum":  # readable, right shape, wrong numbers
            np.savez(path, features=feats + 1, key=key, sha256=digest)
        else:
            path.write_text("not an npz")
    capsys.readouterr()
    again = Counting(det)
    ref(real, tmp_path / "second.npz", again)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 3 and all(w.startswith("difflab: warning: feature cache entry") for w in warnings)
    assert any("fails its checksum" in w for w in warnings) and sum("unreadable" in w for w in warnings) == 2
    assert again.images == sum(sizes)
    assert (tmp_path / "second.npz").read_bytes() == (tmp_path / "first.npz").read_bytes()
    assert len(list(cache.glob("*.npz"))) == 4


def test_killed_calc_resumes_and_clears_its_resume_points(tmp_path, cache):
    det = PixelProjectionDetector(dim=8)
    write_folder(tmp_path / "real")
    fake = write_folder(tmp_path / "fake", seed=1)
    ref(tmp_path / "real", tmp_path / "ref.npz", det, use_cache=False)
    kw = dict(metrics=["fid", "kid", "pr"], num=25, seed=3, batch=BATCH, chunk=CHUNK, kid_subsets=4,
              kid_subset_size=10)
    whole = calc_images(fake, tmp_path / "ref.npz", detector=Counting(det), use_cache=False, **kw)
    assert not (cache / "resume").exists()
    with pytest.raises(KeyboardInterrupt):
        calc_images(fake, tmp_path / "ref.npz", detector=Counting(det, die_at=4), **kw)
    assert len(list((cache / "resume").glob("*.npz"))) == 2
    again = Counting(det)
    assert calc_images(fake, tmp_path / "ref.npz", detector=again, **kw) == whole
    assert again.images == 25 - 2 * CHUNK
    assert not list((cache / "resume").iterdir())  # finished: resume points deleted


SLOW_REF = """
import sys, time
from difflab.metrics.evaluate import make_ref
from difflab.metrics.standin import PixelProjectionDetector

class Slow(PixelProjectionDetector):
    def features(self, x):
        time.sleep(0.3)
        return super().features(x)

make_ref(sys.argv[1], sys.argv[2], detector=Slow(dim=8), batch=4, chunk=8, keep_features=True)
"""


def test_sigkilled_ref_resumes_with_the_same_statistics(tmp_path, cache):
    real = write_folder(tmp_path / "real")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_REF, str(real), str(tmp_path / "cut.npz")], env=env)
    deadline = time.time() + 120
    while len(list(cache.glob("*.npz"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(cache.glob("*.npz")))
    assert 2 <= done < 4 and not (tmp_path / "cut.npz").exists(), "the kill came too late to test anything"
    det = PixelProjectionDetector(dim=8)
    again = Counting(det)
    ref(real, tmp_path / "cut.npz", again)
    assert again.images == N - done * CHUNK
    ref(real, tmp_path / "whole.npz", det, use_cache=False)
    assert (tmp_path / "cut.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()


def run(argv, capsys) -> tuple[int, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_cache_flags_and_nan_to_on_the_fid_command_line(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setattr(metrics_cli, "_make_detector", lambda args: PixelProjectionDetector(dim=8))
    saved = []
    real_save = FeatureCache.save
    monkeypatch.setattr(FeatureCache, "save", lambda self, key, f: saved.append(self.folder.name)
                        or real_save(self, key, f))
    write_folder(tmp_path / "real", n=12)
    dest = str(tmp_path / "ref.npz")
    assert run(["fid", "ref", "--data", str(tmp_path / "real"), "--dest", dest, "--no-progress"], capsys)[0] == 0
    assert saved == ["features"]
    calc = ["fid", "calc", "--images", str(tmp_path / "real"), "--ref", dest, "--num", "12", "--no-progress"]
    assert run([*calc, "--no-cache"], capsys)[0] == 0 and saved == ["features"]
    assert run(calc, capsys)[0] == 0 and saved == ["features", "resume"]
    vol = np.ones((4, 8, 8), np.float32)
    vol[2, 3, 3] = np.nan
    np.save(tmp_path / "v.npy", vol)
    code, err = run(["fid", "ref", "--data", str(tmp_path / "v.npy"), "--dest", str(tmp_path / "v.npz")], capsys)
    assert code == 2 and err.strip() == (f"difflab: error: {tmp_path / 'v.npy'}: 1 of 256 values are NaN or "
                                         "infinite; fix the data or pass --nan-to NUMBER to replace them by NUMBER")
    assert not (tmp_path / "v.npz").exists()
    code, err = run(["fid", "ref", "--data", str(tmp_path / "v.npy"), "--dest", str(tmp_path / "v.npz"),
                     "--nan-to", "0", "--no-progress"], capsys)
    assert code == 0 and (tmp_path / "v.npz").exists(), err


def test_calc_names_images_of_another_size(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metrics_cli, "_make_detector", lambda args: PixelProjectionDetector(dim=8))
    write_folder(tmp_path / "fake", n=3)
    PIL.Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "fake" / "grid.png")
    np.savez(tmp_path / "ref.npz", mu=np.zeros(8), sigma=np.eye(8))
    code, err = run(["fid", "calc", "--images", str(tmp_path / "fake"), "--ref", str(tmp_path / "ref.npz")],
                    capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "grid.png is 40x40 but" in lines[0] and "000.png is 16x16" in lines[0]
    assert "--images needs images of one size" in lines[0]


def test_cache_key_follows_pixels_recipe_and_weights_file(tmp_path):
    from difflab.metrics.inception import InceptionDetector

    (tmp_path / "a.pt").write_bytes(b"weights a")
    (tmp_path / "b.pt").write_bytes(b"weights b")

    def key(images, path="a.pt", resize="tf"):
        det = InceptionDetector(tmp_path / path, resize=resize, device="cpu")  # the file is not loaded
        return FeatureCache(tmp_path / "c", det).key(images)

    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    other = images.clone()
    other[1, 2, 3, 3] = 1
    assert key(images) == key(images.clone())
    assert len({key(images), key(other), key(images, path="b.pt"), key(images, resize="clean"),
                key(images.reshape(2, 3, 2, 8))}) == 5


def test_cache_removes_stale_temp_files_but_spares_a_live_writers(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    old, fresh, other = folder / ".abc.npz.x1.tmp", folder / ".def.npz.x2.tmp", folder / ".notes.txt.x3.tmp"
    for p in (old, fresh, other):
        p.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    FeatureCache(folder, PixelProjectionDetector(dim=4))
    assert not old.exists() and fresh.exists() and other.exists()
