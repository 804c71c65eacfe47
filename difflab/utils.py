"""Small shared helpers: PNG files and image grids, TF32 control, device choice. Atomic writes, stale-temp
cleanup and ``.npz`` bytes live in :mod:`difflab.runio` (their names here are kept for old imports)."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import torch

from difflab.runio import atomic_write_bytes, atomic_write_text, npz_bytes, remove_stale_temps

__all__ = ["atomic_write_bytes", "atomic_write_text", "default_device", "fp32_precision", "make_grid", "npz_bytes",
           "remove_stale_temps", "resolve_device", "save_png", "set_tf32"]


def save_png(path: str | Path, image: np.ndarray) -> None:
    """uint8 [C,H,W] or [H,W,C] (C in 1, 3) -> PNG, atomically."""
    from PIL import Image

    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.transpose(1, 2, 0)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def make_grid(images: np.ndarray | torch.Tensor, cols: int | None = None, pad: int = 1,
              min_size: int = 32) -> np.ndarray:
    """uint8 [N,C,H,W] -> one uint8 [C,H',W'] montage (square-ish, ``pad`` pixels of black between).

    Images smaller than ``min_size`` are enlarged by an integer factor (nearest neighbour) so that a
    grid of 8x8 digits can be looked at."""
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    factor = max(1, -(-min_size // max(images.shape[2:])))
    if factor > 1:
        images = images.repeat(factor, axis=2).repeat(factor, axis=3)
    n, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((c, rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = images[i]
    return grid


def set_tf32(matmul: bool, cudnn: bool | None = None) -> None:
    """Allow (or forbid) TF32 in float32 matmuls and cuDNN convolutions on Ampere+ GPUs."""
    torch.backends.cuda.matmul.allow_tf32 = bool(matmul)
    torch.backends.cudnn.allow_tf32 = bool(matmul if cudnn is None else cudnn)


@contextlib.contextmanager
def fp32_precision(tf32: bool = False):
    """DESIGN.md "Precision": fp32 means fp32. TF32 is off for matmul and cuDNN (PyTorch's default turns it
    ON for cuDNN convolutions) unless ``tf32`` opts in; the previous settings come back afterwards."""
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    set_tf32(tf32)
    try:
        yield
    finally:
        set_tf32(*previous)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str | None) -> torch.device:
    from difflab.errors import UserError

    if name in (None, "", "auto"):
        return default_device()
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available here; use --device cpu")
    return dev
