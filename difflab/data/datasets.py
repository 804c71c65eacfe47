"""The one dataset type every trainer and tool reads: :class:`ImageDataset` and :func:`open_dataset`.

Items are ``(image uint8 [C,H,W], label int (-1 = none), index int)`` (DESIGN.md "Images",
"Labels"). Sources (folder, zip, NPY/NPZ, digits, MNIST, CIFAR-10) are described in docs/data.md.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import numpy as np
import torch

from difflab.data.builtins import (
    DIGITS_NAMES,
    is_cifar10_path,
    load_cifar10_source,
    load_digits_source,
    load_mnist_source,
    mnist_images_in,
)
from difflab.data.images import TRANSFORMS, adapt_channels, fit_image, is_image_name, pad_square, to_uint8
from difflab.data.sources import NPY_EXTENSIONS, ArraySource, FileSource, NpySource, Source, list_files
from difflab.errors import UserError

# In-memory sources are processed once into one array when it stays below this many bytes.
_MATERIALIZE_BYTES = 1 << 30


def check_resolution(resolution: int | Sequence[int], what: str = "--resolution") -> int:
    """Training and the dataset tool need square power-of-two images; return the side or raise."""
    if isinstance(resolution, (tuple, list)):
        if len(resolution) != 2 or int(resolution[0]) != int(resolution[1]):
            raise UserError(
                f"{what} {'x'.join(map(str, resolution))} is not square; images must be square "
                "with a power-of-two side (e.g. 32x32); use --transform center-crop"
            )
        resolution = resolution[0]
    r = int(resolution)
    if r < 1 or r & (r - 1):
        up = 1 << max(r - 1, 1).bit_length()
        raise UserError(
            f"{what} {r}: the image side must be a power of two (e.g. 8, 16, 32, 64); zero-pad with "
            f"--pad-to {up} (generation crops back to {r}) or resize with --resolution {up}"
        )
    return r


def parse_resolution(text: str | int | Sequence[int] | None) -> tuple[int, int] | None:
    """``"64"`` or ``"64x32"`` (width x height) -> ``(width, height)``."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text, text
    if isinstance(text, (tuple, list)):
        return int(text[0]), int(text[-1])
    parts = str(text).lower().split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
        if len(parts) > 2 or w < 1 or h < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"--resolution {text!r}: use a side like 32 or WIDTHxHEIGHT like 32x32") from None
    return w, h


class ImageDataset(torch.utils.data.Dataset):
    """A source after resizing, channel adaptation, subsetting and optional x-flips.

    ``ds[i]`` is ``(image uint8 [C,H,W], label, i)``; with ``xflip`` the dataset doubles and items
    ``n..2n-1`` are mirror images of ``0..n-1`` (EDM's convention).
    """

    def __init__(
        self,
        source: Source,
        size: tuple[int, int] | None = None,
        transform: str | None = None,
        channels: int | None = None,
        use_labels: bool = True,
        max_size: int | None = None,
        xflip: bool = False,
        random_seed: int = 0,
        subset: str = "random",
        cache: bool = False,
        pad_to: int | None = None,
    ):
        if transform is not None and transform not in TRANSFORMS:
            raise UserError(f"--transform {transform!r} is unknown; use one of {', '.join(TRANSFORMS)}")
        if transform is not None and size is None:
            raise UserError(f"--transform {transform} needs --resolution")
        if channels is not None and channels not in (1, 3):
            raise UserError(f"--channels {channels}: use 1 (gray) or 3 (RGB)")
        self.source = source
        self.name = source.name
        self.size = size
        self.transform = transform
        n = len(source)
        if n == 0:
            raise UserError(f"{source.name}: the dataset is empty")

        # Output geometry: native (all items must agree and be square) or the requested size.
        if size is None:
            h, w, c = source.uniform_shape()
            if h != w:
                raise UserError(
                    f"{source.where(0)} is {w}x{h}, not square; pass --resolution "
                    "(non-square images are centre-cropped)"
                )
            self.resolution = w
            out_h = h
        else:
            c = source.shape(0)[2]
            self.resolution = size[0]
            out_h = size[0] if transform == "center-crop-wide" else size[1]
        self.num_channels = int(channels or c)
        # --pad-to: zero-pad (centred) to pad_to x pad_to; crop_to is the side generation crops back to.
        self.crop_to = self.pad_to = None
        if pad_to is not None and pad_to != self.resolution:
            if out_h != self.resolution or pad_to < self.resolution:
                raise UserError(f"--pad-to {pad_to}: the images are {self.resolution}x{out_h}; --pad-to takes a "
                                f"side >= {max(self.resolution, out_h)} (to shrink them use --resolution)")
            self.crop_to, self.pad_to = self.resolution, int(pad_to)
            self.resolution = out_h = self.pad_to
        self.image_shape = (self.num_channels, out_h, self.resolution)

        # Subset: a reproducible random subset (sorted) or the first max_size items.
        raw_idx = np.arange(n, dtype=np.int64)
        if max_size is not None and max_size < n:
            if max_size < 1:
                raise UserError(f"--max-size {max_size}: must be at least 1")
            if subset == "first":
                raw_idx = raw_idx[:max_size]
            else:
                rs = np.random.RandomState(random_seed % (1 << 31))
                raw_idx = np.sort(rs.permutation(n)[:max_size])
        self._raw_idx = raw_idx
        self.xflip = bool(xflip)

        raw_labels = source.labels if use_labels else np.full(n, -1, dtype=np.int64)
        self.has_labels = bool(use_labels and (raw_labels >= 0).any())
        if self.has_labels and (raw_labels < 0).any():
            raise UserError(f"{source.where(int(np.argmax(raw_labels < 0)))} has no label while others do")
        self.label_names = list(source.label_names) if (self.has_labels and source.label_names) else None
        if self.has_labels:
            top, limit = int(raw_labels.max()), max(n, len(self.label_names or ()))
            if top >= limit:  # label_dim sizes the one-hot and the per-class counts: never beyond the data
                raise UserError(
                    f"{source.where(int(np.argmax(raw_labels)))}: class label {top} (labels from "
                    f"{source.label_rule}) is not below the number of images ({n}); labels are class indices "
                    "0..K-1 with K <= images: fix the labels or pass --labels none"
                )
            self.label_dim = max(top + 1, len(self.label_names or ()))
        else:
            self.label_dim = 0
            raw_labels = np.full(n, -1, dtype=np.int64)
        self._raw_labels = raw_labels
        self._images: np.ndarray | None = None
        self._mean: np.ndarray | None = None
        # Optional decoded-image cache for lazy sources (filled per worker process, like EDM's cache=True).
        self._cache: dict[int, np.ndarray] | None = {} if cache else None
        if isinstance(source, ArraySource):
            nbytes = len(raw_idx) * int(np.prod(self.image_shape))
            native = source.images.shape[1:]  # H, W, C
            unchanged = tuple(native) == (out_h, self.resolution, self.num_channels) and self.pad_to is None
            if nbytes <= _MATERIALIZE_BYTES and unchanged and transform != "center-crop-wide":
                self._images = np.ascontiguousarray(source.images[raw_idx].transpose(0, 3, 1, 2))
            elif nbytes <= _MATERIALIZE_BYTES:
                self._images = np.stack([self._process(int(r)) for r in raw_idx])

    def __getstate__(self) -> dict:
        # Once processed into ``_images`` the raw array is dead weight: keep it out of worker pickles.
        state = self.__dict__.copy()
        if self._images is not None and isinstance(self.source, ArraySource):
            src = copy.copy(self.source)
            src.images = src.images[:0]
            state["source"] = src
        return state

    # ---- sizes and labels --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._raw_idx) * (2 if self.xflip else 1)

    @property
    def labels(self) -> np.ndarray:
        """All labels as int64 ``[len(self)]`` (-1 where unlabelled), without touching pixels."""
        lab = self._raw_labels[self._raw_idx]
        return np.concatenate([lab, lab]) if self.xflip else lab.copy()

    def get_label(self, i: int) -> int:
        return int(self._raw_labels[self._raw_idx[i % len(self._raw_idx)]])

    @property
    def label_counts(self) -> np.ndarray:
        """Images per class ``[label_dim]`` (empty when unlabelled)."""
        if not self.has_labels:
            return np.zeros(0, dtype=np.int64)
        return np.bincount(self.labels, minlength=self.label_dim)

    # ---- pixels ------------------------------------------------------------------------------
    def _process(self, raw: int) -> np.ndarray:
        img = self.source.load(raw)
        if self.num_channels == 1 and img.shape[2] != 1:
            img = adapt_channels(img, 1)
        side = self.crop_to or self.resolution  # before --pad-to
        if self.size is None and img.shape[:2] != (side, side):
            h, w = img.shape[:2]
            raise UserError(
                f"{self.source.where(raw)} is {w}x{h} but the dataset is {side}x{side}; pass --resolution"
            )
        img = fit_image(img, self.size, self.transform)
        img = to_uint8(adapt_channels(img, self.num_channels))
        if self.pad_to is not None:
            img = pad_square(img, self.pad_to)
        # Items are writable: PIL and memory maps hand out read-only arrays, on which torch.from_numpy warns
        # ("The given NumPy array is not writable") and an in-place edit would fail or write through.
        out = np.ascontiguousarray(img.transpose(2, 0, 1))
        return out if out.flags.writeable else out.copy()

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        n = len(self._raw_idx)
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        k = i % n
        raw = int(self._raw_idx[k])
        if self._images is not None:
            img = self._images[k]
        elif self._cache is not None:
            img = self._cache.get(raw)
            if img is None:
                img = self._cache[raw] = self._process(raw)
        else:
            img = self._process(raw)
        shared = self._images is not None or self._cache is not None
        if i >= n:
            img, shared = np.ascontiguousarray(img[:, :, ::-1]), False
        # Never hand out a view of the in-memory store: a caller's in-place edit would corrupt it.
        return (img.copy() if shared else img), int(self._raw_labels[raw]), i

    def where(self, i: int) -> str:
        """The file (or array slice) item ``i`` comes from, for messages."""
        return self.source.where(int(self._raw_idx[i % len(self._raw_idx)]))

    def mean_image(self) -> np.ndarray:
        """Mean image float64 ``[C,H,W]`` in uint8 scale over the whole dataset (cached)."""
        if self._mean is None:
            if self._images is not None:
                mean = self._images.mean(axis=0, dtype=np.float64)
            else:
                total = np.zeros(self.image_shape, dtype=np.float64)
                for k in range(len(self._raw_idx)):
                    total += self._process(int(self._raw_idx[k]))
                mean = total / len(self._raw_idx)
            if self.xflip:
                mean = 0.5 * (mean + mean[:, :, ::-1])
            self._mean = np.ascontiguousarray(mean)
        return self._mean.copy()

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        lab = f"{self.label_dim} classes" if self.has_labels else "unlabelled"
        return f"ImageDataset({self.name!r}, {len(self)} images, {c}x{h}x{w}, {lab})"


# ---- opening ---------------------------------------------------------------------------------------


def open_source(
    source: str,
    use_labels: bool = True,
    label_rule: str = "auto",
    npy_axis: int = 0,
    npy_key: str | None = None,
    npy_range: tuple[float, float] | None = None,
    npy_layout: str = "auto",
    npy_label_key: str | None = None,
    nan_to: float | None = None,
) -> Source:
    """Pick the reader for ``source`` (docs/data.md "Sources")."""
    src = _open_source(source, use_labels, label_rule, npy_axis, npy_key, npy_range, npy_layout, npy_label_key,
                       nan_to)
    if not use_labels or label_rule == "none":
        src.labels = np.full(len(src), -1, dtype=np.int64)
        src.label_names, src.label_rule = None, "none"
    return src


def _open_source(source, use_labels, label_rule, npy_axis, npy_key, npy_range, npy_layout, npy_label_key, nan_to):
    spec = str(source)
    if spec.lower() in DIGITS_NAMES:
        return load_digits_source()
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
        raise UserError(
            f"dataset source {spec!r} not found; give a folder, .zip, .npy/.npz, MNIST IDX file, "
            "cifar-10-python.tar.gz or 'digits'"
        )
    rule = label_rule if use_labels else "none"
    npy_kwargs = dict(
        axis=npy_axis,
        key=npy_key,
        value_range=npy_range,
        layout=npy_layout,
        label_rule=rule,
        label_key=npy_label_key,
        nan_to=nan_to,
    )
    lower = path.lower()
    if is_cifar10_path(path):
        return load_cifar10_source(path)
    mnist = mnist_images_in(path)
    if mnist is not None:
        return load_mnist_source(mnist, use_labels=use_labels)
    if os.path.isfile(path):
        if lower.endswith(NPY_EXTENSIONS):
            return NpySource(path, **npy_kwargs)
        if lower.endswith(".zip"):
            return FileSource(path, label_rule=rule, nan_to=nan_to)
        if is_image_name(lower):
            raise UserError(f"{spec} is a single image; give the folder that holds the images")
        raise UserError(
            f"{spec}: unknown dataset format; use a folder, .zip, .npy/.npz, MNIST IDX, "
            "cifar-10-python.tar.gz or 'digits'"
        )
    files = list_files(path)
    n_img = sum(is_image_name(f) for f in files)
    n_npy = sum(f.lower().endswith(NPY_EXTENSIONS) for f in files)
    if n_img and n_npy:
        raise UserError(
            f"{spec} holds both images ({n_img}) and .npy/.npz files ({n_npy}); keep one kind per dataset folder"
        )
    if n_npy:
        return NpySource(path, **npy_kwargs)
    if not n_img:
        raise UserError(f"{spec}: no images or .npy/.npz files found (folder is empty of data)")
    return FileSource(path, label_rule=rule, nan_to=nan_to)


def open_dataset(
    source: str,
    resolution: int | None = None,
    channels: int | None = None,
    use_labels: bool = True,
    max_size: int | None = None,
    xflip: bool = False,
    npy_axis: int = 0,
    npy_key: str | None = None,
    npy_range: tuple[float, float] | None = None,
    npy_layout: str = "auto",
    npy_label_key: str | None = None,
    label_rule: str = "auto",
    transform: str | None = None,
    random_seed: int = 0,
    cache: bool = False,
    nan_to: float | None = None,
    pad_to: int | None = None,
    crop_to: int | None = None,
) -> ImageDataset:
    """Open any supported source as an :class:`ImageDataset` (docs/data.md).

    ``resolution`` resizes every image to ``resolution x resolution`` (LANCZOS down, BICUBIC up;
    non-square images are centre-cropped first); ``None`` keeps the native size, which must then be
    square and shared by all images. ``channels`` converts gray <-> RGB. ``max_size`` keeps a
    reproducible random subset (seed ``random_seed``). ``xflip`` appends mirrored copies. ``cache``
    keeps decoded images of lazy sources in memory after first use. The call's arguments are kept
    in ``dataset.open_kwargs`` (JSON-ready) so a run directory can reopen the same data. ``nan_to``
    replaces NaN/inf values of float data by that number (without it they are refused, docs/data.md).
    ``pad_to`` zero-pads the (square) images, centred, to ``pad_to x pad_to`` (``--pad-to``: 28 px data for a
    network that wants 32); ``dataset.crop_to`` is then the side before padding, which a run records as
    ``data.crop_to`` so that generation crops back to it (a given ``crop_to`` must match the data).
    """
    open_kwargs = dict(locals())
    src = open_source(
        source,
        use_labels=use_labels,
        label_rule=label_rule,
        npy_axis=npy_axis,
        npy_key=npy_key,
        npy_range=npy_range,
        npy_layout=npy_layout,
        npy_label_key=npy_label_key,
        nan_to=nan_to,
    )
    size = None if resolution is None else parse_resolution(resolution)
    if size is not None and size[0] != size[1]:
        raise UserError(f"--resolution {size[0]}x{size[1]}: datasets are square; give one side, e.g. 32")
    ds = ImageDataset(
        src,
        size=size,
        transform=transform,
        channels=channels,
        use_labels=use_labels,
        max_size=max_size,
        xflip=xflip,
        random_seed=random_seed,
        cache=cache,
        pad_to=pad_to,
    )
    if crop_to is not None and crop_to != (ds.crop_to or ds.resolution):
        raise UserError(f"data.crop_to {crop_to} (recorded with --pad-to {pad_to}) but {source} is now "
                        f"{ds.crop_to or ds.resolution} px; the data changed: start a new run")
    open_kwargs["source"] = str(source)
    open_kwargs["npy_range"] = None if npy_range is None else [float(v) for v in npy_range]
    ds.open_kwargs = open_kwargs
    return ds
