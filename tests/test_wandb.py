"""Weights & Biases logging (issue 13 item 3): an offline run holds the stats.jsonl scalars, the in-training
FID and the sample grids; a resumed run continues the same W&B run; without wandb, one line."""

import json
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import difflab.metrics.fid as fid_mod
from difflab.errors import UserError
from difflab.metrics.standin import PixelProjectionDetector
from difflab.runio import read_stats
from difflab.training.loop import train
from tests.test_train import tiny_cfg

BLOCK, HEADER = 32768, 7  # the .wandb file: a LevelDB-style log of protobuf Records after a 7-byte header


def read_wandb_records(path: Path) -> list:
    """Every Record of an offline ``run-ID.wandb`` file (wandb >= 0.19 ships no Python reader)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    out, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        if kind == 0 and length == 0:
            break
        assert crc == zlib.crc32(bytes([kind]) + chunk), f"{path}: bad record checksum at byte {pos}"
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def history(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    # the in-training FID with a fast stand-in detector (numbers not comparable to FID; the plumbing is the point)
    monkeypatch.setattr(fid_mod, "_DEFAULT_DETECTOR", PixelProjectionDetector(dim=8))
    return tmp_path / "wandb-dir"


def test_offline_run_has_scalars_fid_and_sample_grids(offline, tmp_path):
    pytest.importorskip("wandb")
    run = train(tiny_cfg(wandb="difflab-test", fid_every=1, fid_num=8, stop_after_steps=4), run_dir=tmp_path / "run",
                progress=False)
    assert json.loads((run / "training_options.json").read_text())["train"]["wandb"] == "difflab-test"
    (wdir,) = (offline / "wandb").glob("offline-run-*")
    run_id = (run / "wandb-run-id.txt").read_text().strip()
    assert wdir.name.endswith(run_id)
    rows = history(read_wandb_records(next(wdir.glob("run-*.wandb"))))
    stats = read_stats(run)
    ticks = [s for s in stats if "loss" in s]
    fids = [s["fid"] for s in stats if "fid" in s]
    assert len(ticks) == 2 and len(fids) == 2  # 4 steps of 8 images, a tick and a snapshot every 2 steps
    # every scalar of stats.jsonl, with its value, at its step
    logged = {k: [r[k] for r in rows if k in r] for k in ("loss", "lr", "img_per_sec", "sec_per_kimg", "fid")}
    assert logged["loss"] == [s["loss"] for s in ticks] and logged["lr"] == [s["lr"] for s in ticks]
    assert logged["img_per_sec"] == [s["img_per_sec"] for s in ticks]
    assert logged["fid"] == pytest.approx(fids) and all(np.isfinite(fids))
    assert [r["_step"] for r in rows if "loss" in r] == [s["step"] for s in ticks]
    # one sample grid per snapshot, at the snapshot's step; the last one is the grid the run wrote
    images = [(r["_step"], r["samples/path"]) for r in rows if "samples/path" in r]
    assert [st for st, _ in images] == [s["step"] for s in ticks]
    files = [wdir / "files" / path for _, path in images]
    assert all(f.is_file() for f in files) and len(set(files)) == 2
    last = np.asarray(Image.open(files[-1]).convert("RGB"))
    grid = np.asarray(Image.open(run / "samples-000000.png").convert("RGB"))
    assert last.shape == grid.shape and np.array_equal(last, grid) and grid.std() > 0

def test_resume_continues_the_same_wandb_run(offline, tmp_path):
    pytest.importorskip("wandb")
    run = train(tiny_cfg(wandb="difflab-test", stop_after_steps=2), run_dir=tmp_path / "run", progress=False)
    time.sleep(1.1)  # W&B names an offline run's folder by the second it starts
    train(tiny_cfg(wandb="difflab-test"), run_dir=run, progress=False)
    dirs = sorted((offline / "wandb").glob("offline-run-*"))
    run_id = (run / "wandb-run-id.txt").read_text().strip()
    assert len(dirs) == 2 and all(d.name.endswith("-" + run_id) for d in dirs)
    steps = [r["_step"] for d in dirs for r in history(read_wandb_records(next(d.glob("run-*.wandb")))) if "loss" in r]
    assert steps == [s["step"] for s in read_stats(run) if "loss" in s] == [2, 4, 6]


def test_missing_wandb_is_one_line_before_anything_is_written(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(UserError, match=r"--wandb needs the wandb package: pip install 'difflab\[wandb\]'") as e:
        train(tiny_cfg(wandb="p"), run_dir=tmp_path / "run", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_flag_spellings(tmp_path):
    from difflab.cli import build_parser
    from difflab.cli.train import config_from_args

    def cfg(*flags):
        args, extra = build_parser().parse_known_args(["train", *flags])
        return config_from_args(args, extra).train.wandb

    assert cfg() is None
    assert cfg("--wandb", "proj") == cfg("--project_name", "proj") == "proj"
    assert cfg("--log_to_wandb", "true", "--project_name", "proj") == "proj"  # the DDPM-CIFAR spelling
    assert cfg("--log_to_wandb", "True") == "difflab"
    assert cfg("--log_to_wandb", "false", "--project_name", "proj") is None
    with pytest.raises(UserError, match="--wandb 'a/b'"):
        cfg("--wandb", "a/b")


def test_wandb_that_cannot_start_is_one_line(monkeypatch, tmp_path):
    wandb = pytest.importorskip("wandb")

    def refuse(**kw):
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore detail")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(UserError) as e:
        train(tiny_cfg(wandb="proj"), run_dir=tmp_path / "run", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--wandb proj: W&B did not start (api_key not configured")
    assert "WANDB_MODE=offline" in msg
