"""The one training loop: exact resume, rank-count invariance, batch-invariant generation, run-dir contract."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difflab.build import build_model
from difflab.config import RunConfig
from difflab.errors import UserError
from difflab.generate import generate
from difflab.runio import list_checkpoints
from difflab.train.loop import read_stats, train

TINY_NET = {"name": "ddpmpp", "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [],
            "dropout": 0.0, "channel_mult_emb": 2}


# one method per family whose state or loss could break exact resume / rank invariance
METHOD_CFGS = {"edm": {"name": "edm"}, "sde-ve": {"name": "sde-ve"}, "sde-vp": {"name": "sde-vp"},
               "sde-subvp": {"name": "sde-subvp", "likelihood_weighting": True}, "ddpm": {"name": "ddpm"},
               # iDDPM's loss-second-moment sampler over 3 indices: its 3 x 10 history fills within the run,
               # so the later steps draw t by importance from the training state
               "iddpm-lsm": {"name": "ddpm", "schedule": "cosine", "num_timesteps": 3,
                             "timestep_sampler": "loss-second-moment"},
               # DDDM's estimate bank over 20 images: 48 positions span 3 epochs, so w = 1/(epoch+1) changes, and
               # the 3rd step (positions 16-23) holds two epochs: index 15 occurs once on each of 2 ranks
               "dddm": {"name": "dddm", "metric": "pseudo-huber"}}
DATA_EXTRA = {"dddm": {"max_size": 20}}
NET_EXTRA = {"dddm": {"context_mode": "concat"}}
SAMPLER = {"dddm": {"sampler": "dddm", "steps": 2}}


def tiny_cfg(method: str = "edm", **train) -> RunConfig:
    t = {"batch": 8, "duration_kimg": 0.048, "lr": 1e-3, "tick_kimg": 0.016, "snapshot_ticks": 1, "workers": 0,
         "grid_seeds": "0-3", "ema_halflife_kimg": 0.01}
    t.update(train)
    net = {**TINY_NET, **NET_EXTRA.get(method, {})}
    data = {"source": "digits", "resolution": 8, "max_size": 64, **DATA_EXTRA.get(method, {})}
    return RunConfig.from_dict({"data": data,
                                "method": dict(METHOD_CFGS[method]), "network": net, "train": t,
                                "sampler": SAMPLER.get(method, {"sampler": "heun", "steps": 3})})


def final_tensors(run_dir: Path) -> dict:
    """The tensors of the run's newest complete checkpoint (by step)."""
    return load_file(str(list_checkpoints(run_dir)[-1].with_suffix(".safetensors")))


def without_key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` without the attention key bias: its gradient is exactly zero (softmax is shift invariant), and
    Adam normalises the rounding noise there into +-lr steps whose sign depends on the order of the sums."""
    if not name.endswith("qkv.bias"):
        return t
    c = t.numel() // 3
    return torch.cat([t[:c], t[2 * c:]])


def test_run_dir_contents(tmp_path):
    run = train(tiny_cfg(), run_dir=tmp_path / "run", progress=False)
    names = {p.name for p in run.iterdir()}
    assert {"training_options.json", "log.txt", "stats.jsonl", "checkpoint-000000.json",
            "checkpoint-000000.safetensors"} <= names
    assert any(n.startswith("samples-") and n.endswith(".png") for n in names)
    opts = json.loads((run / "training_options.json").read_text())
    assert opts["image"] == {"channels": 1, "resolution": 8, "label_dim": 0, "augment_dim": 0}
    stats = read_stats(run)
    assert [round(s["kimg"], 3) for s in stats] == [0.016, 0.032, 0.048]
    assert all(np.isfinite(s["loss"]) and s["img_per_sec"] > 0 for s in stats)


@pytest.mark.parametrize("method", list(METHOD_CFGS))
def test_resume_equals_uninterrupted(tmp_path, method):
    """N steps straight == N/2 steps, stop, resume, N/2 steps: model, EMA and optimizer bitwise equal."""
    a = train(tiny_cfg(method), run_dir=tmp_path / "a", progress=False)
    b = train(tiny_cfg(method, stop_after_steps=3), run_dir=tmp_path / "b", progress=False)
    assert json.loads(list_checkpoints(b)[-1].read_text())["step"] == 3
    train(tiny_cfg(method), run_dir=tmp_path / "b", progress=False)  # resumes automatically
    ta, tb = final_tensors(a), final_tensors(b)
    assert set(ta) == set(tb) and any(k.startswith("optim.") for k in ta) and any(k.startswith("ema.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    # the last tick (steps 5-6) lies wholly after the restart in both runs: its mean loss must agree exactly
    assert read_stats(a)[-1]["loss"] == read_stats(b)[-1]["loss"]


def test_dddm_bank_is_stored_once_and_updated_at_the_step_indices(tmp_path):
    """One step: the checkpoint holds the bank once (state.bank, nothing bank-sized under model./ema.), rows of
    the step's dataset indices hold x0 (bank_update=release), every other row its N(0, I) initial value."""
    from difflab.data import open_dataset
    from difflab.methods.dddm import DDDMMethod
    from difflab.train.loop import PositionDataset

    cfg = tiny_cfg("dddm", duration_kimg=0.008, tick_kimg=0.008)
    cfg.method["bank_update"] = "release"
    t = final_tensors(train(cfg, run_dir=tmp_path / "r", progress=False))
    bank = t["state.bank"]
    assert bank.shape == (20, 1, 8, 8) and bank.dtype == torch.float32
    assert [k for k, v in t.items() if v.shape == bank.shape] == ["state.bank"]
    assert not any("bank" in k for k in t if not k.startswith("state."))
    dataset = open_dataset(source="digits", resolution=8, max_size=20)
    pos = PositionDataset(dataset, np.arange(20), seed=0)
    step_idx = sorted({pos.index_of(p) for p in range(8)})
    init = DDDMMethod(torch.nn.Identity(), 1, 8).init_training_state(20, torch.Generator().manual_seed(0))["bank"]
    x0 = torch.stack([torch.from_numpy(dataset[i][0]).float() / 127.5 - 1 for i in step_idx])
    torch.testing.assert_close(bank[step_idx], x0)
    others = [i for i in range(20) if i not in step_idx]
    assert torch.equal(bank[others], init[others])


def test_gradient_accumulation_matches_full_batch(tmp_path):
    a = train(tiny_cfg(), run_dir=tmp_path / "a", progress=False)
    b = train(tiny_cfg(batch_gpu=2), run_dir=tmp_path / "b", progress=False)
    ta, tb = final_tensors(a), final_tensors(b)
    for k in ta:
        if k.startswith("model."):
            assert torch.allclose(ta[k], tb[k], atol=1e-5, rtol=1e-4), k


@pytest.mark.slow  # inductor compiles the tiny net's forward and backward: about 3 min on 2 CPU cores
def test_compile_matches_eager_and_keeps_checkpoint_names(tmp_path):
    """--compile (torch.compile on the backbone) is opt-in and result-preserving: after 6 steps the weights
    equal the eager run's to float tolerance, under the same names, and a resume may switch it off."""
    a = train(tiny_cfg(), run_dir=tmp_path / "a", progress=False)
    b = train(tiny_cfg(compile=True), run_dir=tmp_path / "b", progress=False)
    ta, tb = final_tensors(a), final_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if k.startswith(("model.", "ema.")):
            torch.testing.assert_close(tb[k], ta[k], atol=1e-5, rtol=1e-4, msg=k)
    train(tiny_cfg(duration_kimg=0.064), run_dir=tmp_path / "b", progress=False)  # resume eagerly
    assert "resume: --compile false (was true)" in (tmp_path / "b" / "log.txt").read_text()


def test_channels_last_matches_the_usual_layout(tmp_path, monkeypatch):
    """--channels-last trains the backbone in the NHWC layout: the weights after 6 steps equal the usual
    layout's to float tolerance, the checkpoint stores them under the same names, and a resume may switch it."""
    import difflab.training.loop as loop

    built = []
    monkeypatch.setattr(loop, "build_model", lambda cfg: built.append(build_model(cfg)) or built[-1])
    a = train(tiny_cfg(), run_dir=tmp_path / "a", progress=False)
    b = train(tiny_cfg(channels_last=True), run_dir=tmp_path / "b", progress=False)
    convs = [[p for p in m.net.parameters() if p.ndim == 4] for m in built]
    assert convs[0] and convs[1]
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in convs[0])
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs[1])
    ta, tb = final_tensors(a), final_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if k.startswith(("model.", "ema.")):
            torch.testing.assert_close(without_key_bias(k, tb[k]), without_key_bias(k, ta[k]), atol=1e-5, rtol=1e-4,
                                       msg=k)
    train(tiny_cfg(duration_kimg=0.064), run_dir=tmp_path / "b", progress=False)
    assert "resume: --channels-last false (was true)" in (tmp_path / "b" / "log.txt").read_text()


@pytest.mark.parametrize("method", ["edm", "sde-subvp", "iddpm-lsm", "dddm"])
def test_two_gloo_ranks_follow_one_process(tmp_path, method):
    """torchrun with 2 CPU ranks at global batch B follows the single-process loss trajectory."""
    cfg = tiny_cfg(method)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    one = train(tiny_cfg(method), run_dir=tmp_path / "one", progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m",
           "difflab", "train", "--preset", str(cfg_path), "--run-dir", str(tmp_path / "two"), "--no-progress",
           "--device", "cpu"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    l1 = [s["loss"] for s in read_stats(one)]
    l2 = [s["loss"] for s in read_stats(tmp_path / "two")]
    assert len(l1) == len(l2) == 3
    assert np.allclose(l1, l2, rtol=1e-4), (l1, l2)
    t1, t2 = final_tensors(one), final_tensors(tmp_path / "two")
    for k in t1:
        if k.startswith("model."):
            assert torch.allclose(without_key_bias(k, t1[k]), without_key_bias(k, t2[k]), atol=1e-5, rtol=1e-3), k
    # training state: the same values on 2 ranks as on 1 (not rank 0's half of them)
    states = sorted(k for k in t1 if k.startswith("state."))
    assert states == sorted(k for k in t2 if k.startswith("state."))
    assert bool(states) == (method in ("iddpm-lsm", "dddm"))
    for k in states:
        if t1[k].is_floating_point():
            assert torch.allclose(t1[k], t2[k], rtol=1e-4, atol=1e-7), k
        else:
            assert torch.equal(t1[k], t2[k]), k
    if method == "iddpm-lsm":
        assert t1["state.loss_counts"].tolist() == [10, 10, 10]  # 48 examples fill every history


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return train(tiny_cfg(), run_dir=tmp_path_factory.mktemp("r") / "run", progress=False)


def test_generate_is_batch_invariant(trained_run, tmp_path):
    seeds = list(range(20))
    outs = []
    for batch in (1, 7, 64):
        out = generate(trained_run, seeds, tmp_path / f"b{batch}", batch=batch, progress=False, steps=4, S_churn=2)
        outs.append(np.stack([np.asarray(Image.open(out / f"{s:06d}.png")) for s in seeds]))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    assert (tmp_path / "b7" / "grid.png").exists()
    assert outs[0].std() > 0  # not a constant image


def test_generate_npz_and_subdirs(trained_run, tmp_path):
    out = generate(trained_run, [3, 1001], tmp_path / "o", subdirs=True, progress=False, steps=2)
    assert (out / "000000" / "000003.png").exists() and (out / "001000" / "001001.png").exists()
    out = generate(trained_run, [5, 6, 7], tmp_path / "n", npz=True, progress=False, steps=2)
    with np.load(out / "images.npz") as z:
        assert z["images"].shape == (3, 8, 8, 1) and z["images"].dtype == np.uint8
        assert z["seeds"].tolist() == [5, 6, 7]


def test_checkpoint_of_another_architecture_is_refused(trained_run, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(trained_run, other)
    opts = json.loads((other / "training_options.json").read_text())
    opts["network"]["model_channels"] = 16
    (other / "training_options.json").write_text(json.dumps(opts))
    with pytest.raises(UserError, match="architecture"):
        generate(other, [0], tmp_path / "x", progress=False)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "difflab", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["train", "--preset", "no-such-preset"], "--preset 'no-such-preset' is unknown"),
    (["generate", "--network", "/no/such/run", "--outdir", "x"], "/no/such/run"),
    (["train", "--data", "digits", "--resolution", "12", "--duration", "0.01"], "power of two"),
    (["train", "--bogus-flag", "3"], "unknown option --bogus-flag"),
    (["train", "--batch", "8", "--batch-gpu", "3"], "--batch-gpu 3"),
])
def test_bad_input_one_clear_line(args, needle, tmp_path):
    extra = ["--outdir", str(tmp_path)] if args[0] == "train" else []
    res = run_cli(*args, *extra, cwd=tmp_path)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("difflab: error:") and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_failed_resume_keeps_earlier_outputs(trained_run, tmp_path):
    """A corrupt newer checkpoint is reported clearly and the earlier files are untouched."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = {p.name: p.read_bytes() for p in run.glob("checkpoint-*")}
    (run / "checkpoint-000099.json").write_text("{}")
    (run / "checkpoint-000099.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="checkpoint-000099"):
        train(tiny_cfg(duration_kimg=0.1), run_dir=run, progress=False)
    for name, data in before.items():
        assert (run / name).read_bytes() == data


def test_from_scratch_archives_the_old_run_and_starts_anew(tmp_path):
    """score SDE's --training_from_scratch: nothing is deleted, the new run does not resume."""
    run = tmp_path / "r"
    train(tiny_cfg(stop_after_steps=2), run_dir=run, progress=False)
    old = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    train(tiny_cfg(stop_after_steps=1), run_dir=run, progress=False, from_scratch=True)
    archives = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert len(archives) == 1
    assert {p.name: p.read_bytes() for p in archives[0].iterdir() if p.is_file()} == old
    assert json.loads(list_checkpoints(run)[-1].read_text())["step"] == 1  # not 2 + 1
    assert "Resuming" not in (run / "log.txt").read_text()


def test_log_level_warning_hides_progress_lines(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(tiny_cfg(stop_after_steps=1).to_dict()))
    cmd = [sys.executable, "-m", "difflab", "--log-level", "warning", "train", "--preset", str(cfg_path),
           "--run-dir", str(tmp_path / "r"), "--no-progress", "--device", "cpu"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == ""
    assert "kimg" in (tmp_path / "r" / "log.txt").read_text()  # the file keeps every line
