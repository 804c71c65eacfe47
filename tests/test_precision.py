"""DESIGN.md "Precision": TF32 is off in training, generation and the FID detector unless opted in
(review defect 2: PyTorch's own default allows TF32 in cuDNN convolutions)."""

from __future__ import annotations

import pytest
import torch

import difflab.generate as gen
import difflab.train.loop as loop
from difflab.utils import set_tf32
from tests.test_train import tiny_cfg


def flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_on_outside():
    """The caller's settings are TF32-on (cuDNN's default); every test restores the real defaults."""
    before = flags()
    set_tf32(True, True)
    yield
    set_tf32(*before)


@pytest.mark.parametrize("opt_in", [False, True])
def test_training_runs_with_tf32_off_unless_opted_in(tmp_path, monkeypatch, tf32_on_outside, opt_in):
    seen = []
    real = loop.update_ema
    monkeypatch.setattr(loop, "update_ema", lambda *a, **k: (seen.append(flags()), real(*a, **k))[1])
    loop.train(tiny_cfg(stop_after_steps=2, tf32=opt_in), run_dir=tmp_path / "r", progress=False)
    assert seen and all(f == (opt_in, opt_in) for f in seen)
    assert flags() == (True, True)  # the caller's settings come back


@pytest.mark.parametrize("opt_in", [False, True])
def test_generation_runs_with_tf32_off_unless_opted_in(tmp_path, monkeypatch, tf32_on_outside, opt_in):
    run = loop.train(tiny_cfg(stop_after_steps=1), run_dir=tmp_path / "r", progress=False)
    model, cfg, _ = gen.load_run(run, "cpu")
    seen = []
    real = type(model).sample
    monkeypatch.setattr(type(model), "sample", lambda self, *a, **k: (seen.append(flags()), real(self, *a, **k))[1])
    list(gen.generate_batches(model, [0, 1], 2, cfg.sampler, "cpu", progress=False, tf32=opt_in))
    assert seen == [(opt_in, opt_in)]
    assert flags() == (True, True)


@pytest.mark.parametrize("opt_in", [False, True])
def test_fid_detector_runs_with_tf32_off_unless_opted_in(monkeypatch, tf32_on_outside, opt_in):
    from difflab.metrics.inception import FEATURE_DIM, InceptionDetector

    det = InceptionDetector(resize="tf", device="cpu", tf32=opt_in)
    seen = []
    monkeypatch.setattr(det, "_forward", lambda x: (seen.append(flags()), torch.zeros(x.shape[0], FEATURE_DIM))[1])
    det.features(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert seen == [(opt_in, opt_in)]
    assert flags() == (True, True)
