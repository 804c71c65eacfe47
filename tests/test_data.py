"""Data layer: sources, labels, NPY/NPZ rules, built-ins and their errors (docs/data.md)."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from difflab.data import check_resolution, open_dataset
from difflab.errors import UserError


def save_png(path, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(arr).save(path)


def random_images(n: int, h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    shape = (n, h, w, c) if c == 3 else (n, h, w)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def chw(img: np.ndarray) -> np.ndarray:
    return img.transpose(2, 0, 1) if img.ndim == 3 else img[None]


# ---- image folders and zips --------------------------------------------------------------------------


def test_folder_labels_from_top_level_folders_pixel_exact(tmp_path):
    imgs = random_images(6, 8, 8)
    classes = ["dog", "cat", "dog", "bird", "cat", "dog"]
    for i, (img, cls) in enumerate(zip(imgs, classes)):
        save_png(tmp_path / cls / f"sub/{i}.png", img)
    ds = open_dataset(str(tmp_path))
    assert len(ds) == 6 and ds.num_channels == 3 and ds.resolution == 8
    assert ds.label_names == ["bird", "cat", "dog"] and ds.label_dim == 3 and ds.has_labels
    seen = {}
    for k in range(len(ds)):
        img, label, idx = ds[k]
        assert img.dtype == np.uint8 and img.shape == (3, 8, 8) and idx == k
        i = int(os.path.basename(ds.where(k))[:-4])
        np.testing.assert_array_equal(img, chw(imgs[i]))
        assert ds.label_names[label] == classes[i]
        seen[i] = label
    assert sorted(seen) == list(range(6))
    np.testing.assert_array_equal(ds.labels, [ds[k][1] for k in range(6)])


def test_prefix_labels_dddm_style_and_single_prefix_is_unlabelled(tmp_path):
    imgs = random_images(4, 4, 4, c=1)
    for name, img in zip(["cat_1.png", "dog_2.png", "cat_3.png", "dog_x_4.png"], imgs):
        save_png(tmp_path / "a" / name, img)
    ds = open_dataset(str(tmp_path / "a"))
    assert ds.label_names == ["cat", "dog"]
    assert list(ds.labels) == [0, 0, 1, 1]  # sorted: cat_1, cat_3, dog_2, dog_x_4
    assert ds.num_channels == 1
    for name, img in zip(["img_1.png", "img_2.png"], imgs):
        save_png(tmp_path / "b" / name, img)
    ds = open_dataset(str(tmp_path / "b"))
    assert not ds.has_labels and ds.label_dim == 0 and list(ds.labels) == [-1, -1]
    ds = open_dataset(str(tmp_path / "a"), use_labels=False)
    assert not ds.has_labels and ds[0][1] == -1


def test_dataset_json_labels_win_and_mismatch_is_named(tmp_path):
    imgs = random_images(3, 4, 4)
    names = ["x/a.png", "y/b.png", "y/c.png"]
    for n, img in zip(names, imgs):
        save_png(tmp_path / n, img)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [[n, 2 - k] for k, n in enumerate(names)]}))
    ds = open_dataset(str(tmp_path))
    assert list(ds.labels) == [2, 1, 0] and ds.label_dim == 3
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [[n, 1] for n in names[:2]]}))
    with pytest.raises(UserError, match="y/c.png"):
        open_dataset(str(tmp_path))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [[n, 1] for n in names + ["z.png"]]}))
    with pytest.raises(UserError, match="z.png"):
        open_dataset(str(tmp_path))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": None}))
    assert not open_dataset(str(tmp_path)).has_labels  # null overrides the folder rule


def test_edm_layout_folders_are_not_classes(tmp_path):
    imgs = random_images(2, 4, 4)
    save_png(tmp_path / "00000" / "img00000000.png", imgs[0])
    save_png(tmp_path / "00001" / "img00001000.png", imgs[1])
    assert not open_dataset(str(tmp_path)).has_labels
    save_png(tmp_path / "g" / "000000" / "000999.png", imgs[0])  # generate --subdirs
    save_png(tmp_path / "g" / "001000" / "001000.png", imgs[1])
    assert not open_dataset(str(tmp_path / "g")).has_labels
    save_png(tmp_path / "m" / "0" / "5.png", imgs[0])  # class folders with numeric names stay classes
    save_png(tmp_path / "m" / "1" / "6.png", imgs[1])
    assert open_dataset(str(tmp_path / "m")).label_names == ["0", "1"]


def test_zip_source_in_dataloader_workers(tmp_path):
    imgs = random_images(8, 4, 4)
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i, img in enumerate(imgs):
            buf = io.BytesIO()
            PIL.Image.fromarray(img).save(buf, format="png")
            zf.writestr(f"{i % 2}/{i}.png", buf.getvalue())
    ds = open_dataset(str(path))
    assert ds.name == "d" and ds.label_dim == 2
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    got = torch.cat([b[0] for b in loader])
    order = [int(os.path.basename(n)[:-4]) for n in ds.source.names]
    np.testing.assert_array_equal(got.numpy(), imgs[order].transpose(0, 3, 1, 2))


def test_resize_channels_and_noncentre_crop(tmp_path):
    img = random_images(1, 8, 12)[0]  # 12 wide, 8 high
    save_png(tmp_path / "a.png", img)
    save_png(tmp_path / "b.png", img[:, 2:10])
    with pytest.raises(UserError, match="a.png"):
        open_dataset(str(tmp_path))  # mixed sizes, no resolution: names a file
    ds = open_dataset(str(tmp_path), resolution=8)
    # Non-square is centre-cropped, never stretched: both files become the same 8x8 image.
    np.testing.assert_array_equal(ds[0][0], ds[1][0])
    np.testing.assert_array_equal(ds[1][0], chw(img[:, 2:10]))
    gray = open_dataset(str(tmp_path), resolution=8, channels=1)[1][0]
    expected = np.asarray(PIL.Image.fromarray(img[:, 2:10]).convert("L"))
    np.testing.assert_array_equal(gray[0], expected)
    small = open_dataset(str(tmp_path), resolution=4)[1][0]
    lanczos = np.asarray(PIL.Image.fromarray(img[:, 2:10]).resize((4, 4), PIL.Image.LANCZOS))
    np.testing.assert_array_equal(small, chw(lanczos))
    g = random_images(1, 4, 4, c=1)[0]
    save_png(tmp_path / "g" / "a.png", g)
    rgb = open_dataset(str(tmp_path / "g"), channels=3)[0][0]
    assert rgb.shape == (3, 4, 4) and all((rgb[k] == g).all() for k in range(3))


def test_bad_inputs_name_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        open_dataset(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="not found"):
        open_dataset(str(tmp_path / "nope"))
    (tmp_path / "bad").mkdir()
    save_png(tmp_path / "bad" / "ok.png", random_images(1, 4, 4)[0])
    (tmp_path / "bad" / "zz.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError, match="zz.png"):
        open_dataset(str(tmp_path / "bad"))
    with pytest.raises(UserError, match="zz.png"):  # lazily decoded when a resolution is given
        ds = open_dataset(str(tmp_path / "bad"), resolution=4)
        [ds[i] for i in range(len(ds))]
    save_png(tmp_path / "ns" / "a.png", random_images(1, 4, 6)[0])
    with pytest.raises(UserError, match="not square"):
        open_dataset(str(tmp_path / "ns"))


def test_check_resolution():
    assert check_resolution(32) == 32 and check_resolution((8, 8)) == 8
    for bad in (0, 24, 33, (32, 16)):
        with pytest.raises(UserError, match="--resolution"):
            check_resolution(bad)


def test_subset_xflip_and_mean_image(tmp_path):
    ds_full = open_dataset("digits")
    ds = open_dataset("digits", max_size=100, random_seed=3)
    again = open_dataset("digits", max_size=100, random_seed=3)
    assert len(ds) == 100
    np.testing.assert_array_equal(ds.labels, again.labels)
    full = np.stack([ds_full[i][0] for i in range(len(ds_full))])
    picked = [int(ds.where(i).split("[")[1][:-1]) for i in range(100)]
    assert picked == sorted(set(picked))
    np.testing.assert_array_equal(ds[5][0], full[picked[5]])
    flipped = open_dataset("digits", xflip=True)
    n = len(ds_full)
    assert len(flipped) == 2 * n and flipped[n + 4][2] == n + 4
    np.testing.assert_array_equal(flipped[n + 4][0], full[4][:, :, ::-1])
    assert flipped[n + 4][1] == flipped[4][1]
    np.testing.assert_allclose(ds_full.mean_image(), full.mean(0, dtype=np.float64))
    np.testing.assert_allclose(flipped.mean_image(), np.concatenate([full, full[..., ::-1]]).mean(0))


def test_mean_image_lazy_source_matches_brute_force(tmp_path):
    imgs = random_images(5, 4, 4)
    for i, img in enumerate(imgs):
        save_png(tmp_path / f"{i}.png", img)
    ds = open_dataset(str(tmp_path))
    m = ds.mean_image()
    assert m.dtype == np.float64 and m.shape == (3, 4, 4)
    np.testing.assert_allclose(m, imgs.transpose(0, 3, 1, 2).mean(0))


# ---- NPY / NPZ ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_npy_volume_slicing_along_each_axis(tmp_path, axis):
    vol = np.random.default_rng(1).normal(size=(4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "v.npy", vol)
    res = None if axis == 0 else 8
    ds = open_dataset(str(tmp_path / "v.npy"), npy_axis=axis, resolution=res)
    assert len(ds) == vol.shape[axis]
    assert ds[0][0].shape == (1, 8, 8)
    if axis == 0:  # per-volume min/max window, no resize: exact
        lo, hi = vol.min(), vol.max()
        expected = np.clip(np.rint((vol[2] - lo) * 255 / (hi - lo)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(ds[2][0][0], expected)
        assert min(ds[k][0].min() for k in range(4)) == 0 and max(ds[k][0].max() for k in range(4)) == 255
    if axis in (1, 2, -1):
        with pytest.raises(UserError, match="not square"):
            open_dataset(str(tmp_path / "v.npy"), npy_axis=axis)


def test_npy_window_uint8_passthrough_and_2d(tmp_path):
    ct = np.array([[-2000, -1000, 0], [500, 1000, 3000], [0, 0, 0]], dtype=np.int16)
    np.save(tmp_path / "ct.npy", ct)
    img = open_dataset(str(tmp_path / "ct.npy"), npy_range=(-1000, 1000))[0][0][0]
    np.testing.assert_array_equal(img[:2], [[0, 0, 128], [191, 255, 255]])
    u8 = np.arange(9, dtype=np.uint8).reshape(3, 3)
    np.save(tmp_path / "u8.npy", u8)
    item = open_dataset(str(tmp_path / "u8.npy"))[0][0]
    np.testing.assert_array_equal(item[0], u8)
    assert item.flags.writeable and item.flags.c_contiguous  # not a view of the read-only memory map
    with pytest.raises(UserError, match="LO < HI"):
        open_dataset(str(tmp_path / "ct.npy"), npy_range=(5, 5))
    with pytest.raises(UserError, match="--npy-axis 3"):
        np.save(tmp_path / "vol.npy", np.zeros((2, 3, 3)))
        open_dataset(str(tmp_path / "vol.npy"), npy_axis=3)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_npy_4d_stacks_detect_channels(tmp_path, layout):
    imgs = random_images(5, 8, 8)  # NHWC
    arr = imgs if layout == "nhwc" else imgs.transpose(0, 3, 1, 2)
    np.save(tmp_path / "s.npy", arr)
    ds = open_dataset(str(tmp_path / "s.npy"))
    assert len(ds) == 5 and ds.num_channels == 3
    for k in range(5):
        np.testing.assert_array_equal(ds[k][0], chw(imgs[k]))
    gray = random_images(3, 8, 8, c=1)[:, None]  # [N,1,H,W]
    np.save(tmp_path / "g.npy", gray)
    ds = open_dataset(str(tmp_path / "g.npy"))
    assert ds.num_channels == 1 and len(ds) == 3
    np.testing.assert_array_equal(ds[2][0], gray[2])
    np.save(tmp_path / "bad.npy", np.zeros((2, 5, 8, 8), dtype=np.uint8))
    with pytest.raises(UserError, match="--npy-layout"):
        open_dataset(str(tmp_path / "bad.npy"))


def test_npz_key_selection_and_labels(tmp_path):
    a = random_images(4, 4, 4)
    b = random_images(2, 4, 4, seed=5)
    np.savez_compressed(tmp_path / "z.npz", first=a, second=b, labels=np.array([1, 0]))
    with pytest.raises(UserError, match="4 images"):  # labels sized for 'second' only
        open_dataset(str(tmp_path / "z.npz"))
    ds = open_dataset(str(tmp_path / "z.npz"), use_labels=False)
    assert len(ds) == 4
    np.testing.assert_array_equal(ds[1][0], chw(a[1]))
    ds = open_dataset(str(tmp_path / "z.npz"), npy_key="second")
    assert len(ds) == 2 and list(ds.labels) == [1, 0] and ds.label_dim == 2
    np.testing.assert_array_equal(ds[0][0], chw(b[0]))
    with pytest.raises(UserError, match="'third'"):
        open_dataset(str(tmp_path / "z.npz"), npy_key="third")
    np.savez(tmp_path / "samples_2x4x4x3.npz", b, np.array([1, 0]))  # improved-diffusion sample file
    ds = open_dataset(str(tmp_path / "samples_2x4x4x3.npz"))
    assert list(ds.labels) == [1, 0]
    np.testing.assert_array_equal(ds[1][0], chw(b[1]))


def test_npy_folder_labels_and_mixed_sizes(tmp_path):
    for cls, n in (("ct", 3), ("mr", 2)):
        (tmp_path / "d" / cls).mkdir(parents=True)
        np.save(tmp_path / "d" / cls / "v.npy", np.random.default_rng(n).normal(size=(n, 4, 4)))
    ds = open_dataset(str(tmp_path / "d"))
    assert len(ds) == 5 and list(ds.labels) == [0, 0, 0, 1, 1] and ds.label_names == ["ct", "mr"]
    np.save(tmp_path / "d" / "mr" / "w.npy", np.zeros((1, 8, 8)))
    with pytest.raises(UserError, match="w.npy"):
        open_dataset(str(tmp_path / "d"))
    assert open_dataset(str(tmp_path / "d"), resolution=4)[5][0].shape == (1, 4, 4)


# ---- built-ins --------------------------------------------------------------------------------------


def test_digits():
    from sklearn.datasets import load_digits

    ds = open_dataset("digits")
    assert len(ds) == 1797 and ds.label_dim == 10 and ds.num_channels == 1 and ds.resolution == 8
    raw = load_digits()
    np.testing.assert_array_equal(ds.labels, raw.target)
    np.testing.assert_array_equal(ds[10][0][0], np.rint(raw.images[10] * 255 / 16).astype(np.uint8))
    assert np.bincount(ds.labels).tolist() == np.bincount(raw.target).tolist()
    up = open_dataset("digits", resolution=32, max_size=10)
    assert up[0][0].shape == (1, 32, 32) and up._images is not None


def _write_idx(path, arr: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_mnist_idx_reader_pads_to_32(tmp_path):
    imgs = random_images(5, 28, 28, c=1)
    labels = np.array([3, 1, 4, 1, 5])
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs, 2051)
    ds_nolab = open_dataset(str(tmp_path / "train-images-idx3-ubyte.gz"), use_labels=False)
    assert not ds_nolab.has_labels
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.gz"):
        open_dataset(str(tmp_path / "train-images-idx3-ubyte.gz"))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, 2049)
    for src in (tmp_path / "train-images-idx3-ubyte.gz", tmp_path):
        ds = open_dataset(str(src))
        assert len(ds) == 5 and ds.resolution == 32 and ds.num_channels == 1
        np.testing.assert_array_equal(ds.labels, labels)
        img = ds[2][0][0]
        np.testing.assert_array_equal(img[2:30, 2:30], imgs[2])
        assert img[:2].sum() == img[30:].sum() == img[:, :2].sum() == img[:, 30:].sum() == 0
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels[:4], 2049)
    with pytest.raises(UserError, match="4 labels for 5 images"):
        open_dataset(str(tmp_path))


def _cifar_tarball(path, per_batch: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images, labels = [], []
    with tarfile.open(path, "w:gz") as tar:

        def add(name, obj):
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for k in range(1, 6):
            data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            labs = rng.integers(0, 10, size=per_batch).tolist()
            add(f"data_batch_{k}", {b"data": data, b"labels": labs, b"batch_label": b"x"})
            images.append(data)
            labels += labs
        add("batches.meta", {b"label_names": [f"c{k}".encode() for k in range(10)]})
    return np.concatenate(images).reshape(-1, 3, 32, 32), np.array(labels)


def test_cifar10_tarball_reader(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    images, labels = _cifar_tarball(path)
    ds = open_dataset(str(path))
    assert len(ds) == 10 and ds.label_dim == 10 and ds.num_channels == 3 and ds.resolution == 32
    assert ds.label_names == [f"c{k}" for k in range(10)]
    np.testing.assert_array_equal(ds.labels, labels)
    for k in (0, 3, 9):
        np.testing.assert_array_equal(ds[k][0], images[k])


def test_cifar10_refuses_code_in_pickles(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        data = pickle.dumps({b"data": os.getcwd, b"labels": []})  # a global the reader must not resolve
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match="data_batch_1"):
        open_dataset(str(path))


def test_open_kwargs_reopen_the_same_dataset_through_json(tmp_path):
    vol = np.random.default_rng(2).normal(size=(3, 8, 8))
    np.save(tmp_path / "v.npy", vol)
    ds = open_dataset(tmp_path / "v.npy", resolution=4, npy_range=(-1, 1), channels=3, xflip=True)
    again = open_dataset(**json.loads(json.dumps(ds.open_kwargs)))
    assert len(again) == len(ds) == 6
    for k in range(6):
        np.testing.assert_array_equal(again[k][0], ds[k][0])


def test_cache_returns_the_same_images(tmp_path):
    imgs = random_images(3, 4, 4)
    for i, img in enumerate(imgs):
        save_png(tmp_path / f"{i}.png", img)
    ds = open_dataset(str(tmp_path), cache=True)
    first = [ds[k][0].copy() for k in range(3)]
    for f in tmp_path.glob("*.png"):
        f.unlink()  # served from memory now
    for k in range(3):
        np.testing.assert_array_equal(ds[k][0], first[k])
        np.testing.assert_array_equal(first[k], chw(imgs[k]))


def test_items_are_copies_of_the_in_memory_store():
    ds = open_dataset("digits", max_size=4)
    img = ds[0][0]
    before = img.copy()
    assert before.any()
    img[:] = 0
    np.testing.assert_array_equal(ds[0][0], before)


def test_size_check_backstop_when_headers_are_sampled(tmp_path, monkeypatch):
    from difflab.data.sources import FileSource

    imgs = random_images(5, 4, 4)
    for i, img in enumerate(imgs):
        save_png(tmp_path / f"{i}.png", img if i != 2 else random_images(1, 8, 8)[0])
    src = FileSource(str(tmp_path))
    assert src.uniform_shape(max_checks=2) == (4, 4, 3)  # samples items 1 and 4: misses 2.png
    with pytest.raises(UserError, match="2.png"):
        src.uniform_shape()
    monkeypatch.setattr(FileSource, "uniform_shape", lambda self, max_checks=2000: self.shape(0))
    ds = open_dataset(str(tmp_path))
    assert ds[1][0].shape == (3, 4, 4)
    with pytest.raises(UserError, match="2.png"):
        ds[2]


def test_in_memory_dataset_pickles_without_the_raw_array():
    import pickle as pk

    ds = open_dataset("digits", resolution=16, max_size=50)
    clone = pk.loads(pk.dumps(ds))
    assert len(pk.dumps(ds)) < ds.source.images.nbytes / 2  # 1797 raw 8x8 images stay behind
    for k in (0, 49):
        np.testing.assert_array_equal(clone[k][0], ds[k][0])
    assert clone.where(3) == ds.where(3) and clone.mean_image().shape == (1, 16, 16)


def test_16bit_gray_and_rgba_pngs(tmp_path):
    a16 = (np.arange(16).reshape(4, 4) * 4000).astype(np.uint16)
    save_png(tmp_path / "g" / "a.png", a16)
    img = open_dataset(str(tmp_path / "g"))[0][0]
    np.testing.assert_array_equal(img[0], np.rint(a16 / 257).astype(np.uint8))  # 65535 -> 255
    rgba = random_images(1, 4, 4, c=3)[0]
    rgba = np.concatenate([rgba, np.full((4, 4, 1), 7, np.uint8)], axis=2)
    save_png(tmp_path / "c" / "a.png", rgba)
    ds = open_dataset(str(tmp_path / "c"))
    assert ds.num_channels == 3
    np.testing.assert_array_equal(ds[0][0], chw(rgba[:, :, :3]))
