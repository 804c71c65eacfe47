"""``generate --compile`` / ``fid calc --compile``: torch.compile of the backbone for sampling (opt-in,
docs/performance.md). Images stay independent of ``--batch``, equal the eager ones to one uint8 level, and a
folder is never filled half eager, half compiled."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

import difflab.generate as gen
from difflab.cli import main
from difflab.errors import UserError
from difflab.training.loop import train
from tests.test_train import tiny_cfg

SEEDS = list(range(7))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(tiny_cfg(), run_dir=tmp_path_factory.mktemp("r") / "run", progress=False)


def pixels(folder) -> dict[int, np.ndarray]:
    return {s: np.asarray(PIL.Image.open(folder / f"{s:06d}.png")).astype(int) for s in SEEDS}


def test_compile_is_recorded_and_a_mixed_folder_is_refused(run, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(gen, "compile_backbone", lambda model: compiled.append(model) or model)
    gen.generate(run, SEEDS, tmp_path / "eager", progress=False, steps=2)
    assert not compiled and '"compile"' not in (tmp_path / "eager" / gen.MANIFEST).read_text()
    with pytest.raises(UserError, match=r"--compile off, now on"):
        gen.generate(run, SEEDS, tmp_path / "eager", progress=False, steps=2, compile=True)
    gen.generate(run, SEEDS, tmp_path / "comp", progress=False, steps=2, compile=True)
    assert len(compiled) == 2  # compiled before the folder check, and for the run that wrote
    with pytest.raises(UserError, match=r"--compile on, now off"):
        gen.generate(run, SEEDS, tmp_path / "comp", progress=False, steps=2)


def test_fid_calc_refuses_compile_with_images(tmp_path, capsys):
    img = tmp_path / "imgs"
    img.mkdir()
    PIL.Image.fromarray(np.zeros((8, 8), np.uint8)).save(img / "a.png")
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(SystemExit):
        main(["fid", "calc", "--images", str(img), "--ref", str(ref), "--compile"])
    err = capsys.readouterr().err
    assert "--compile" in err and "--network" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_compiled_generation_is_batch_invariant_and_matches_eager(run, tmp_path):
    """The backbone runs on fixed 16-row chunks, so one compiled graph serves every --batch: the compiled
    images are byte-identical at batch 2 and 7, and within one level of the eager images."""
    eager = pixels(gen.generate(run, SEEDS, tmp_path / "e", batch=7, progress=False, steps=3))
    a = pixels(gen.generate(run, SEEDS, tmp_path / "a", batch=2, progress=False, steps=3, compile=True))
    b = pixels(gen.generate(run, SEEDS, tmp_path / "b", batch=7, progress=False, steps=3, compile=True))
    for s in SEEDS:
        assert np.array_equal(a[s], b[s]), s
        assert np.abs(a[s] - eager[s]).max() <= 1, s
