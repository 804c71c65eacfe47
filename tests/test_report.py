"""``difflab report`` (issue 13 item 4): two tiny digits runs -> index.html + PNGs; each plot holds one line per
run with the run's recorded values; FID vs NFE at measured NFEs equals a direct FID computation; one-line errors."""

import json
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import difflab
import difflab.metrics.fid as fid_mod
from difflab.errors import UserError
from difflab.metrics.standin import PixelProjectionDetector
from difflab.runio import read_stats
from difflab.training.loop import train
from tests.test_train import tiny_cfg

pytest.importorskip("matplotlib")

DETECTOR = PixelProjectionDetector(dim=8)


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fid_mod, "_DEFAULT_DETECTOR", DETECTOR)  # the in-training FID, fast
        a = train(tiny_cfg(lr=1e-3, fid_every=1, fid_num=8), run_dir=root / "lr1e-3", progress=False)
        b = train(tiny_cfg(lr=3e-3, fid_every=1, fid_num=8, lr_rampup_kimg=0.04), run_dir=root / "lr3e-3",
                  progress=False)
    # a later grid, so that the page must order grids by training progress
    Image.open(a / "samples-000000.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(a / "samples-000012.png")
    return a, b


@pytest.fixture(scope="module")
def rep(runs, tmp_path_factory):
    return difflab.report(runs, tmp_path_factory.mktemp("rep") / "out", nfe="3,5", num=8, detector=DETECTOR)


def test_page_references_every_png_and_they_decode(rep, runs):
    out = rep.index.parent
    parser = Images()
    parser.feed(rep.index.read_text())
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert set(parser.srcs) == on_disk == {p.relative_to(out).as_posix() for p in rep.pngs}
    assert {"loss.png", "lr.png", "img_per_sec.png", "fid_vs_kimg.png", "fid_vs_nfe.png"} <= on_disk
    for rel in on_disk:
        with Image.open(out / rel) as im:
            im.load()
            w, h = im.size
        if rel.startswith("samples/"):
            assert (w, h) == Image.open(runs[0] / "samples-000000.png").size and w >= 16  # a 2x2 grid of 8x8
        else:
            assert 400 <= w <= 2000 and 250 <= h <= 1500, (rel, w, h)
            assert np.asarray(Image.open(out / rel).convert("L")).std() > 5  # not blank


def test_each_plot_has_one_line_per_run_with_its_recorded_values(rep, runs):
    names = [r.name for r in runs]
    for key, stat in (("loss", "loss"), ("lr", "lr"), ("img_per_sec", "img_per_sec"), ("fid", "fid")):
        lines = rep.plots[key]
        assert [label for label, _, _ in lines] == names, key
        for (_, xs, ys), run in zip(lines, runs):
            recorded = [(s["kimg"], s[stat]) for s in read_stats(run) if stat in s]
            assert len(recorded) == 3, key
            assert xs == pytest.approx([k for k, _ in recorded]) and ys == pytest.approx([v for _, v in recorded]), key
    assert rep.plots["lr"][0][2] != rep.plots["lr"][1][2]  # the two runs differ and both are drawn


def test_fid_vs_nfe_at_measured_nfe_equals_a_direct_fid(rep, runs):
    from difflab.data import open_dataset
    from difflab.metrics.evaluate import calc_network
    from difflab.metrics.fid import dataset_ref_stats

    for run in runs:
        pts = rep.fid_nfe[run.name]
        # Heun with N steps makes 2N - 1 evaluations (the last step is Euler): NFE 3 and 5 are 2 and 3 steps
        assert [(p["sampler"], p["steps"], p["nfe"]) for p in pts] == [("heun", 2, 3), ("heun", 3, 5)]
        cfg = json.loads((run / "training_options.json").read_text())
        ref = dataset_ref_stats(open_dataset(**cfg["data"]), detector=DETECTOR)
        for p in pts:
            direct = calc_network(run, ref, list(range(8)), detector=DETECTOR, sampler_overrides={"steps": p["steps"]})
            assert p["fid"] == pytest.approx(direct["fid"], rel=1e-6)
    (_, xs, ys), _ = rep.plots["fid_nfe"]
    assert xs == [3, 5] and ys == [p["fid"] for p in rep.fid_nfe[runs[0].name]]


def test_sample_grids_in_training_order(rep, runs):
    html = rep.index.read_text()
    parser = Images()
    parser.feed(html)
    grids = [s for s in parser.srcs if s.startswith("samples/run0/")]
    assert grids == ["samples/run0/samples-000000.png", "samples/run0/samples-000012.png"]
    exact = json.loads((runs[0] / "checkpoint-000000.json").read_text())["kimg"]  # the grid's snapshot
    assert f"kimg {exact:.3g}<" in html and "kimg 12<" in html  # no checkpoint-000012: the file name's kimg
    copied = np.asarray(Image.open(rep.index.parent / grids[1]))
    assert np.array_equal(copied, np.asarray(Image.open(runs[0] / "samples-000012.png")))


def test_page_renders_in_headless_chromium(rep, tmp_path):
    """A real browser loads the page and its images: the plots' line colours appear in the screenshot."""
    import shutil

    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless Chromium here (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--window-size=1200,2400", f"--screenshot={shot}", rep.index.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert shot.is_file(), res.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    near = lambda rgb: (np.abs(px - rgb).sum(1) < 40).sum()  # noqa: E731
    assert near((31, 119, 180)) > 500 and near((255, 127, 14)) > 500  # matplotlib's first two line colours
    assert (px.sum(1) < 100).mean() > 0.001  # dark pixels: the text and the sample grids


def test_api_name_survives_imports():
    import difflab.cli.report  # noqa: F401
    import difflab.reporting  # noqa: F401

    assert callable(difflab.report) and difflab.report is difflab.reporting.report


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "difflab", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("make,needle", [
    (lambda t: ["report", str(t), "--out", str(t / "o")], "not a difflab run directory"),
    (lambda t: ["report", str(t / "nope"), "--out", str(t / "o")], "no such run directory"),
    (lambda t: ["report", "RUN", "--out", str(t / "o"), "--nfe", "5,x"], "--nfe '5,x'"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, make, needle, runs):
    args = [a.replace("RUN", str(runs[0])) for a in make(tmp_path)]
    res = run_cli(*args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("difflab: error:") and needle in lines[0], res.stderr
    assert not (tmp_path / "o").exists()


def test_cli_writes_the_page(tmp_path, runs):
    res = run_cli("report", *map(str, runs), "--out", str(tmp_path / "o"), "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "o" / "index.html").is_file() and "index.html" in res.stdout


def test_missing_matplotlib_is_one_line(monkeypatch, runs, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"pip install 'difflab\[report\]'"):
        difflab.report(runs, tmp_path / "o")
