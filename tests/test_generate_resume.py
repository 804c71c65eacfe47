"""`difflab generate` resumes a killed run: only missing seeds are written, stale temp files go, and the
folder ends byte-identical to an uninterrupted run (docs/reliability.md)."""

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

import difflab.generate as gen
from difflab.cli import main
from difflab.data import open_dataset
from difflab.errors import UserError
from difflab.train.loop import train
from tests.test_train import tiny_cfg

SEEDS = list(range(20))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(tiny_cfg(), run_dir=tmp_path_factory.mktemp("r") / "run", progress=False)


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """name -> (inode, bytes) of every file below ``folder``: an atomic rewrite changes the inode."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def fail_after(monkeypatch, name: str, k: int) -> list:
    """Make ``difflab.generate.<name>`` (a writer) raise on its (k+1)-th call; returns the call log."""
    real, calls = getattr(gen, name), []

    def writer(path, *args):
        if len(calls) == k:
            raise KeyboardInterrupt("killed")
        calls.append(Path(path).name)
        real(path, *args)

    monkeypatch.setattr(gen, name, writer)
    return calls


def test_rerun_after_failure_writes_only_the_missing_seeds(run, tmp_path, monkeypatch):
    whole = gen.generate(run, SEEDS, tmp_path / "whole", batch=3, progress=False, steps=3)
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        fail_after(m, "save_png", 7)
        with pytest.raises(KeyboardInterrupt):
            gen.generate(run, SEEDS, out, batch=3, progress=False, steps=3)
    (out / ".000007.png.k1ll3d.tmp").write_bytes(b"half a png")  # what a SIGKILL mid-write leaves
    before = snapshot(out)
    assert sorted(n for n in before if n.endswith(".png") and not n.startswith(".")) == [
        f"{s:06d}.png" for s in range(7)]
    writes = fail_after(monkeypatch, "save_png", 10**9)
    gen.generate(run, SEEDS, out, batch=5, progress=False, steps=3)  # another batch size: same pixels
    assert writes == [f"{s:06d}.png" for s in range(7, 20)] + ["grid.png"]
    after = snapshot(out)
    assert all(after[n][0] == before[n][0] for n in (f"{s:06d}.png" for s in range(7)))  # not rewritten
    assert not list(out.glob(".*.tmp"))
    assert {n: b for n, (_, b) in after.items()} == {n: b for n, (_, b) in snapshot(whole).items()}

    writes.clear()
    gen.generate(run, SEEDS, out, batch=5, progress=False, steps=3, overwrite=True)
    assert writes == [f"{s:06d}.png" for s in SEEDS] + ["grid.png"]
    again = snapshot(out)
    assert all(again[n][0] != after[n][0] for n in (f"{s:06d}.png" for s in SEEDS))
    assert {n: b for n, (_, b) in again.items()} == {n: b for n, (_, b) in after.items()}


def test_damaged_or_foreign_pngs_are_generated_again(run, tmp_path, monkeypatch):
    out = gen.generate(run, SEEDS[:6], tmp_path / "o", progress=False, steps=2, grid=False)
    good = (out / "000002.png").read_bytes()
    (out / "000002.png").write_bytes(good[: len(good) // 2])  # torn (e.g. by a crash without fsync)
    PIL.Image.fromarray(np.zeros((16, 16), np.uint8)).save(out / "000004.png")  # another resolution
    writes = fail_after(monkeypatch, "save_png", 10**9)
    gen.generate(run, SEEDS[:6], out, progress=False, steps=2, grid=False)
    assert writes == ["000002.png", "000004.png"]
    assert (out / "000002.png").read_bytes() == good


def test_other_settings_are_refused_and_nothing_is_written(run, tmp_path):
    out = gen.generate(run, SEEDS[:4], tmp_path / "o", progress=False, steps=2)
    before = snapshot(out)
    with pytest.raises(UserError, match=r"other settings \(steps 2, now 3\).*--overwrite"):
        gen.generate(run, SEEDS[:8], out, progress=False, steps=3)
    assert snapshot(out) == before
    gen.generate(run, SEEDS[:8], out, progress=False, steps=3, overwrite=True)
    assert len(list(out.glob("0*.png"))) == 8


def test_npz_resumes_from_its_finished_batches(run, tmp_path, monkeypatch):
    whole = gen.generate(run, SEEDS, tmp_path / "whole", batch=4, npz=True, progress=False, steps=2)
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        fail_after(m, "atomic_write_bytes", 3)  # three batches of four seeds are kept as parts
        with pytest.raises(KeyboardInterrupt):
            gen.generate(run, SEEDS, out, batch=4, npz=True, progress=False, steps=2)
    assert len(list((out / gen.NPZ_PARTS).glob("*.npz"))) == 3 and not (out / gen.NPZ).exists()
    done = []
    real = gen.generate_batches
    monkeypatch.setattr(gen, "generate_batches",
                        lambda model, seeds, *a, **k: done.extend(seeds) or real(model, seeds, *a, **k))
    gen.generate(run, SEEDS, out, batch=4, npz=True, progress=False, steps=2)
    assert done == SEEDS[12:]
    assert (out / gen.NPZ).read_bytes() == (whole / gen.NPZ).read_bytes()
    assert (out / "grid.png").read_bytes() == (whole / "grid.png").read_bytes()
    assert not (out / gen.NPZ_PARTS).exists()


def test_scoring_a_generate_folder_leaves_out_the_grid(run, tmp_path, monkeypatch):
    """The README tour: `fid calc --images OUT` right after `generate --outdir OUT`."""
    from difflab.metrics.evaluate import calc_images, make_ref
    from difflab.metrics.standin import PixelProjectionDetector

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = gen.generate(run, SEEDS[:5], tmp_path / "o", progress=False, steps=2)
    ds = open_dataset(str(out))
    assert len(ds) == 5 and ds.resolution == 8  # grid.png (a montage of another size) is not a sample
    det = PixelProjectionDetector(dim=4)
    make_ref(out, tmp_path / "ref.npz", detector=det)
    res = calc_images(out, tmp_path / "ref.npz", num=5, detector=det)
    assert res["num_images"] == 5 and abs(res["fid"]) < 1e-6
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("000000.png", "grid.png"):
        (plain / name).write_bytes((out / name).read_bytes())
    with pytest.raises(UserError, match="grid.png is"):  # without generate.json it is an image like any
        open_dataset(str(plain))


def test_overwrite_flag(run, tmp_path, capsys):
    args = ["generate", "--network", str(run), "--seeds", "0-3", "--outdir", str(tmp_path / "o"), "--steps", "2",
            "--no-grid"]
    main(args)
    first = snapshot(tmp_path / "o")
    main(args)
    assert snapshot(tmp_path / "o") == first
    main([*args, "--overwrite"])
    second = snapshot(tmp_path / "o")
    assert all(second[n][0] != first[n][0] and second[n][1] == first[n][1] for n in first if n.endswith(".png"))


@pytest.mark.slow
def test_sigkilled_generate_resumes_byte_identical(run, tmp_path):
    """A real SIGKILL of `difflab generate` part-way; the rerun writes only the missing seeds."""
    seeds, steps = list(range(12)), 16
    out = tmp_path / "cut"
    cmd = [sys.executable, "-m", "difflab", "generate", "--network", str(run), "--seeds", "0-11", "--outdir",
           str(out), "--steps", str(steps), "--batch", "1", "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(list(out.glob("0*.png"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = {p.name: p.stat().st_ino for p in out.glob("0*.png")}
    assert 3 <= len(kept) < len(seeds), "the kill came too late to test anything"
    print(f"killed after {len(kept)} of {len(seeds)} images")
    gen.generate(run, seeds, out, progress=False, steps=steps, device="cpu")
    whole = gen.generate(run, seeds, tmp_path / "whole", progress=False, steps=steps, device="cpu")
    assert all((out / n).stat().st_ino == ino for n, ino in kept.items())
    assert not list(out.rglob(".*.tmp"))
    assert {n: b for n, (_, b) in snapshot(out).items()} == {n: b for n, (_, b) in snapshot(whole).items()}
