"""Built-in datasets and standard archive formats, all held in memory as one uint8 array.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, labels 0-9), values
  0..16 mapped to 0..255 by ``round(v * 255 / 16)``.
* MNIST IDX files (``train-images-idx3-ubyte[.gz]`` + ``train-labels-idx1-ubyte[.gz]`` beside it),
  zero-padded from 28x28 to 32x32 as EDM's dataset tool does.
* CIFAR-10 python pickles (``cifar-10-python.tar.gz`` or the extracted ``cifar-10-batches-py``
  folder): the 50 000 training images with labels. The pickles are read with an unpickler that
  only admits plain containers and numpy arrays, so a crafted file cannot run code.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import tarfile

import numpy as np

from difflab.data.sources import ArraySource
from difflab.errors import UserError

DIGITS_NAMES = ("digits", "sklearn-digits")
CIFAR_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797,8,8] in 0..16, targets) from scikit-learn's bundled ``digits.csv.gz``.

    The file is read directly when found: importing ``sklearn.datasets`` costs seconds (it pulls in
    scipy and more), which every short ``digits`` run would pay. Same data as ``load_digits()``."""
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = os.path.join(root, "datasets", "data", "digits.csv.gz")
            if os.path.isfile(path):
                table = np.loadtxt(path, delimiter=",", dtype=np.float64)
                return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a core dependency
        raise UserError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def load_digits_source() -> ArraySource:
    values, targets = _digits_arrays()
    images = np.rint(values * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return ArraySource(images[:, :, :, None], targets, "digits", [str(k) for k in range(10)], kind="digits")


# ---- MNIST IDX --------------------------------------------------------------------------------------


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read MNIST IDX file ({e})") from None
    if len(data) < 4 + 4 * ndim or int.from_bytes(data[:4], "big") != magic:
        raise UserError(f"{path}: not an MNIST IDX file (expected magic number {magic})")
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path}: IDX header says {dims} but the file holds {body.size} bytes of data")
    return body.reshape(dims)


def mnist_label_path(images_path: str) -> str | None:
    """The labels file that belongs to an images file (same folder, same split, same compression)."""
    base = os.path.basename(images_path)
    if "idx3-ubyte" not in base:
        return None
    folder = os.path.dirname(images_path)
    stem = base.replace("images", "labels", 1).replace("idx3", "idx1", 1)
    for cand in (stem, stem[:-3] if stem.endswith(".gz") else stem + ".gz"):
        if os.path.isfile(os.path.join(folder, cand)):
            return os.path.join(folder, cand)
    return os.path.join(folder, stem)


def load_mnist_source(images_path: str, use_labels: bool = True) -> ArraySource:
    images = _read_idx(images_path, 2051, 3)
    labels = None
    if use_labels:
        label_path = mnist_label_path(images_path)
        if label_path is None or not os.path.isfile(label_path):
            raise UserError(
                f"{images_path}: labels file {label_path} not found beside it; add it or pass --labels none"
            )
        labels = _read_idx(label_path, 2049, 1)
        if len(labels) != len(images):
            raise UserError(f"{label_path} has {len(labels)} labels for {len(images)} images in {images_path}")
    padded = np.pad(images, [(0, 0), (2, 2), (2, 2)])[:, :, :, None]  # 28x28 -> 32x32, zeros
    name = os.path.basename(images_path).split("-")[0]
    return ArraySource(padded, labels, f"mnist-{name}", [str(k) for k in range(10)], kind="mnist")


# ---- CIFAR-10 ---------------------------------------------------------------------------------------


class _SafeUnpickler(pickle.Unpickler):
    """Admit only what the CIFAR pickles need: numpy arrays and dtypes (plus builtin containers)."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise UserError(f"{where}: not a CIFAR-10 python batch ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: not a CIFAR-10 python batch (no dict inside)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_cifar_members(path: str) -> dict[str, bytes]:
    """basename -> bytes for data_batch_1..5 and batches.meta, from the tarball or the folder."""
    wanted = [f"data_batch_{k}" for k in range(1, 6)] + ["batches.meta"]
    out: dict[str, bytes] = {}
    if os.path.isdir(path):
        folder = (
            path if os.path.isfile(os.path.join(path, "data_batch_1")) else os.path.join(path, "cifar-10-batches-py")
        )
        for w in wanted:
            p = os.path.join(folder, w)
            if os.path.isfile(p):
                out[w] = open(p, "rb").read()
        return out
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar.getmembers():
                base = os.path.basename(member.name)
                if member.isfile() and base in wanted:
                    out[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable CIFAR-10 tarball ({e})") from None
    return out


def load_cifar10_source(path: str) -> ArraySource:
    members = _read_cifar_members(path)
    images, labels = [], []
    for k in range(1, 6):
        key = f"data_batch_{k}"
        if key not in members:
            raise UserError(f"{path}: {key} missing; expected the CIFAR-10 python version (cifar-10-python.tar.gz)")
        batch = _unpickle(members[key], f"{path}:{key}")
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labs = np.asarray(batch["labels"], dtype=np.int64)
        except (KeyError, ValueError) as e:
            raise UserError(f"{path}:{key}: unexpected content ({e!r})") from None
        if len(labs) != len(data):
            raise UserError(f"{path}:{key}: {len(labs)} labels for {len(data)} images")
        images.append(data)
        labels.append(labs)
    names = CIFAR_LABEL_NAMES
    if "batches.meta" in members:
        meta = _unpickle(members["batches.meta"], f"{path}:batches.meta")
        raw = meta.get("label_names")
        if raw:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw]
    arr = np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1))
    return ArraySource(arr, np.concatenate(labels), "cifar10", list(names), kind="cifar10")


def is_cifar10_path(path: str) -> bool:
    base = os.path.basename(os.path.normpath(path)).lower()
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "data_batch_1")) or os.path.isfile(
            os.path.join(path, "cifar-10-batches-py", "data_batch_1")
        )
    return base.startswith("cifar-10") and (base.endswith(".tar.gz") or base.endswith(".tgz") or base.endswith(".tar"))


def mnist_images_in(path: str) -> str | None:
    """The MNIST training-images file for a path: the file itself, or inside a folder."""
    if os.path.isfile(path):
        return path if "idx3-ubyte" in os.path.basename(path) else None
    if os.path.isdir(path):
        for cand in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz", "train-images.idx3-ubyte"):
            if os.path.isfile(os.path.join(path, cand)):
                return os.path.join(path, cand)
    return None
