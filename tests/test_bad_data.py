"""Silent garbage in is refused: NaN/inf/complex arrays and absurd labels stop every command with one line,
exit 2 and nothing written; ``--nan-to`` maps non-finite values explicitly (docs/data.md "Bad values")."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest

from difflab.cli import build_parser, main
from difflab.data import open_dataset
from difflab.errors import UserError


def _nan_volume(p):
    v = np.linspace(0, 1, 48, dtype=np.float32).reshape(3, 4, 4)
    v[0, 0, 0], v[1, 2, 3], v[2, 1, 1] = np.nan, np.nan, -np.inf
    np.save(p / "vol.npy", v)
    return "vol.npy", "vol.npy: 3 of 48 values are NaN or infinite"


def _all_nan(p):
    np.save(p / "allnan.npy", np.full((3, 4, 4), np.nan, np.float32))
    return "allnan.npy", "allnan.npy: 48 of 48 values are NaN or infinite"


def _inf_stack(p):
    s = np.ones((2, 4, 4, 3))
    s[1, 0, 0, 2] = np.inf
    np.save(p / "stack.npy", s)
    return "stack.npy", "stack.npy: 1 of 96 values"


def _nan_image(p):
    np.save(p / "img.npy", np.where(np.eye(4) > 0, np.nan, 0.5))
    return "img.npy", "img.npy: 4 of 16 values"


def _nan_npz(p):
    a = np.zeros((2, 4, 4), np.float32)
    a[1, :, 0] = np.nan
    np.savez(p / "d.npz", images=a)
    return "d.npz", "d.npz[images]: 4 of 32 values"


def _complex(p):
    np.save(p / "c.npy", (np.ones((3, 4, 4)) + 1j * (np.arange(48).reshape(3, 4, 4) % 2)).astype(np.complex64))
    return "c.npy", "c.npy: complex64 array (24 of 48 values have an imaginary part)"


def _huge_label(p):
    for i in range(3):
        PIL.Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(p / f"{i}.png")
    (p / "dataset.json").write_text(json.dumps({"labels": [["0.png", 0], ["1.png", 1], ["2.png", 10**12]]}))
    return ".", "2.png: class label 1000000000000 (labels from json) is not below the number of images (3)"


def _float_labels(p):
    np.savez(p / "l.npz", images=np.zeros((2, 4, 4), np.uint8), y=np.array([0.0, 1.5]))
    return "l.npz", "label array 'y' is float64"


CASES = [_nan_volume, _all_nan, _inf_stack, _nan_image, _nan_npz, _complex, _huge_label, _float_labels]
COMMANDS = {
    "info": lambda src, out: ["dataset", "info", src],
    "convert": lambda src, out: ["dataset", "convert", "--source", src, "--dest", str(out / "o.zip"), "--quiet"],
    "train": lambda src, out: ["train", "--data", src, "--outdir", str(out / "runs"), "--duration", "0.001",
                               "--cond", "true", "--no-progress", "--device", "cpu"],
}


def files_below(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__[1:])
def test_bad_values_one_line_exit_2_nothing_written(case, command, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    name, needle = case(src)
    if command == "train" and name.endswith(".npz") and case is _float_labels:
        pytest.skip("train takes no --npy-label-key")
    argv = COMMANDS[command](str(src / name), tmp_path)
    if case is _float_labels:
        argv += ["--npy-label-key", "y"]
    before = files_below(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("difflab: error:"), err
    assert needle in lines[0], lines[0]
    assert files_below(tmp_path) == before


def window_to_uint8(v, lo, hi):
    """The documented mapping, in numpy: [lo, hi] -> [0, 255], clipped and rounded."""
    return np.rint(np.clip((np.asarray(v, np.float64) - lo) * 255 / (hi - lo), 0, 255)).astype(np.uint8)


@pytest.mark.parametrize("nan_to", [0.0, 30.0])
def test_nan_to_replaces_nan_and_both_infinities_before_the_window(tmp_path, nan_to):
    v = np.array([[[5, np.nan], [np.inf, 20]], [[-np.inf, 5], [20, 5]]], np.float32)
    np.save(tmp_path / "v.npy", v)
    ds = open_dataset(str(tmp_path / "v.npy"), nan_to=nan_to)
    got = np.stack([ds[k][0][0] for k in range(2)])
    filled = np.where(np.isfinite(v), v, nan_to)
    lo, hi = min(5.0, nan_to), max(20.0, nan_to)  # the replaced values take part in the volume's min/max
    np.testing.assert_array_equal(got, window_to_uint8(filled, lo, hi))
    assert got[0, 0, 1] == got[0, 1, 0] == got[1, 0, 0] == (0 if nan_to == 0 else 255)
    fixed = open_dataset(str(tmp_path / "v.npy"), nan_to=100.0, npy_range=(0, 10))
    assert fixed[0][0][0, 0, 1] == 255 and fixed[0][0][0, 0, 0] == window_to_uint8(5, 0, 10)


def test_nan_to_on_the_command_lines(tmp_path, capsys):
    v = np.arange(32, dtype=np.float64).reshape(2, 4, 4)
    v[0, 0, 0] = np.nan
    np.save(tmp_path / "v.npy", v)
    main(["dataset", "convert", "--source", str(tmp_path / "v.npy"), "--dest", str(tmp_path / "o"), "--quiet",
          "--nan-to", "31"])
    img = np.asarray(PIL.Image.open(tmp_path / "o" / "00000" / "img00000000.png"))
    assert img[0, 0] == 255 and img[0, 1] == window_to_uint8(1, 1, 31)
    with pytest.raises(SystemExit):
        main(["dataset", "info", str(tmp_path / "v.npy"), "--nan-to", "nan"])
    assert "--nan-to nan: must be a finite number" in capsys.readouterr().err
    from difflab.train.cli import config_from_args

    args, extra = build_parser().parse_known_args(["train", "--data", str(tmp_path / "v.npy"), "--nan-to=-5"])
    assert config_from_args(args, extra).data["nan_to"] == -5.0


def test_float_tiff_with_nan_is_refused_when_read_or_mapped(tmp_path):
    img = np.full((4, 4), 100.0, np.float32)
    img[0, :2] = np.nan
    PIL.Image.fromarray(img, mode="F").save(tmp_path / "a.tif")
    ds = open_dataset(str(tmp_path))
    with pytest.raises(UserError, match=r"a.tif: 2 of 16 values are NaN or infinite"):
        ds[0]
    mapped = open_dataset(str(tmp_path), nan_to=255.0)[0][0]
    assert mapped[0, 0, 0] == 255 and mapped[0, 1, 1] == 100


def test_label_count_is_bounded_by_the_images_or_the_named_classes(tmp_path):
    for i in range(3):
        PIL.Image.fromarray(np.full((4, 4), i, np.uint8)).save(tmp_path / f"{i}.png")
    meta = tmp_path / "dataset.json"
    meta.write_text(json.dumps({"labels": [["0.png", 0], ["1.png", 2], ["2.png", 2]]}))
    assert open_dataset(str(tmp_path)).label_dim == 3
    meta.write_text(json.dumps({"labels": [["0.png", 0], ["1.png", 3], ["2.png", 2]]}))
    with pytest.raises(UserError, match=r"1.png: class label 3 .* number of images \(3\)"):
        open_dataset(str(tmp_path))
    names = ["a", "b", "c", "d", "e"]  # classes named in dataset.json may outnumber the images
    meta.write_text(json.dumps({"labels": [["0.png", 0], ["1.png", 4], ["2.png", 2]], "label_names": names}))
    ds = open_dataset(str(tmp_path))
    assert ds.label_dim == 5 and ds.label_counts.tolist() == [1, 0, 1, 0, 1]
