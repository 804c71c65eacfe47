"""Training faults of issue 12 (docs/reliability.md): divergence writes no checkpoint of non-finite weights and
generate refuses such weights; a resume refuses typed options that differ from the stored run; SIGTERM/SIGINT
checkpoint and stop; --snap-minutes checkpoints between ticks. Tiny CPU runs (tests/test_train.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from difflab.cli import main
from difflab.errors import Stopped, UserError
from difflab.generate import generate
from difflab.runio import list_checkpoints, read_checkpoint, read_stats
from difflab.training import loop
from difflab.training.loop import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import final_tensors, tiny_cfg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("difflab: error: "), err
    return err[0]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b) and any(k.startswith("optim.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- divergence --------------------------------------------------------------------------------------

def test_divergence_keeps_only_finite_checkpoints(tmp_path):
    """--lr 1e6 after a 2-step warm-up (step 0 at lr 0, step 1 at 5e5): the loss is NaN from step 3 on. The
    checkpoints of steps 1 and 2 are written, none after; the stop names the last good one, truthfully."""
    run = tmp_path / "r"
    cfg = tiny_cfg(lr=1e6, lr_rampup_kimg=0.016, tick_kimg=0.008, duration_kimg=0.2)
    with pytest.raises(UserError, match="non-finite for 10 steps") as e:
        train(cfg, run_dir=run, progress=False)
    good = list_checkpoints(run)
    assert [read_checkpoint(p)[0]["step"] for p in good] == [1, 2]
    assert f"keeps its last good checkpoint, {good[-1].name}" in str(e.value)
    for p in run.glob("checkpoint-*.safetensors"):  # every file, listed or not
        for k, v in load_file(str(p)).items():
            assert torch.isfinite(v).all(), (p.name, k)
    log = (run / "log.txt").read_text()
    assert "no checkpoint at step 3" in log and "non-finite" in log
    assert any(s["loss"] != s["loss"] for s in read_stats(run) if "loss" in s)  # it did diverge (NaN tick loss)


def test_no_checkpoint_at_all_when_the_first_tick_diverges(tmp_path):
    run = tmp_path / "r"
    with pytest.raises(UserError, match=f"no checkpoint was written to {run}"):
        train(tiny_cfg(lr=1e6, duration_kimg=0.2), run_dir=run, progress=False)
    assert not list(run.glob("checkpoint-*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train(tiny_cfg(), run_dir=tmp_path_factory.mktemp("t") / "run", progress=False)


def test_generate_refuses_non_finite_weights(trained, tmp_path, capsys):
    run = tmp_path / "nan"
    shutil.copytree(trained, run)
    st = list_checkpoints(run)[-1].with_suffix(".safetensors")
    tensors = load_file(str(st))
    meta = read_checkpoint(st.with_suffix(".json"))[0]
    key = next(k for k in tensors if k.startswith("ema.") and tensors[k].is_floating_point())
    tensors[key].view(-1)[:3] = float("nan")
    st.write_bytes(save(tensors, metadata={"step": str(meta["step"]), "nimg": str(meta["nimg"])}))
    with pytest.raises(UserError, match=r"3 of \d+ ema values are NaN or infinite"):
        generate(run, [0], tmp_path / "out", progress=False)
    line = one_line_error(["generate", "--network", str(run), "--outdir", str(tmp_path / "out2"), "--seeds", "0",
                           "--no-progress"], capsys)
    assert st.with_suffix(".json").name in line and "NaN or infinite" in line
    import difflab

    with pytest.raises(UserError, match="NaN or infinite"):
        difflab.load(run)
    with pytest.raises(UserError, match=r"\d+ of \d+ checkpoint values are NaN or infinite"):
        train(tiny_cfg(duration_kimg=0.1), run_dir=run, progress=False)  # nor does a resume continue from it
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))
    assert not (tmp_path / "out2").exists() or not list((tmp_path / "out2").glob("*.png"))


# ---- options on resume -------------------------------------------------------------------------------

def test_resume_refuses_typed_flags_that_differ_and_ignores_untyped_defaults(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(tiny_cfg().to_dict()))
    run = tmp_path / "run"
    main(["train", "--preset", str(cfg_path), "--run-dir", str(run), "--stop-after-steps", "2", "--no-progress"])
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    line = one_line_error(["train", "--run-dir", str(run), "--lr", "0.002", "--no-progress"], capsys)
    assert "--lr 0.002 differs from the run's stored lr 0.001" in line and "--from-scratch" in line
    line = one_line_error(["train", "--resume", str(run), "--batch", "16", "--ema", "0.02", "--no-progress"],
                          capsys)
    assert "--batch 16 differs from the run's stored batch 8 (and 1 more: --ema)" in line
    line = one_line_error(["train", "--run-dir", str(run), "--dropout", "0.5", "--no-progress"], capsys)
    assert "network.dropout 0.5 differs from the run's stored dropout 0.0" in line
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing written
    with pytest.raises(UserError, match="--lr 0.002 differs from the run's stored lr 0.001"):
        train(tiny_cfg(lr=2e-3), run_dir=run, progress=False)  # the Python API: the same line
    # no --preset (the default preset differs from the stored run in every section), the stored batch typed
    # again, and the options a resume may change: accepted, applied, recorded
    main(["train", "--run-dir", str(run), "--batch", "8", "--duration", "0.064", "--workers", "0",
          "--no-progress"])
    assert read_checkpoint(list_checkpoints(run)[-1])[0]["step"] == 8
    stored = json.loads((run / "training_options.json").read_text())["train"]
    assert stored["duration_kimg"] == 0.064 and stored["lr"] == 1e-3
    assert "resume: --duration 0.064 (was 0.048), recorded in training_options.json" in (run / "log.txt").read_text()


# ---- signals and --snap-minutes ----------------------------------------------------------------------

def test_sigterm_checkpoints_exits_143_and_resumes_bitwise(tmp_path):
    """SIGTERM after the first log line: the step finishes, a checkpoint is written, the line says how to
    resume, exit status 143; `train --resume` then ends bitwise equal to an uninterrupted run."""
    cfg = tiny_cfg(duration_kimg=0.4, snapshot_ticks=100)  # 50 steps, one snapshot at the end
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    cli = [sys.executable, "-m", "difflab", "train", "--no-progress", "--device", "cpu"]
    ref = subprocess.run([*cli, "--preset", str(cfg_path), "--run-dir", str(tmp_path / "a")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "b"
    proc = subprocess.Popen([*cli, "--preset", str(cfg_path), "--run-dir", str(run)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("kimg"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    lines += out.splitlines()
    assert proc.returncode == 143, err[-2000:]
    stopped = [ln for ln in lines if ln.startswith("stopped by SIGTERM")]
    assert len(stopped) == 1 and stopped[0].strip().endswith(f"; resume with: difflab train --resume {run}")
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert 1 <= step < 50  # the first log line comes after step 1 (--no-progress)
    assert read_checkpoint(list_checkpoints(run)[-1])[0]["step"] == step
    res = subprocess.run([*cli, "--resume", str(run)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_bitwise_equal(final_tensors(tmp_path / "a"), final_tensors(run))


def test_sigint_in_the_python_api_checkpoints_raises_stopped_and_restores_handlers(tmp_path, monkeypatch):
    """SIGINT raised during step 3 (from inside the loop, so it is deterministic): the step finishes, a
    checkpoint of step 3 is written, Stopped (exit code 130) is raised, the caller's handlers are back."""
    real = loop.update_ema
    calls = []

    def update_ema(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    a = train(tiny_cfg(), run_dir=tmp_path / "a", progress=False)
    monkeypatch.setattr(loop, "update_ema", update_ema)
    with pytest.raises(Stopped, match=r"stopped by SIGINT at step 3; resume with") as e:
        train(tiny_cfg(), run_dir=tmp_path / "b", progress=False)
    assert e.value.exit_code == 130
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert read_checkpoint(list_checkpoints(tmp_path / "b")[-1])[0]["step"] == 3
    monkeypatch.undo()
    train(tiny_cfg(), run_dir=tmp_path / "b", progress=False)
    assert_bitwise_equal(final_tensors(a), final_tensors(tmp_path / "b"))


def test_snap_minutes_checkpoints_between_ticks_and_resumes_exactly(tmp_path, capsys):
    """--snap-minutes tiny: a checkpoint after every step, ticks of 2 steps. A resume from the mid-tick one of
    step 3 ends bitwise equal, and even the loss of the tick it splits (steps 3-4) agrees exactly."""
    cfg = tiny_cfg(snap_minutes=1e-9, snapshot_ticks=100)
    a = train(cfg, run_dir=tmp_path / "a", progress=False)
    assert [read_checkpoint(p)[0]["step"] for p in list_checkpoints(a)] == [1, 2, 3, 4, 5, 6]
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for p in list_checkpoints(b)[3:]:  # as if killed right after step 3's checkpoint
        p.unlink()
        p.with_suffix(".safetensors").unlink()
    (b / "stats.jsonl").write_text("")
    train(tiny_cfg(snap_minutes=1e-9, snapshot_ticks=100), run_dir=b, progress=False)
    assert_bitwise_equal(final_tensors(a), final_tensors(b))
    assert [s["loss"] for s in read_stats(b)] == [s["loss"] for s in read_stats(a)][1:]
    line = one_line_error(["train", "--snap-minutes", "0", "--outdir", str(tmp_path / "x")], capsys)
    assert "--snap-minutes 0" in line


DDP_SCRIPT = '''
import os, signal, sys
from difflab.config import RunConfig
from difflab.errors import Stopped, UserError
from difflab.training import loop

if len(sys.argv) > 3:  # SIGTERM to one rank only, during its 3rd step
    real, calls = loop.update_ema, []

    def update_ema(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and os.environ["RANK"] == sys.argv[3]:
            if len(sys.argv) > 4:  # "kill": the rank dies as under kill -9 (no handler, no checkpoint)
                os._exit(9)
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    loop.update_ema = update_ema
try:
    loop.train(RunConfig.load(sys.argv[1]), run_dir=sys.argv[2], progress=False, device="cpu")
except Stopped as e:
    print(f"rank {os.environ['RANK']}: {e}", flush=True)
except UserError as e:  # as the command line reports it
    sys.exit(f"difflab: error: {e}")
'''


def _torchrun(script, cfg_path, env, run_dir, *extra, ok=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), str(cfg_path), str(run_dir), *extra]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert (res.returncode == 0) == ok, res.stderr[-3000:]
    return res


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_agree_to_stop_when_one_is_signalled(tmp_path):
    """2 gloo ranks, SIGTERM to rank 1 alone: both stop after step 3 (rank 0 was told by the all-reduce, so
    nobody hangs in the next gradient sync), one checkpoint of step 3; the resume on 2 ranks ends bitwise
    equal to an uninterrupted 2-rank run."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(tiny_cfg().to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))

    def torchrun(run_dir, *extra):
        return _torchrun(script, cfg_path, env, run_dir, *extra).stdout

    out = torchrun(tmp_path / "b", "1")
    # the two ranks print at the same moment, so their lines can run together: match, do not split lines
    stops = sorted(re.findall(r"(rank \d): stopped by SIGTERM at step (\d+); resume with", out))
    assert stops == [("rank 0", "3"), ("rank 1", "3")], out
    assert [read_checkpoint(p)[0]["step"] for p in list_checkpoints(tmp_path / "b")] == [2, 3]
    torchrun(tmp_path / "b")
    torchrun(tmp_path / "a")
    assert_bitwise_equal(final_tensors(tmp_path / "a"), final_tensors(tmp_path / "b"))


def test_a_ddp_rank_killed_mid_run_resumes_exactly_after_a_restart(tmp_path):
    """Rank 1 dies as under `kill -9` during step 3 (after the checkpoint of step 2): rank 0 stops with one
    line naming the dead peer (no gloo traceback), the job fails, and restarting it on 2 ranks resumes from
    step 2 and ends bitwise equal to an uninterrupted 2-rank run."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(tiny_cfg().to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = _torchrun(script, cfg_path, env, tmp_path / "b", "1", "kill", ok=False)
    errors = [ln for ln in res.stderr.splitlines() if "difflab: error:" in ln]
    assert len(errors) == 1 and "rank 0 of 2: another rank stopped" in errors[0], res.stderr[-3000:]
    assert not any(ln.startswith("[rank0]") and "Traceback" in ln for ln in res.stderr.splitlines()), res.stderr
    assert [read_checkpoint(p)[0]["step"] for p in list_checkpoints(tmp_path / "b")] == [2]
    _torchrun(script, cfg_path, env, tmp_path / "b")
    _torchrun(script, cfg_path, env, tmp_path / "a")
    assert_bitwise_equal(final_tensors(tmp_path / "a"), final_tensors(tmp_path / "b"))
