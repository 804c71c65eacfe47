"""A kill at any checkpoint-write boundary, then a resume, ends bitwise equal to an uninterrupted run (issue 12,
"must show"). The kills come from tests/checkpoint_kill.py (os._exit(9) inside the patched os.replace/os.fsync/
os.unlink/atomic write), run as a subprocess of a tiny CPU training: 6 steps, a snapshot every 2 steps (all in
kimg 0, so snapshots 2 and 3 need fresh names) and a held-out split, so checkpoint-best is written too."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab.runio import list_checkpoints, read_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_cfg  # noqa: E402

KILLER = Path(__file__).parent / "checkpoint_kill.py"
ROOT = Path(__file__).resolve().parents[1]
SECOND = "checkpoint-000000-000000004"  # the second snapshot (step 4): checkpoint-000000 is complete by then


def run(cfg_path: Path, run_dir: Path, kill_at: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(KILLER), str(cfg_path), str(run_dir), str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (same wrapper, no kill) and the boundaries its checkpoint writes pass."""
    root = tmp_path_factory.mktemp("kill")
    cfg_path = root / "cfg.json"
    cfg_path.write_text(json.dumps(tiny_cfg(holdout=8).to_dict()))
    res = run(cfg_path, root / "ref", -1)
    assert res.returncode == 0, res.stderr[-2000:]
    return cfg_path, root / "ref", json.loads(res.stdout.strip().splitlines()[-1])


def outputs(run_dir: Path) -> dict[str, dict]:
    """Every checkpoint file's tensors (safetensors) or content without the wall time (JSON)."""
    out = {}
    for p in sorted(run_dir.glob("checkpoint-*")):
        out[p.name] = load_file(str(p)) if p.suffix == ".safetensors" else \
            {k: v for k, v in json.loads(p.read_text()).items() if k != "time"}
    return out


def kill_and_resume(reference, tmp_path, index: int) -> None:
    cfg_path, ref, boundaries = reference
    run_dir = tmp_path / f"k{index}"
    killed = run(cfg_path, run_dir, index)
    assert killed.returncode == 9, (boundaries[index], killed.stderr[-2000:])  # it was killed there
    # what a resume would see: only consistent pairs, and the newest one is step 2 or step 4
    listed = list_checkpoints(run_dir)
    assert listed, boundaries[index]
    for p in listed:
        meta, tensors = read_checkpoint(p)
        assert int(tensors["optim.0.step"]) == meta["step"]  # Adam's own counter agrees with the JSON
    assert read_checkpoint(listed[-1])[0]["step"] in (2, 4)
    resumed = run(cfg_path, run_dir, -1)
    assert resumed.returncode == 0, (boundaries[index], resumed.stderr[-2000:])
    assert "Resuming from" in resumed.stdout
    want, got = outputs(ref), outputs(run_dir)
    assert set(got) == set(want), boundaries[index]  # the same names, no leftover half pair
    for name in want:
        if name.endswith(".safetensors"):
            assert set(got[name]) == set(want[name])
            for k in want[name]:
                assert torch.equal(got[name][k], want[name][k]), (boundaries[index], name, k)
        else:
            assert got[name] == want[name], (boundaries[index], name)
    assert not list(run_dir.glob(".*.tmp")), boundaries[index]


def second_snapshot(boundaries: list[str]) -> range:
    """The boundaries of the second snapshot: its checkpoint-best, then its own checkpoint."""
    first = boundaries.index("before rename checkpoint-000000.json") + 2
    last = boundaries.index(f"after rename {SECOND}.json")
    return range(first, last + 1)


@pytest.mark.parametrize("where", [f"after rename {SECOND}.safetensors",  # the window of issue 12
                                   f"before rename {SECOND}.json",
                                   f"after rename {SECOND}.json"])
def test_kill_at_a_checkpoint_boundary_resumes_bitwise(reference, tmp_path, where):
    boundaries = reference[2]
    kill_and_resume(reference, tmp_path, boundaries.index(where))


def test_kill_inside_checkpoint_best_resumes_bitwise(reference, tmp_path):
    boundaries = reference[2]
    index = [i for i in second_snapshot(boundaries) if boundaries[i] == "after rename checkpoint-best.safetensors"]
    assert index  # the second snapshot improves the held-out loss, so it writes checkpoint-best
    kill_and_resume(reference, tmp_path, index[0])


@pytest.mark.slow
def test_kill_at_every_boundary_of_a_snapshot_resumes_bitwise(reference, tmp_path):
    """Every boundary of the second snapshot (checkpoint-best and the checkpoint written beside a complete one
    of the same kimg): 27 kills, 27 resumes."""
    boundaries = reference[2]
    span = second_snapshot(boundaries)
    assert len(span) >= 20
    for index in span:
        kill_and_resume(reference, tmp_path, index)


def test_a_mixed_pair_is_skipped_and_refused_and_old_checkpoints_still_load(reference, tmp_path):
    """The state the old in-place overwrite could leave (new tensors beside an old JSON): not listed, so a
    resume takes the previous checkpoint; read directly, one line naming the file. A checkpoint without the
    metadata (older difflab) still loads."""
    import shutil

    from safetensors.torch import save_file

    from difflab.errors import UserError

    run_dir = tmp_path / "mixed"
    shutil.copytree(reference[1], run_dir)
    first, second = run_dir / "checkpoint-000000", run_dir / SECOND
    shutil.copy(second.with_suffix(".safetensors"), first.with_suffix(".safetensors"))  # step 4 beside step 2
    assert first.with_suffix(".json") not in list_checkpoints(run_dir)
    assert second.with_suffix(".json") in list_checkpoints(run_dir)
    with pytest.raises(UserError, match=r"checkpoint-000000\.json: its \.safetensors is of step 4, its \.json of "
                                        r"step 2.*delete both"):
        read_checkpoint(first.with_suffix(".json"))
    save_file(load_file(str(second.with_suffix(".safetensors"))), str(first.with_suffix(".safetensors")))
    assert first.with_suffix(".json") in list_checkpoints(run_dir)  # no metadata: cannot tell, trusted
    assert read_checkpoint(first.with_suffix(".json"))[0]["step"] == 2
