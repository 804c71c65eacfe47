"""Bring-your-own-data (issue 13): the user's data decides the resolution, --pad-to with crop-back, --dry-run,
the --arch rule, list-option spellings, writable dataset items (docs/howto/own-data.md, docs/training.md)."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.errors import UserError

TINY = ["--arch", "ddpmpp", "--model-channels", "8", "-o", "network.channel_mult=[1,2]", "--num-blocks", "1",
        "--channel-mult-emb", "2", "--batch", "8", "--workers", "0", "--grid-seeds", "0-3", "-o", "sampler.steps=2"]


def npz(tmp_path, side: int, n: int = 24, name: str = "my.npz"):
    """``n`` gray ``side x side`` images whose pixels are all nonzero (so zero padding is visible)."""
    rng = np.random.default_rng(side)
    x = rng.integers(1, 256, size=(n, side, side), dtype=np.uint8)
    path = tmp_path / name
    np.savez(path, x=x)
    return path, x


def dry_run(args, capsys) -> tuple[dict, str]:
    main(["train", *args, "--dry-run"])
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    start = lines.index("{")  # notes such as "--arch X: ..." come first
    return json.loads("\n".join(lines[start:-1])), lines[-1]


def cli_error(args, capsys) -> str:
    """The one line ``difflab ARGS`` fails with."""
    with pytest.raises(SystemExit):
        main(args)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_other_data_decides_its_resolution(tmp_path, capsys):
    """The default preset's 8 px must not shrink the user's 16 px data (CLI and Python alike)."""
    import difflab

    path, _ = npz(tmp_path, 16)
    main(["train", "--data", str(path), "--method", "edm", "--arch", "ddpmpp", "--dry-run"])
    out = capsys.readouterr().out
    assert "the preset's data settings (resolution 8) are not applied" in out
    cfg = json.loads(out[out.index("\n{") + 1:out.rindex("}") + 1])
    assert "resolution" not in cfg["data"] and cfg["image"]["resolution"] == 16
    assert "(1, 16, 16)" in out.splitlines()[-1]
    assert "resolution" not in difflab.make_config("digits-quick", data={"source": str(path)}).data
    # the preset's own data keeps its settings; recipe settings (xflip) survive other data
    assert difflab.make_config("digits-quick").data["resolution"] == 8
    assert difflab.make_config("cifar10-ddpm", data={"source": str(path)}).data["xflip"] is True
    # an explicit --resolution still resizes
    cfg, _ = dry_run(["--data", str(path), "--resolution", "8"], capsys)
    assert cfg["image"]["resolution"] == 8


def test_unusable_size_says_pad_to(tmp_path, capsys):
    path, _ = npz(tmp_path, 28)
    err = cli_error(["train", "--data", str(path), "--dry-run"], capsys)
    assert "28" in err and "--pad-to 32" in err
    assert "--pad-to 16: the images are 28x28" in cli_error(["train", "--data", str(path), "--pad-to", "16",
                                                           "--dry-run"], capsys)


def test_pad_to_pads_with_zeros_and_generation_crops_back(tmp_path):
    import difflab
    from difflab.data import open_dataset
    from difflab.generate import generate

    path, x = npz(tmp_path, 28)
    ds = open_dataset(str(path), pad_to=32, use_labels=False)
    img = ds[3][0]
    assert img.shape == (1, 32, 32) and ds.crop_to == 28
    assert (img[0, 2:30, 2:30] == x[3]).all() and img.sum() == x[3].sum()  # centred, zeros around
    run = tmp_path / "run"
    main(["train", "--data", str(path), "--pad-to", "32", *TINY, "--duration", "0.016", "--run-dir", str(run),
          "--no-progress"])
    stored = json.loads((run / "training_options.json").read_text())
    assert stored["data"]["pad_to"] == 32 and stored["data"]["crop_to"] == 28
    assert stored["image"]["resolution"] == 32  # the network sees the padded size
    grid = Image.open(next(run.glob("samples-*.png")))
    out = generate(run, range(3), tmp_path / "gen", progress=False)
    assert Image.open(out / "000000.png").size == (28, 28)
    assert difflab.load(run).sample(2).shape == (2, 1, 28, 28)
    from difflab.utils import make_grid

    tile = make_grid(np.zeros((4, 1, 28, 28), dtype=np.uint8))  # the grid's 4 seeds as 28 px tiles
    assert grid.size == (tile.shape[2], tile.shape[1])
    with pytest.raises(UserError, match="the data changed"):
        open_dataset(str(npz(tmp_path, 16, name="other.npz")[0]), pad_to=32, crop_to=28)


def test_in_training_fid_reference_is_cropped_back_like_the_samples(tmp_path):
    """A --pad-to run's samples are cropped to 28 px, so its FID reference must be the 28 px images too."""
    from difflab.data import open_dataset
    from difflab.metrics.fid import dataset_ref_stats
    from difflab.metrics.standin import PixelProjectionDetector

    path, _ = npz(tmp_path, 28)
    det = PixelProjectionDetector(dim=16)
    padded = dataset_ref_stats(open_dataset(str(path), pad_to=32, use_labels=False), det, use_cache=False)
    plain = dataset_ref_stats(open_dataset(str(path), use_labels=False), det, use_cache=False)
    np.testing.assert_allclose(padded["mu"], plain["mu"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(padded["sigma"], plain["sigma"], rtol=1e-6, atol=1e-7)


def test_dry_run_prints_config_and_params_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from difflab.build import build_model
    from difflab.config import RunConfig

    monkeypatch.chdir(tmp_path)
    cfg, last = dry_run(["--outdir", str(tmp_path / "runs")], capsys)
    assert list(tmp_path.iterdir()) == []
    model = build_model(RunConfig.from_dict(cfg))
    nparams = sum(p.numel() for p in model.parameters())
    assert f"{nparams:,} parameters" in last
    # --arch rule: the preset's own network name keeps the preset's settings, another name its own defaults
    assert cfg["network"]["model_channels"] == 32
    same, _ = dry_run(["--arch", "ddpmpp"], capsys)
    assert same["network"] == cfg["network"]
    other, last = dry_run(["--arch", "unetmini"], capsys)
    assert other["network"] == {"name": "unetmini"} and "unetmini" in last
    tuned, _ = dry_run(["--arch", "unetmini", "--model-channels", "16"], capsys)
    assert tuned["network"] == {"name": "unetmini", "model_channels": 16}


@pytest.mark.parametrize("spelling", ["1,2,2", "[1,2,2]", "1 2 2", "(1, 2, 2)"])
def test_list_options_take_every_spelling(spelling, capsys):
    import difflab
    from difflab.build import check_config

    cfg = difflab.make_config("digits-quick", network={"channel_mult": spelling})
    check_config(cfg)
    assert cfg.network["channel_mult"] == [1, 2, 2]
    got, _ = dry_run(["-o", f"network.channel_mult={spelling}"], capsys)
    assert got["network"]["channel_mult"] == [1, 2, 2]


def test_bad_list_option_is_one_line(capsys):
    import difflab
    from difflab.build import check_config

    with pytest.raises(UserError, match="channel_mult takes a list of integers, e.g. channel_mult=1,2,4"):
        check_config(difflab.make_config("digits-quick", network={"channel_mult": "1,two"}))
    assert "--attn-resolutions 4.5: network option attn_resolutions takes a list" in cli_error(
        ["train", "--attn-resolutions", "4.5", "--dry-run"], capsys)


@pytest.mark.parametrize("kw", [{"resolution": 16}, {"pad_to": 32}, {}])
def test_dataset_items_are_writable(tmp_path, kw):
    """torch.from_numpy warns "NumPy array is not writable" on read-only items (PIL resizes, memory maps)."""
    from difflab.data import open_dataset

    path, _ = npz(tmp_path, 28)
    np.save(tmp_path / "my.npy", np.load(path)["x"])  # .npy is memory-mapped
    for source in (path, tmp_path / "my.npy"):
        image = open_dataset(str(source), use_labels=False, **kw)[0][0]
        assert image.flags.writeable
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.from_numpy(image)


def test_no_progress_logs_after_the_first_step(tmp_path, capsys):
    """With --no-progress the first line comes after step 1, not after a whole tick."""
    main(["train", *TINY, "--duration", "0.032", "--tick", "0.032", "--run-dir", str(tmp_path / "r"),
          "--no-progress"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("kimg")]
    assert lines and "step       1" in lines[0]
