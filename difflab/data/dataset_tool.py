"""``difflab dataset convert`` / ``info``: EDM's dataset-tool conventions (specs/gaussian_and_dddm.md §5.7).

Output: uncompressed PNGs named ``{idx:08d}[:5]/img{idx:08d}.png`` (``00000/img00000000.png``) plus
``dataset.json`` ``{"labels": [[name, int], ...] | null}`` (and ``label_names`` when known), in a
folder or a ``.zip``. Images are square with a power-of-two side and 1 or 3 channels. The result is
written to a temporary sibling and renamed into place (:mod:`difflab.runio`), so an interrupted run leaves
nothing half written and an existing non-empty destination is never touched.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable, Iterator

import numpy as np
import PIL.Image

from difflab.data.datasets import ImageDataset, check_resolution, open_source, parse_resolution
from difflab.distributed import progress as progress_bar
from difflab.errors import UserError
from difflab.runio import atomic_dir, atomic_write, check_file_arg


def archive_name(idx: int) -> str:
    """EDM's output name for image ``idx``: ``00000/img00000000.png``."""
    name = f"{idx:08d}"
    return f"{name[:5]}/img{name}.png"


def _png_bytes(img_chw: np.ndarray) -> bytes:
    c = img_chw.shape[0]
    pil = PIL.Image.fromarray(img_chw[0] if c == 1 else img_chw.transpose(1, 2, 0), "L" if c == 1 else "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="png", compress_level=0, optimize=False)
    return buf.getvalue()


def _check_dest(dest: str) -> None:
    if os.path.isdir(dest):
        if os.listdir(dest):
            raise UserError(f"--dest {dest} already exists and is not empty; choose a new path or remove it")
    elif os.path.exists(dest) and (os.path.getsize(dest) > 0 or not dest.lower().endswith(".zip")):
        raise UserError(f"--dest {dest} already exists as a file; choose a new path or remove it")
    if not os.path.isdir(dest):
        check_file_arg(dest, "--dest")


def open_for_convert(
    source: str,
    resolution: str | tuple[int, int] | None = None,
    transform: str | None = None,
    max_images: int | None = None,
    channels: int | None = None,
    **source_kwargs,
) -> ImageDataset:
    """The dataset as the converter writes it; refuses outputs training cannot use (§5.7)."""
    size = parse_resolution(resolution)
    if transform is not None and size is None:
        raise UserError(f"--transform {transform} needs --resolution WxH")
    if size is not None:
        if transform == "center-crop-wide":
            check_resolution(size[0], "--resolution width")
            if size[1] > size[0]:
                raise UserError(f"--resolution {size[0]}x{size[1]}: center-crop-wide needs height <= width")
        else:
            check_resolution(size)
    if max_images is not None and max_images < 1:
        raise UserError(f"--max-images {max_images}: must be at least 1")
    src = open_source(source, **source_kwargs)
    ds = ImageDataset(src, size=size, transform=transform, channels=channels, max_size=max_images, subset="first")
    if size is None:
        check_resolution(ds.resolution, f"source {source}: image size")
    if ds.num_channels not in (1, 3):
        raise UserError(f"source {source}: {ds.num_channels} channels; outputs need 1 or 3 (use --channels)")
    return ds


def iter_converted(ds: ImageDataset) -> Iterator[tuple[str, np.ndarray, int]]:
    for i in range(len(ds)):
        img, label, _ = ds[i]
        yield archive_name(i), img, label


def convert_dataset(
    source: str,
    dest: str,
    resolution: str | tuple[int, int] | None = None,
    transform: str | None = None,
    max_images: int | None = None,
    channels: int | None = None,
    progress: bool = True,
    **source_kwargs,
) -> int:
    """Convert ``source`` into an EDM-layout folder or ``.zip`` at ``dest``; returns the image count."""
    dest = os.path.expanduser(str(dest))
    _check_dest(dest)
    ds = open_for_convert(source, resolution, transform, max_images, channels, **source_kwargs)
    to_zip = dest.lower().endswith(".zip")
    bar = progress_bar(len(ds), f"convert {os.path.basename(dest)}", enabled=progress)
    items = (bar.update(1) or item for item in iter_converted(ds))

    labels: list[list] = []
    meta = lambda: {
        "labels": labels if ds.has_labels else None,
        **({"label_names": ds.label_names} if ds.label_names else {}),
    }
    if to_zip:

        def write_zip(f) -> None:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
                _write_all(items, labels, lambda name, data: zf.writestr(name, data))
                zf.writestr("dataset.json", json.dumps(meta()))

        atomic_write(dest, write_zip, before_replace=lambda: _check_dest(dest))
    else:
        with atomic_dir(dest, before_replace=lambda: _check_dest(dest)) as tmp:

            def put(name: str, data: bytes) -> None:
                path = tmp / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)

            _write_all(items, labels, put)
            put("dataset.json", json.dumps(meta()).encode())
    bar.close()
    return len(ds)


def _write_all(items, labels: list, put: Callable[[str, bytes], None]) -> None:
    for name, img, label in items:
        put(name, _png_bytes(img))
        if label >= 0:
            labels.append([name, int(label)])


def dataset_info(source: str, resolution: int | None = None, channels: int | None = None, **source_kwargs) -> dict:
    """Count, shape and labels of a source, without decoding images (headers only; NPY sources read each
    non-uint8 array once, for its min/max and the NaN/inf check)."""
    src = open_source(source, **source_kwargs)
    ds = ImageDataset(src, size=parse_resolution(resolution), channels=channels)
    c, h, w = ds.image_shape
    info = {
        "source": str(source),
        "kind": src.kind,
        "images": len(ds),
        "channels": c,
        "resolution": f"{w}x{h}",
        "label_rule": src.label_rule if ds.has_labels else "none",
        "label_dim": ds.label_dim,
        "label_names": ds.label_names,
        "label_counts": ds.label_counts.tolist(),
    }
    if hasattr(src, "arrays"):
        info["arrays"] = [
            {
                "array": a.where,
                "shape": list(a.shape),
                "dtype": str(a.dtype),
                "layout": a.layout,
                "images": a.count,
            }
            for a in src.arrays
        ]
    return info


def format_info(info: dict) -> str:
    lines = [
        f"source      {info['source']} ({info['kind']})",
        f"images      {info['images']}",
        f"shape       {info['channels']}x{info['resolution']} (channels x width x height)",
    ]
    if info["label_dim"]:
        lines.append(f"labels      {info['label_dim']} classes (from {info['label_rule']})")
        names = info["label_names"] or [str(k) for k in range(info["label_dim"])]
        counts = info["label_counts"]
        lines.append("per class   " + ", ".join(f"{n}: {c}" for n, c in zip(names, counts)))
    else:
        lines.append("labels      none")
    for a in info.get("arrays", [])[:20]:
        lines.append(f"array       {a['array']} {tuple(a['shape'])} {a['dtype']} {a['layout']} -> {a['images']}")
    if len(info.get("arrays", [])) > 20:
        lines.append(f"            ... {len(info['arrays']) - 20} more arrays")
    return "\n".join(lines)
