"""Raw data sources: where images come from, before resizing and channel adaptation.

A source knows how many items it has, their labels, a cheap per-item shape and how to load one
item as ``[H, W, C]`` (uint8, or float32 in ``[0, 255]``). :class:`~difflab.data.datasets.ImageDataset`
does everything else. File handles (zip archives, memory maps) are opened lazily per process, so a
source pickles cleanly into DataLoader workers and each worker opens its own handle.
"""

from __future__ import annotations

import os
import posixpath
import zipfile
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from difflab.data.images import (
    check_finite,
    decode_image,
    is_image_name,
    nonfinite_message,
    peek_image,
    window_to_uint8_range,
)
from difflab.data.labels import _MISSING, assign_labels, parse_dataset_json
from difflab.errors import UserError

NPY_EXTENSIONS = (".npy", ".npz")
# `difflab generate` writes {seed:06d}.png, a montage grid.png and its settings in generate.json.
GENERATE_MANIFEST = "generate.json"
GENERATE_GRID = "grid.png"
_SCAN_BLOCK = 1 << 22  # values per block when scanning an array for NaN/inf and its min/max
NPY_LAYOUTS = ("auto", "volume", "hw", "hwc", "chw", "nchw", "nhwc")
# 1-D integer arrays under these names are labels; arr_1 is improved-diffusion's np.savez(images, labels).
NPZ_LABEL_KEYS = ("labels", "label", "y", "arr_1")


class Source:
    """Base class; subclasses fill the attributes and implement :meth:`load` and :meth:`shape`."""

    name: str = "dataset"
    kind: str = "source"
    names: list[str]
    labels: np.ndarray
    label_names: list[str] | None = None
    label_rule: str = "none"

    def __len__(self) -> int:
        return len(self.names)

    def where(self, i: int) -> str:
        return self.names[i]

    def shape(self, i: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def load(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def uniform_shape(self, max_checks: int = 2000, fix: str | None = None) -> tuple[int, int, int]:
        """The ``(H, W, C)`` shared by the items, or UserError naming the first item that differs (and
        ``fix``, what to do about it, if given).

        Reads headers only. Large sources check an evenly spaced sample of ``max_checks`` items so
        opening stays fast; the dataset re-checks every image's size when it is loaded."""
        h, w, _ = first = self.shape(0)
        n = len(self)
        picks = range(1, n) if n <= max_checks else np.unique(np.linspace(1, n - 1, max_checks).astype(int))
        for i in picks:
            i = int(i)
            hi, wi, _ = self.shape(i)
            if (hi, wi) != (h, w):
                raise UserError(
                    f"{self.where(i)} is {wi}x{hi} but {self.where(0)} is {w}x{h}; "
                    + (fix or "images of mixed sizes need --resolution (and optionally --transform center-crop)")
                )
        return first

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_handle", "_cache"):
            state.pop(key, None)
        return state


class ArraySource(Source):
    """Images held in memory as one uint8 array ``[N, H, W, C]`` (digits, MNIST, CIFAR-10)."""

    kind = "array"

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        name: str,
        label_names: list[str] | None = None,
        kind: str = "array",
    ):
        assert images.ndim == 4 and images.dtype == np.uint8
        self.images = images
        self.name = name
        self.kind = kind
        self.count = len(images)
        if labels is None:
            self.labels = np.full(len(images), -1, dtype=np.int64)
        else:
            self.labels = np.asarray(labels, dtype=np.int64)
            self.label_names = label_names
            self.label_rule = kind

    def __len__(self) -> int:
        return self.count

    def where(self, i: int) -> str:
        return f"{self.name}[{i}]"

    def shape(self, i: int) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def uniform_shape(self, max_checks: int = 2000, fix: str | None = None) -> tuple[int, int, int]:
        return self.shape(0)

    def load(self, i: int) -> np.ndarray:
        return self.images[i]


class FileSource(Source):
    """Image files in a folder (recursive) or a zip archive; labels per :mod:`difflab.data.labels`."""

    def __init__(self, path: str, label_rule: str = "auto", nan_to: float | None = None):
        self.path = os.fspath(path)
        self.nan_to = check_nan_to(nan_to)
        self.is_zip = os.path.isfile(self.path)
        self.kind = "zip" if self.is_zip else "folder"
        self.name = os.path.splitext(os.path.basename(os.path.normpath(self.path)))[0]
        self._pid = None
        if self.is_zip:
            try:
                with zipfile.ZipFile(self.path) as zf:
                    members = zf.namelist()
                    meta = zf.read("dataset.json") if "dataset.json" in members else None
            except (zipfile.BadZipFile, OSError) as e:
                raise UserError(f"{self.path}: not a readable zip archive ({e})") from None
            files = [m for m in members if not m.endswith("/") and not _hidden(m)]
        else:
            files = list_files(self.path)
            meta_path = os.path.join(self.path, "dataset.json")
            meta = open(meta_path, "rb").read() if os.path.isfile(meta_path) else None
        if GENERATE_MANIFEST in files:  # a `difflab generate` folder: its montage is not one of the samples
            files = [f for f in files if f != GENERATE_GRID]
        self.names = sorted(f for f in files if is_image_name(f))
        if not self.names:
            raise UserError(f"{self.path}: no images found (looked for .png/.jpg/.jpeg/.bmp/.webp...)")
        dataset_json = _MISSING if meta is None else parse_dataset_json(meta, f"{self.path}/dataset.json")
        self.labels, self.label_names, self.label_rule = assign_labels(
            self.names, dataset_json, label_rule, where=self.path
        )

    def where(self, i: int) -> str:
        return f"{self.path}:{self.names[i]}" if self.is_zip else os.path.join(self.path, self.names[i])

    def _zip(self) -> zipfile.ZipFile:
        # One handle per process: a handle inherited through fork is shared state and breaks workers.
        if getattr(self, "_handle", None) is None or self._pid != os.getpid():
            self._handle = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._handle

    def _open(self, i: int):
        return self._zip().open(self.names[i], "r") if self.is_zip else open(self.where(i), "rb")

    def shape(self, i: int) -> tuple[int, int, int]:
        with self._open(i) as f:
            return peek_image(f, self.where(i))

    def load(self, i: int) -> np.ndarray:
        with self._open(i) as f:
            data = f.read()
        return decode_image(data, self.where(i), self.nan_to)


def check_nan_to(value: float | None) -> float | None:
    if value is None:
        return None
    if not np.isfinite(float(value)):
        raise UserError(f"--nan-to {value}: must be a finite number, e.g. --nan-to 0 or --nan-to=-1000")
    return float(value)


def _hidden(relpath: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in relpath.split("/"))


def list_files(root: str) -> list[str]:
    """All non-hidden files below ``root`` as sorted posix relative paths."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        rel = os.path.relpath(dirpath, root)
        for f in filenames:
            if not f.startswith("."):
                out.append(f if rel == "." else posixpath.join(rel.replace(os.sep, "/"), f))
    return sorted(out)


# ---- NPY / NPZ ------------------------------------------------------------------------------------


@dataclass
class _Array:
    """One array inside a .npy or .npz file and how it splits into 2-D images."""

    file: str  # absolute path
    rel: str  # path relative to the source root (for labels and messages)
    key: str | None  # NPZ key
    shape: tuple[int, ...]
    dtype: np.dtype
    layout: str  # resolved: hw | volume | hwc | chw | nchw | nhwc
    count: int  # images in this array
    window: tuple[float, float] | None = None  # the array's own (min, max), when it sets the intensity window

    @property
    def where(self) -> str:
        return f"{self.file}[{self.key}]" if self.key else self.file


def _npz_members(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of the arrays in an .npz, read from the headers only (no decompression)."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    continue
                with zf.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                out[member[:-4]] = (tuple(shape), np.dtype(dtype))
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None
    return out


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable .npy file ({e})") from None
    return tuple(arr.shape), arr.dtype


def _resolve_layout(shape: tuple[int, ...], layout: str, axis: int, where: str) -> tuple[str, int]:
    """Decide how an array splits into images (docs/data.md "NPY/NPZ"); returns (layout, count)."""
    nd = len(shape)
    if layout == "auto":
        if nd == 2:
            layout = "hw"
        elif nd == 3:
            layout = "volume"
        elif nd == 4:
            # Channels-last when only axis 3 can be channels, channels-first when only axis 1 can; when
            # both can, the reading that gives square images wins, then channels-first (PyTorch order).
            last, first = shape[3] in (1, 3, 4), shape[1] in (1, 3, 4)
            if last and first:
                last = shape[1] == shape[2] and shape[2] != shape[3]
                first = not last
            if last:
                layout = "nhwc"
            elif first:
                layout = "nchw"
            else:
                raise UserError(
                    f"{where}: 4-D array of shape {shape} has no channel axis of size 1, 3 or 4 "
                    "at position 1 or 3; pass --npy-layout nchw or nhwc"
                )
        else:
            raise UserError(f"{where}: array of shape {shape} is not 2-D (image), 3-D (volume) or 4-D (stack)")
    wanted = {"hw": 2, "volume": 3, "hwc": 3, "chw": 3, "nchw": 4, "nhwc": 4}[layout]
    if nd != wanted:
        raise UserError(f"{where}: --npy-layout {layout} needs a {wanted}-D array, got shape {shape}")
    if layout == "volume":
        if not -3 <= axis <= 2:
            raise UserError(f"--npy-axis {axis} is out of range for the 3-D volume {where}; use 0, 1 or 2")
        return layout, shape[axis]
    if layout in ("nchw", "nhwc"):
        c = shape[1] if layout == "nchw" else shape[3]
        if c not in (1, 3, 4):
            raise UserError(f"{where}: {layout} stack has {c} channels; difflab reads 1, 3 or 4 (RGBA)")
        return layout, shape[0]
    if layout in ("hwc", "chw"):
        c = shape[2] if layout == "hwc" else shape[0]
        if c not in (1, 3, 4):
            raise UserError(f"{where}: {layout} image has {c} channels; difflab reads 1, 3 or 4 (RGBA)")
    return layout, 1


def _read_array(info: _Array) -> np.ndarray:
    """The array itself: memory-mapped for .npy, decompressed for an .npz member."""
    try:
        if info.key is None:
            return np.load(info.file, mmap_mode="r", allow_pickle=False)
        with np.load(info.file, allow_pickle=False) as z:
            return z[info.key]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{info.where}: cannot read array ({e})") from None


def _check_values(data: np.ndarray, where: str, nan_to: float | None, want_window: bool
                  ) -> tuple[float, float] | None:
    """One pass over ``data`` in blocks (docs/data.md "Bad values"): complex arrays are refused, NaN/inf
    are refused unless ``nan_to`` replaces them; returns the (min, max) after replacement if ``want_window``."""
    flat = data.reshape(-1, order="A")  # a view for C- and Fortran-ordered arrays alike
    blocks = (np.asarray(flat[i : i + _SCAN_BLOCK]) for i in range(0, flat.size, _SCAN_BLOCK))
    if np.iscomplexobj(data):
        count = sum(int(np.count_nonzero(b.imag)) for b in blocks)
        raise UserError(f"{where}: {data.dtype} array ({count} of {data.size} values have an imaginary part); "
                        "difflab reads real-valued images: save a.real or np.abs(a) instead")
    floating = np.issubdtype(data.dtype, np.floating)
    lo, hi, bad = np.inf, -np.inf, 0
    for block in blocks:
        finite = np.isfinite(block) if floating else None
        if floating:
            bad += block.size - int(np.count_nonzero(finite))
        if want_window and block.size:
            lo = min(lo, float(np.min(block, where=finite, initial=np.inf)))
            hi = max(hi, float(np.max(block, where=finite, initial=-np.inf)))
    if bad and nan_to is None:
        raise UserError(f"{where}: {nonfinite_message(bad, data.size)}")
    if not want_window:
        return None
    if bad:
        lo, hi = min(lo, nan_to), max(hi, nan_to)
    return (lo, hi) if lo <= hi else (0.0, 1.0)  # (0, 1) for an empty array


class NpySource(Source):
    """2-D images, 3-D volumes (sliced along ``axis``) and 4-D stacks from .npy/.npz files.

    Pixel values: uint8 arrays pass through unchanged (unless ``value_range`` is given); any other
    dtype maps ``[lo, hi]`` linearly to ``[0, 255]`` with clipping, where ``(lo, hi)`` is
    ``value_range`` (e.g. a CT window) or else the min/max of the whole array (per volume / per file).
    Opening reads every non-uint8 array once: complex arrays and NaN/inf values are refused with one
    line, unless ``nan_to`` replaces every NaN, +inf and -inf by that number before the window is taken.
    """

    kind = "npy"

    def __init__(
        self,
        path: str,
        axis: int = 0,
        key: str | None = None,
        value_range: tuple[float, float] | None = None,
        layout: str = "auto",
        label_rule: str = "auto",
        label_key: str | None = None,
        nan_to: float | None = None,
    ):
        if layout not in NPY_LAYOUTS:
            raise UserError(f"--npy-layout {layout!r} is unknown; use one of {', '.join(NPY_LAYOUTS)}")
        if value_range is not None and not float(value_range[1]) > float(value_range[0]):
            raise UserError(f"--npy-range {value_range}: need LO < HI, e.g. --npy-range -1000,1000")
        self.path = os.fspath(path)
        self.axis = int(axis)
        self.value_range = None if value_range is None else (float(value_range[0]), float(value_range[1]))
        self.nan_to = check_nan_to(nan_to)
        self.name = os.path.splitext(os.path.basename(os.path.normpath(self.path)))[0]
        self._pid = None
        if os.path.isdir(self.path):
            rels = [f for f in list_files(self.path) if f.lower().endswith(NPY_EXTENSIONS)]
            root = self.path
            if not rels:
                raise UserError(f"{self.path}: no .npy/.npz files found")
        else:
            rels, root = [os.path.basename(self.path)], os.path.dirname(self.path) or "."
        self.arrays: list[_Array] = []
        file_labels: list[np.ndarray | None] = []
        for rel in rels:
            file = os.path.join(root, rel) if os.path.isdir(self.path) else self.path
            if file.lower().endswith(".npz"):
                members = _npz_members(file)
                label_arr_key = self._label_key(members, label_key, file)
                data_keys = [k for k in members if k != label_arr_key]
                if key is not None:
                    if key not in members:
                        raise UserError(
                            f"{file}: no array {key!r} (keys: {', '.join(members) or 'none'}); fix --npy-key"
                        )
                    chosen = key
                elif data_keys:
                    chosen = data_keys[0]
                else:
                    raise UserError(f"{file}: contains no image array")
                shape, dtype = members[chosen]
            else:
                if key is not None and not os.path.isdir(self.path):
                    raise UserError(f"--npy-key {key!r} applies to .npz files, but {file} is a .npy file")
                shape, dtype = _npy_header(file)
                chosen, label_arr_key = None, None
            if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
                raise UserError(f"{file}: array dtype {dtype} is not numeric")
            lay, count = _resolve_layout(shape, layout, self.axis, f"{file}" + (f"[{chosen}]" if chosen else ""))
            arr = _Array(file, rel, chosen, shape, dtype, lay, count)
            want_window = self.value_range is None and dtype not in (np.uint8, np.bool_)
            if want_window or np.issubdtype(dtype, np.inexact):
                arr.window = _check_values(_read_array(arr), arr.where, self.nan_to, want_window)
            self.arrays.append(arr)
            read = label_arr_key is not None and label_rule != "none"
            file_labels.append(self._read_labels(file, label_arr_key, count) if read else None)
        counts = np.array([a.count for a in self.arrays], dtype=np.int64)
        if counts.sum() == 0:
            raise UserError(f"{self.path}: the arrays hold no images")
        self._array_of = np.repeat(np.arange(len(self.arrays)), counts)
        self._index_in = np.concatenate([np.arange(c) for c in counts])
        self.names = [f"{self.arrays[a].where}#{k}" for a, k in zip(self._array_of, self._index_in)]
        self._set_labels(rels, file_labels, label_rule, root)

    # -- labels
    @staticmethod
    def _label_key(members: dict, label_key: str | None, file: str) -> str | None:
        if label_key is not None:
            if label_key not in members:
                raise UserError(f"{file}: no label array {label_key!r} (keys: {', '.join(members)})")
            return label_key
        for k in NPZ_LABEL_KEYS:
            if k in members and len(members[k][0]) == 1 and np.issubdtype(members[k][1], np.integer):
                return k
        return None

    @staticmethod
    def _read_labels(file: str, k: str, count: int) -> np.ndarray:
        with np.load(file, allow_pickle=False) as z:
            raw = np.asarray(z[k])
        if not np.issubdtype(raw.dtype, np.integer):
            raise UserError(f"{file}: label array {k!r} is {raw.dtype}; labels are integer class indices")
        labels = raw.astype(np.int64).reshape(-1)
        if len(labels) != count:
            raise UserError(f"{file}: label array {k!r} has {len(labels)} entries for {count} images")
        if (labels < 0).any():
            raise UserError(f"{file}: label array {k!r} has negative entries; labels are class indices >= 0")
        return labels

    def _set_labels(self, rels, file_labels, label_rule, root) -> None:
        if label_rule != "none" and any(lab is not None for lab in file_labels):
            if not all(lab is not None for lab in file_labels):
                raise UserError(f"{self.path}: some .npz files have a label array and some do not")
            self.labels = np.concatenate(file_labels)
            self.label_rule = "npz"
            return
        meta_path = os.path.join(root, "dataset.json") if os.path.isdir(self.path) else None
        meta = _MISSING
        if meta_path and os.path.isfile(meta_path):
            meta = parse_dataset_json(open(meta_path, "rb").read(), meta_path)
        per_file, self.label_names, self.label_rule = assign_labels(rels, meta, label_rule, where=self.path)
        self.labels = per_file[self._array_of]

    # -- pixels
    def shape(self, i: int) -> tuple[int, int, int]:
        a = self.arrays[self._array_of[i]]
        s = a.shape
        if a.layout == "hw":
            return s[0], s[1], 1
        if a.layout == "volume":
            h, w = [d for j, d in enumerate(s) if j != self.axis % 3]
            return h, w, 1
        c, h, w = {
            "hwc": (s[2], s[0], s[1]),
            "chw": (s[0], s[1], s[2]),
            "nchw": (s[1], s[2], s[3]),
            "nhwc": (s[3], s[1], s[2]),
        }[a.layout]
        return h, w, min(c, 3)

    def uniform_shape(self, max_checks: int = 2000, fix: str | None = None) -> tuple[int, int, int]:
        first_of = np.searchsorted(self._array_of, np.arange(len(self.arrays)))
        h, w, _ = first = self.shape(0)
        for i in first_of:
            hi, wi, _ = self.shape(int(i))
            if (hi, wi) != (h, w):
                raise UserError(
                    f"{self.where(int(i))} is {wi}x{hi} but {self.where(0)} is {w}x{h}; "
                    + (fix or "mixed sizes need --resolution (or a different --npy-axis)")
                )
        return first

    def _array(self, a: int) -> tuple[np.ndarray, tuple[float, float] | None]:
        """The array (memory-mapped for .npy) and its window, cached per process."""
        if getattr(self, "_cache", None) is None or self._pid != os.getpid():
            self._cache, self._pid = OrderedDict(), os.getpid()
        if a in self._cache:
            self._cache.move_to_end(a)
            return self._cache[a]
        info = self.arrays[a]
        data = _read_array(info)
        if data.dtype == np.bool_ and self.value_range is None:
            window = (0.0, 1.0)
        else:  # the fixed window, else the array's (min, max) found when the source was opened
            window = self.value_range or info.window
        self._cache[a] = (data, window)
        # Keep decompressed .npz arrays up to ~1 GiB; memory maps cost nothing to keep.
        while len(self._cache) > 1 and sum(
            d.nbytes for d, _ in self._cache.values() if not isinstance(d, np.memmap)
        ) > (1 << 30):
            self._cache.popitem(last=False)
        return self._cache[a]

    def load(self, i: int) -> np.ndarray:
        a, k = int(self._array_of[i]), int(self._index_in[i])
        info = self.arrays[a]
        data, window = self._array(a)
        if info.layout == "hw":
            img = data[:, :, None]
        elif info.layout == "volume":
            img = np.take(data, k, axis=self.axis % 3)[:, :, None]
        elif info.layout == "hwc":
            img = data
        elif info.layout == "chw":
            img = np.moveaxis(data, 0, 2)
        elif info.layout == "nchw":
            img = np.moveaxis(data[k], 0, 2)
        else:
            img = data[k]
        if img.shape[2] == 4:  # RGBA: drop alpha
            img = img[:, :, :3]
        if np.issubdtype(img.dtype, np.floating):  # NaN/inf were counted at opening; replace (or refuse) them
            img = check_finite(np.asarray(img), self.where(i), self.nan_to)
        if window is None:  # copy: never hand out a (read-only) view of a memory map
            return np.array(img, dtype=np.uint8, order="C", copy=True)
        return window_to_uint8_range(img, *window)
