"""`difflab dataset convert|info`: EDM's layout, round trips and refusals (specs §5.7)."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest

from difflab.cli import main
from difflab.data import ImageDataset, open_dataset, open_source
from difflab.data.dataset_tool import archive_name, convert_dataset, dataset_info
from difflab.errors import UserError


def make_folder(root, n=7, size=8, seed=0, gray=False):
    rng = np.random.default_rng(seed)
    imgs, labels = {}, {}
    for i in range(n):
        cls = ["a", "b", "c"][i % 3]
        shape = (size, size) if gray else (size, size, 3)
        img = rng.integers(0, 256, size=shape, dtype=np.uint8)
        rel = f"{cls}/{i:02d}.png"
        os.makedirs(root / cls, exist_ok=True)
        PIL.Image.fromarray(img).save(root / rel)
        imgs[rel], labels[rel] = img, "abc".index(cls)
    return imgs, labels


def test_archive_names_follow_edm():
    assert archive_name(0) == "00000/img00000000.png"
    assert archive_name(123456) == "00123/img00123456.png"


@pytest.mark.parametrize("ext", [".zip", ""])
def test_round_trip_keeps_every_pixel_and_label(tmp_path, ext):
    imgs, labels = make_folder(tmp_path / "src")
    src = open_dataset(str(tmp_path / "src"))
    dest = tmp_path / f"out{ext}"
    assert convert_dataset(str(tmp_path / "src"), str(dest), progress=False) == 7
    out = open_dataset(str(dest))
    assert len(out) == len(src) == 7 and out.label_dim == 3 and out.label_names == ["a", "b", "c"]
    for k in range(7):
        np.testing.assert_array_equal(out[k][0], src[k][0])
        assert out[k][1] == src[k][1] == labels[src.source.names[k]]
    if ext:
        with zipfile.ZipFile(dest) as zf:
            names = zf.namelist()
            assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
            meta = json.loads(zf.read("dataset.json"))
    else:
        names = [
            os.path.relpath(os.path.join(d, f), dest).replace(os.sep, "/") for d, _, fs in os.walk(dest) for f in fs
        ]
        meta = json.loads((dest / "dataset.json").read_text())
    assert sorted(n for n in names if n.endswith(".png")) == [archive_name(i) for i in range(7)]
    assert meta["labels"] == [[archive_name(k), int(src[k][1])] for k in range(7)]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_unlabelled_source_writes_null_labels_and_resizes(tmp_path):
    dest = tmp_path / "d.zip"
    convert_dataset("digits", str(dest), resolution="16x16", max_images=5, progress=False, label_rule="none")
    with zipfile.ZipFile(dest) as zf:
        assert json.loads(zf.read("dataset.json"))["labels"] is None
    out = open_dataset(str(dest))
    assert len(out) == 5 and out.resolution == 16 and out.num_channels == 1 and not out.has_labels
    first5 = ImageDataset(open_source("digits"), size=(16, 16), max_size=5, subset="first")
    for k in range(5):  # --max-images keeps the first N (in order), PNG is lossless
        np.testing.assert_array_equal(out[k][0], first5[k][0])


def test_transforms(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(16, 32, 3), dtype=np.uint8)  # 32 wide, 16 high
    (tmp_path / "s").mkdir()
    PIL.Image.fromarray(img).save(tmp_path / "s" / "x.png")
    convert_dataset(
        str(tmp_path / "s"), str(tmp_path / "c"), resolution="16x16", transform="center-crop", progress=False
    )
    np.testing.assert_array_equal(open_dataset(str(tmp_path / "c"))[0][0], img[:, 8:24].transpose(2, 0, 1))
    convert_dataset(
        str(tmp_path / "s"),
        str(tmp_path / "w"),
        resolution="16x8",
        transform="center-crop-wide",
        progress=False,
    )
    wide = open_dataset(str(tmp_path / "w"))[0][0]
    assert wide.shape == (3, 16, 16)
    assert wide[:, :4].sum() == 0 and wide[:, 12:].sum() == 0  # 16x8 band centred, zero padding around
    expect = np.asarray(PIL.Image.fromarray(img).resize((16, 8), PIL.Image.LANCZOS)).transpose(2, 0, 1)
    np.testing.assert_array_equal(wide[:, 4:12], expect)


def test_refusals(tmp_path):
    make_folder(tmp_path / "src")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        convert_dataset(str(tmp_path / "src"), str(tmp_path / "busy"), progress=False)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "precious"
    (tmp_path / "old.zip").write_bytes(b"x")
    with pytest.raises(UserError, match="already exists"):
        convert_dataset(str(tmp_path / "src"), str(tmp_path / "old.zip"), progress=False)
    assert (tmp_path / "old.zip").read_bytes() == b"x"
    with pytest.raises(UserError, match="power of two"):
        convert_dataset(str(tmp_path / "src"), str(tmp_path / "o1.zip"), resolution="24x24", progress=False)
    with pytest.raises(UserError, match="not square"):
        convert_dataset(str(tmp_path / "src"), str(tmp_path / "o2.zip"), resolution="16x8", progress=False)
    with pytest.raises(UserError, match="needs --resolution"):
        convert_dataset(str(tmp_path / "src"), str(tmp_path / "o3.zip"), transform="center-crop", progress=False)
    make_folder(tmp_path / "odd", size=12)
    with pytest.raises(UserError, match="power of two"):  # native 12x12 is refused too
        convert_dataset(str(tmp_path / "odd"), str(tmp_path / "o4.zip"), progress=False)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o") and p not in ("odd", "old.zip")]


def test_failure_midway_leaves_nothing(tmp_path):
    make_folder(tmp_path / "src")
    (tmp_path / "src" / "c" / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # corrupt, sorts last
    for dest in ("out.zip", "out"):
        with pytest.raises(UserError, match="zz.png"):
            convert_dataset(str(tmp_path / "src"), str(tmp_path / dest), resolution="8x8", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_npy_volume_converts(tmp_path):
    vol = np.random.default_rng(0).normal(size=(8, 6, 8))
    np.save(tmp_path / "v.npy", vol)
    convert_dataset(str(tmp_path / "v.npy"), str(tmp_path / "o.zip"), resolution="4x4", npy_axis=1, progress=False)
    out = open_dataset(str(tmp_path / "o.zip"))
    assert len(out) == 6 and out[0][0].shape == (1, 4, 4)
    direct = open_dataset(str(tmp_path / "v.npy"), npy_axis=1, resolution=4)
    np.testing.assert_array_equal(out[3][0], direct[3][0])


def test_cli_convert_and_info(tmp_path, capsys):
    make_folder(tmp_path / "src", gray=True)
    main(
        [
            "dataset",
            "convert",
            "--source",
            str(tmp_path / "src"),
            "--dest",
            str(tmp_path / "o.zip"),
            "--quiet",
        ]
    )
    assert "wrote 7 images" in capsys.readouterr().out
    main(["dataset", "info", str(tmp_path / "o.zip")])
    out = capsys.readouterr().out
    assert "images      7" in out and "3 classes" in out and "1x8x8" in out
    main(["dataset", "info", "digits", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 1797 and info["label_dim"] == 10 and sum(info["label_counts"]) == 1797
    with pytest.raises(SystemExit) as e:
        main(["dataset", "convert", "--source", str(tmp_path / "src"), "--dest", str(tmp_path / "o.zip")])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    np.save(tmp_path / "ct.npy", np.zeros((3, 4, 4), dtype=np.int16))
    main(["dataset", "info", str(tmp_path / "ct.npy"), "--npy_slice_axis", "0", "--npy-range=-1000,1000"])
    assert "images      3" in capsys.readouterr().out


def test_info_reads_headers_only(tmp_path):
    make_folder(tmp_path / "src", n=4)
    info = dataset_info(str(tmp_path / "src"))
    assert info["images"] == 4 and info["label_counts"] == [2, 1, 1] and info["resolution"] == "8x8"
