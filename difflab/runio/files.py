"""Every file difflab writes (DESIGN.md "Checkpoints", "Errors"): :func:`atomic_write` (temp file in the same
folder, fsync, rename: a reader sees the old file or the whole new one), :func:`atomic_dir` (the same for a
folder), :func:`remove_stale_temps` (what a killed writer leaves), :func:`npz_bytes` (reproducible ``.npz``),
:func:`os_errors` (an OS error -> one line naming the path), :func:`check_folder_arg` /
:func:`check_file_arg` (an output option that names the wrong kind of path), :func:`append_text` (logs).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from difflab.errors import UserError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask() briefly changes process state

_OS_REASONS = {
    errno.ENOSPC: "no space left on the device; free some space and run again",
    errno.EDQUOT: "disk quota exceeded; free some space and run again",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.EACCES: "permission denied; choose a location you can write to",
    errno.EPERM: "operation not permitted; choose a location you can write to",
    errno.ENOTDIR: "a part of this path is a file, not a folder; choose another path",
    errno.EISDIR: "is a folder, not a file; choose a file name",
    errno.EEXIST: "exists and is not a folder; choose another path",
    errno.ENAMETOOLONG: "the name is too long",
}


def os_error_line(e: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for an OS error: the path (the one given, else the error's own) and what to do."""
    where = e.filename if path is None and e.filename is not None else path
    reason = _OS_REASONS.get(e.errno) or (e.strerror or str(e)).rstrip(".").lower()
    return f"{where}: {reason}" if where is not None else reason


@contextlib.contextmanager
def os_errors(path: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn an :class:`OSError` raised inside into a :class:`UserError` of one line naming ``path``
    (default: the file the error names)."""
    try:
        yield
    except OSError as e:
        raise UserError(os_error_line(e, path)) from None


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The nearest existing one of ``path`` and its parents when it is not a folder (None: nothing in the way)."""
    path = Path(os.path.abspath(path))
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def check_folder_arg(path: str | os.PathLike, flag: str) -> Path:
    """An output folder option (``--outdir``, ``--run-dir``, ``--dest``) must not name an existing file."""
    blocker = file_in_the_way(path)
    if blocker is not None:
        what = "is a file" if blocker == Path(os.path.abspath(path)) else f"is inside {blocker}, which is a file"
        raise UserError(f"{flag} {path}: {what}, not a folder; choose a folder")
    return Path(path)


def check_file_arg(path: str | os.PathLike, flag: str) -> Path:
    """An output file option (``--dest REF.npz``, ``--json``) must not name a folder nor lie inside a file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    blocker = file_in_the_way(path.parent)
    if blocker is not None:
        raise UserError(f"{flag} {path}: {blocker} is a file, not a folder; choose another path")
    return path


def mkdir(path: str | os.PathLike) -> Path:
    """``mkdir -p`` with a one-line error naming the folder."""
    path = Path(path)
    with os_errors(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any],
                 before_replace: Callable[[], Any] | None = None) -> None:
    """``write(f)`` into a temporary file in the same folder, fsync, then rename over ``path``: a reader sees
    the old file or the complete new one, never a torn one, and a failure (disk full, read-only) leaves the
    old file as it was and raises one line naming ``path``. ``before_replace`` runs just before the rename
    (a last check that the destination is still free)."""
    path = Path(path)
    mkdir(path.parent)
    with os_errors(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp's 0600 would hide outputs from the group
                os.fsync(f.fileno())
            if before_replace is not None:
                before_replace()
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, before_replace: Callable[[], Any] | None = None) -> Iterator[Path]:
    """A temporary sibling folder to fill; on success its files are fsynced and it is renamed to ``path``
    (which must be absent or an empty folder). On failure it is removed and ``path`` is untouched."""
    path = Path(path)
    mkdir(path.parent)
    with os_errors(path):
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            yield tmp
            for p in sorted(tmp.rglob("*")):
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            if before_replace is not None:
                before_replace()
            if path.is_dir():
                path.rmdir()  # empty (checked by the caller); rename cannot replace a folder everywhere
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def remove_stale_temps(folder: str | os.PathLike, name: str = "*", older_than: float = 0.0) -> int:
    """Delete the ``.{name}.*.tmp`` files (``name`` may be a glob such as ``*.png``) that :func:`atomic_write`
    leaves when its process is killed between writing and renaming; returns how many. ``older_than``
    (seconds) spares the temp files of a writer that may still be running."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    now = time.time()
    for p in folder.glob(f".{name}.*.tmp"):
        with contextlib.suppress(OSError):
            if p.is_file() and now - p.stat().st_mtime >= older_than:
                p.unlink()
                removed += 1
    return removed


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """``np.savez`` (uncompressed) with a fixed member timestamp, so equal arrays give equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    return buf.getvalue()


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append to a log file (``log.txt``, ``stats.jsonl``) with a one-line error naming it."""
    with os_errors(path), open(path, "a") as f:
        f.write(text)


def archive_run(run_dir: str | Path) -> Path | None:
    """Move everything a run dir holds into ``run_dir/previous-YYYYmmdd-HHMMSS/`` (renames only: nothing is
    deleted) so a new run can start there from scratch (score SDE's ``--training_from_scratch``). Earlier
    archives stay where they are. Returns the archive folder, or None when there was nothing to move."""
    import time

    run_dir = Path(run_dir)
    entries = [p for p in run_dir.iterdir() if not p.name.startswith("previous-")] if run_dir.is_dir() else []
    if not entries:
        return None
    dest = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 0
    while dest.exists():
        n += 1
        dest = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    dest.mkdir()
    for p in entries:
        os.replace(p, dest / p.name)
    return dest
