"""Fault injection for tests/test_checkpoint_kill.py (not collected by pytest; no hooks in difflab itself).

``python tests/checkpoint_kill.py CONFIG.json RUN_DIR N`` trains CONFIG in RUN_DIR (resuming when it holds a
checkpoint) and calls ``os._exit(9)`` at the N-th boundary (0-based) of the checkpoint writes: before and after
each file's unlink, write, fsync and rename inside ``difflab.runio.save_checkpoint``. With N = -1 it never
kills and prints the boundaries it passed, one JSON list on the last stdout line.
"""

import json
import os
import sys
from pathlib import Path

import difflab.runio as runio
import difflab.runio.files as files
from difflab.config import RunConfig

seen: list[str] = []
inside = [False]
kill_at = int(sys.argv[3])


def boundary(name: str) -> None:
    if inside[0]:
        seen.append(name)
        if len(seen) - 1 == kill_at:
            os._exit(9)


def wrap(fn, what, name_of):
    def wrapped(*args, **kwargs):
        name = name_of(*args)
        boundary(f"before {what} {name}")
        out = fn(*args, **kwargs)
        boundary(f"after {what} {name}")
        return out
    return wrapped


current = [""]  # the file atomic_write is writing (fsync gets only a descriptor)
real_atomic_write = files.atomic_write


def atomic_write(path, write, before_replace=None):
    current[0] = Path(path).name
    return real_atomic_write(path, wrap(write, "write", lambda f: current[0]), before_replace)


files.atomic_write = atomic_write
os.fsync = wrap(os.fsync, "fsync", lambda fd: current[0])
os.replace = wrap(os.replace, "rename", lambda src, dst: Path(dst).name)
os.unlink = wrap(os.unlink, "unlink", lambda p, *a: Path(p).name)
real_save = runio.save_checkpoint


def save_checkpoint(*args, **kwargs):
    inside[0] = True
    try:
        return real_save(*args, **kwargs)
    finally:
        inside[0] = False


runio.save_checkpoint = save_checkpoint

if __name__ == "__main__":
    from difflab.training.loop import train

    train(RunConfig.load(sys.argv[1]), run_dir=sys.argv[2], progress=False, device="cpu")
    print(json.dumps(seen))
