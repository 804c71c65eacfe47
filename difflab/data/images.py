"""Pixel helpers shared by every data source: decoding, channel adaptation, crop and resize.

Images travel between these helpers as ``[H, W, C]`` numpy arrays, either uint8 or float32 already
scaled to the uint8 range ``[0, 255]`` (NPY/NPZ data stays float until the final rounding, so a
resize of CT data does not first lose precision). See docs/data.md for the rules.
"""

from __future__ import annotations

import io

import numpy as np
import PIL.Image

from difflab.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
TRANSFORMS = ("center-crop", "center-crop-wide")

# ITU-R 601-2 luma, the weights PIL uses for RGB -> L.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def check_finite(arr: np.ndarray, where: str, nan_to: float | None = None) -> np.ndarray:
    """Refuse NaN/inf values with one line naming ``where`` and their count, or replace every one of
    them (NaN, +inf, -inf) by ``nan_to`` (docs/data.md "Bad values")."""
    bad = ~np.isfinite(arr)
    count = int(np.count_nonzero(bad))
    if not count:
        return arr
    if nan_to is None:
        raise UserError(f"{where}: {nonfinite_message(count, arr.size)}")
    return np.where(bad, np.asarray(nan_to, dtype=arr.dtype), arr)


def nonfinite_message(count: int, size: int) -> str:
    return (f"{count} of {size} values are NaN or infinite; fix the data or pass --nan-to NUMBER to replace "
            "them by NUMBER")


def pil_to_array(img: PIL.Image.Image, where: str, nan_to: float | None = None) -> np.ndarray:
    """Decoded PIL image -> ``[H, W, C]`` with C in {1, 3}: gray stays gray, alpha and palettes are
    dropped to RGB, 16-bit gray is scaled to 8 bits (divide by 257). A float image (mode F) with NaN or
    inf values is refused unless ``nan_to`` replaces them (:func:`check_finite`)."""
    try:
        mode = img.mode
        if mode in ("1", "L"):
            arr = np.asarray(img.convert("L"))
        elif mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            raw = check_finite(np.asarray(img).astype(np.float32), where, nan_to)
            arr = raw / 257.0 if mode.startswith("I;16") or raw.max() > 255 else raw
        elif mode == "LA":
            arr = np.asarray(img.convert("L"))
        else:
            arr = np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{where}: cannot decode image ({e}); remove or replace the file") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def decode_image(data: bytes, where: str, nan_to: float | None = None) -> np.ndarray:
    """Encoded image bytes -> ``[H, W, C]`` (see :func:`pil_to_array`); corrupt data -> UserError."""
    try:
        img = PIL.Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise UserError(f"{where}: cannot decode image ({e}); remove or replace the file") from None
    return pil_to_array(img, where, nan_to)


def peek_image(fileobj, where: str) -> tuple[int, int, int]:
    """Read only the header: ``(height, width, channels)``; unreadable header -> UserError."""
    try:
        with PIL.Image.open(fileobj) as img:
            w, h = img.size
            mode = img.mode
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise UserError(f"{where}: not a readable image ({e}); remove or replace the file") from None
    return h, w, 1 if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") else 3


def window_to_uint8_range(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly to ``[0, 255]`` (float32, clipped); constant -> 0. Sources refuse or
    replace NaN/inf before this (:func:`check_finite`); any left over map to the window's ends."""
    out = np.nan_to_num(np.asarray(arr, dtype=np.float32), nan=lo, posinf=hi, neginf=lo)
    if hi <= lo:
        return np.zeros_like(out)
    return np.clip((out - lo) * (255.0 / (hi - lo)), 0.0, 255.0)


def to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def pad_margin(side: int, padded: int) -> int:
    """Rows (and columns) of zeros above (left of) a ``side`` image centred in ``padded`` (``--pad-to``)."""
    return (padded - side) // 2


def pad_square(img: np.ndarray, padded: int) -> np.ndarray:
    """Square ``[H, W, C]`` -> ``[padded, padded, C]``, centred on zeros (``--pad-to``; MNIST's 28 -> 32)."""
    lo = pad_margin(img.shape[0], padded)
    hi = padded - img.shape[0] - lo
    return np.pad(img, [(lo, hi), (lo, hi), (0, 0)])


def crop_square(images, side: int):
    """``[..., P, P]`` -> the centred ``[..., side, side]`` that :func:`pad_square` padded (numpy or torch)."""
    lo = pad_margin(side, images.shape[-1])
    return images[..., lo:lo + side, lo:lo + side]


def adapt_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """``[H, W, C]`` -> ``[H, W, channels]``: gray -> RGB repeats; RGB -> gray is ITU-R 601 luma."""
    c = img.shape[2]
    if c == channels:
        return img
    if c == 1 and channels == 3:
        return np.repeat(img, 3, axis=2)
    if c == 3 and channels == 1:
        if img.dtype == np.uint8:  # exactly PIL's own conversion
            return np.asarray(PIL.Image.fromarray(img, "RGB").convert("L"))[:, :, None]
        return (img.astype(np.float32) @ _LUMA)[:, :, None]
    raise UserError(f"cannot convert {c}-channel images to {channels} channels; use --channels 1 or 3")


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize ``[H, W, C]``; LANCZOS when shrinking (as EDM's dataset tool), BICUBIC when enlarging
    (LANCZOS rings visibly on tiny images such as 8x8 digits)."""
    h, w, c = img.shape
    if (w, h) == (width, height):
        return img
    resample = PIL.Image.LANCZOS if width * height < w * h else PIL.Image.BICUBIC
    if img.dtype == np.uint8:
        pil = PIL.Image.fromarray(img[:, :, 0] if c == 1 else img, "L" if c == 1 else "RGB")
        out = np.asarray(pil.resize((width, height), resample))
        return out[:, :, None] if out.ndim == 2 else out
    planes = [
        np.asarray(
            PIL.Image.fromarray(np.ascontiguousarray(img[:, :, k], dtype=np.float32), "F").resize(
                (width, height), resample
            )
        )
        for k in range(c)
    ]
    return np.clip(np.stack(planes, axis=2), 0.0, 255.0)


def _center_crop(img: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return img[top : top + crop_h, left : left + crop_w]


def fit_image(img: np.ndarray, size: tuple[int, int] | None, transform: str | None) -> np.ndarray:
    """Crop/resize ``[H, W, C]`` to ``size = (width, height)`` (docs/data.md "Resizing").

    * ``None``: resize; a non-square image is first centre-cropped to a square (never stretched).
    * ``"center-crop"``: central square of side ``min(H, W)``, then resize.
    * ``"center-crop-wide"``: central crop with aspect ``width:height``, resized to
      ``width x height`` and zero-padded above and below to ``width x width``.
    """
    if size is None:
        return img
    width, height = size
    h, w = img.shape[:2]
    if transform == "center-crop-wide":
        crop_h = min(h, max(1, round(w * height / width)))
        crop_w = min(w, max(1, round(crop_h * width / height)))
        out = _resize(_center_crop(img, crop_h, crop_w), width, height)
        canvas = np.zeros((width, width, img.shape[2]), dtype=out.dtype)
        top = (width - height) // 2
        canvas[top : top + height] = out
        return canvas
    if transform not in (None, "center-crop"):
        raise UserError(f"--transform {transform!r} is unknown; use one of {', '.join(TRANSFORMS)}")
    if (w, h) == (width, height):
        return img
    if h != w:
        side = min(h, w)
        img = _center_crop(img, side, side)
    return _resize(img, width, height)
