"""The training loop's formulas pinned against hand-computed values (EMA beta, its ramp-up, decay, start step
and update period, the EMA update itself, the learning-rate warm-up and cosine decay), not against another run
of the same code."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from difflab.config import TrainOptions
from difflab.errors import UserError
from difflab.train.ema import ema_beta, update_ema
from difflab.train.loop import ema_step_beta, learning_rate, read_stats, train
from tests.test_train import final_tensors, tiny_cfg


def test_ema_beta_half_life_with_ramp_up_by_hand():
    """EDM §5.6: h = min(halflife, ratio * nimg_before_step), beta = 0.5 ** (batch / h)."""
    # halflife 0.05 kimg = 50 images, ratio 0.5: the ramp binds until nimg = 100
    assert ema_beta(8, 0, 1, 0.05, 0.5, None) == 0.0  # first update copies the weights
    assert ema_beta(8, 8, 2, 0.05, 0.5, None) == pytest.approx(0.25, rel=1e-15)  # h = 4
    assert ema_beta(8, 16, 3, 0.05, 0.5, None) == pytest.approx(0.5, rel=1e-15)  # h = 8
    assert ema_beta(8, 400, 51, 0.05, 0.5, None) == pytest.approx(0.5 ** (8 / 50), rel=1e-15)  # h = halflife
    assert ema_beta(512, 10**7, 1, 500.0, None, None) == pytest.approx(0.5 ** (512 / 500e3), rel=1e-15)


def test_ema_beta_plain_decay_by_hand():
    """abarankab DDPM §2.4: copy the weights before ema_start, then the fixed decay."""
    assert ema_beta(128, 0, 1999, None, None, 0.9999, start_step=2000) == 0.0
    assert ema_beta(128, 0, 2000, None, None, 0.9999, start_step=2000) == 0.9999
    assert ema_beta(128, 0, 1, 0.5, 0.05, 0.995) == 0.995  # a decay overrides the half-life


def test_ema_beta_without_ramp_up_or_without_ema_by_hand():
    # no ramp-up: the half-life from the first step on; 0.01 kimg = 10 images
    assert ema_beta(8, 0, 1, 0.01, None, None) == pytest.approx(0.5 ** 0.8, rel=1e-15)
    assert ema_beta(4, 400, 101, 0.01, None, None) == pytest.approx(0.5 ** 0.4, rel=1e-15)
    # ramp-up ratio 0.05 at 1000 images seen: h = 50 images, not the 500-image half-life
    assert ema_beta(10, 1000, 101, 0.5, 0.05, None) == pytest.approx(0.5 ** 0.2, rel=1e-15)
    assert ema_beta(8, 10**6, 1, None, None, None) == 0.0  # no EMA: it follows the weights


def test_update_ema_interpolates_toward_the_weights_and_copies_buffers():
    """ema <- beta ema + (1 - beta) weights (§5.6 lerp(net, ema, beta)); buffers are copied, not averaged."""
    ema, model = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        ema.weight.copy_(torch.tensor([1.0, -2.0]))
        model.weight.copy_(torch.tensor([3.0, 2.0]))
        ema.running_mean.fill_(5.0)
        model.running_mean.copy_(torch.tensor([0.5, 7.0]))
    update_ema(ema, model, 0.25)
    assert ema.weight.tolist() == [0.25 * 1 + 0.75 * 3, 0.25 * -2 + 0.75 * 2]
    assert ema.running_mean.tolist() == [0.5, 7.0]
    assert model.weight.tolist() == [3.0, 2.0]  # the weights are not touched
    update_ema(ema, model, 0.0)
    assert ema.weight.tolist() == [3.0, 2.0]


def test_ema_step_beta_update_period_and_start_step_by_hand():
    """The loop's per-step EMA schedule: plain decay updates on steps divisible by ema_every, copying the
    weights before ema_start_step (abarankab DDPM, §2.4); the half-life form updates every step."""
    opts = TrainOptions(batch=128, ema_decay=0.9999, ema_start_step=2000, ema_every=10)
    assert ema_step_beta(opts, 1995, 0) is None and ema_step_beta(opts, 2005, 10**6) is None
    assert ema_step_beta(opts, 1990, 0) == 0.0 and ema_step_beta(opts, 10, 0) == 0.0
    assert ema_step_beta(opts, 2000, 0) == 0.9999 and ema_step_beta(opts, 2010, 0) == 0.9999
    assert ema_step_beta(TrainOptions(ema_decay=0.99, ema_every=1), 7, 0) == 0.99  # period 1: every step
    half = TrainOptions(batch=8, ema_halflife_kimg=0.05, ema_rampup_ratio=0.5, ema_every=10)
    assert ema_step_beta(half, 3, 16) == pytest.approx(0.5, rel=1e-15)  # h = 8: ema_every does not apply
    assert ema_step_beta(half, 1, 0) == 0.0


# ---- learning rate ------------------------------------------------------------------------------------

def _lr(nimg, **kw):
    opts = TrainOptions(**{"lr": 2e-4, "duration_kimg": 100.0, **kw})
    return learning_rate(opts, nimg)


def test_learning_rate_warm_up_by_hand():
    """Linear warm-up over lr_rampup_kimg (EDM §5.6 lr_rampup_kimg; SDD §5.5), from 0 at the first step."""
    assert _lr(0, lr_rampup_kimg=10) == 0.0
    assert _lr(2500, lr_rampup_kimg=10) == pytest.approx(5e-5, rel=1e-15)
    assert _lr(9999, lr_rampup_kimg=10) == pytest.approx(2e-4 * 0.9999, rel=1e-15)
    assert _lr(10000, lr_rampup_kimg=10) == pytest.approx(2e-4, rel=1e-15)
    assert _lr(10**7, lr_rampup_kimg=10) == pytest.approx(2e-4, rel=1e-15)  # no decay after the warm-up
    assert _lr(0) == 2e-4 and _lr(10**7) == 2e-4  # no warm-up: constant


def test_learning_rate_cosine_by_hand():
    """Cosine from lr at 0 to 0 at duration_kimg, 0.5 (1 + cos(pi f)), and 0 after the end."""
    assert _lr(0, lr_schedule="cosine") == pytest.approx(2e-4, rel=1e-15)
    assert _lr(25000, lr_schedule="cosine") == pytest.approx(2e-4 * 0.8535533905932737, rel=1e-14)
    assert _lr(50000, lr_schedule="cosine") == pytest.approx(1e-4, rel=1e-14)
    assert _lr(75000, lr_schedule="cosine") == pytest.approx(2e-4 * 0.14644660940672624, rel=1e-14)
    assert _lr(100000, lr_schedule="cosine") == pytest.approx(0.0, abs=1e-20)
    assert _lr(150000, lr_schedule="cosine") == pytest.approx(0.0, abs=1e-20)
    # warm-up and cosine multiply: at 5 kimg of a 10 kimg warm-up, f = 0.05: 0.5 * 0.5 (1 + cos(0.05 pi))
    assert _lr(5000, lr_schedule="cosine", lr_rampup_kimg=10) == pytest.approx(2e-4 * 0.4969220851487844,
                                                                                rel=1e-14)
    with pytest.raises(UserError, match="--lr-schedule linear: choose one of constant, cosine"):
        _lr(0, lr_schedule="linear")


def test_a_real_run_applies_the_learning_rate_of_each_step(tmp_path):
    """Step k (0-based, 8k images seen before it) of a 6-step run with a 0.016 kimg warm-up and a cosine over
    0.048 kimg runs at 1e-3 min(8k/16, 1) 0.5 (1 + cos(pi 8k/48)): logged per step, and the optimizer's
    own rate at the end is the last step's (the loop really sets it)."""
    cfg = tiny_cfg(tick_kimg=0.008, lr_rampup_kimg=0.016, lr_schedule="cosine", snapshot_ticks=6)
    run = train(cfg, run_dir=tmp_path / "run", progress=False)
    want = [1e-3 * min(8 * k / 16, 1) * 0.5 * (1 + math.cos(math.pi * 8 * k / 48)) for k in range(6)]
    assert want[0] == 0 and want[1] == pytest.approx(0.5 * 1e-3 * 0.5 * (1 + math.cos(math.pi / 6)))
    got = [s["lr"] for s in read_stats(run) if "lr" in s]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-20)
    meta = json.loads(sorted(run.glob("checkpoint-0*.json"))[-1].read_text())
    assert meta["optimizer"]["param_groups"][0]["lr"] == pytest.approx(want[-1], rel=1e-12)


def _weights(run, prefix):
    return {k[len(prefix):]: v.double() for k, v in final_tensors(run).items() if k.startswith(prefix)}


def test_ema_of_a_real_run_follows_the_formula(tmp_path):
    """Replay the EMA by hand from the weights after each step: ema_k = b_k ema_{k-1} + (1 - b_k) w_k with
    b_k from the images seen before step k (review defect 5: the ramp used the count after the step).
    Runs stopped after k steps equal the uninterrupted run (tested elsewhere), so they expose w_k."""
    opts = dict(ema_halflife_kimg=0.05, ema_rampup_ratio=0.5, batch=8)
    weights = [_weights(train(tiny_cfg(stop_after_steps=k, **opts), run_dir=tmp_path / f"r{k}", progress=False),
                        "model.") for k in (1, 2, 3, 4)]
    ema_run = _weights(tmp_path / "r4", "ema.")
    ema = None
    for k, w in enumerate(weights, start=1):
        h = min(50.0, 0.5 * 8 * (k - 1))
        b = 0.0 if h == 0 else 0.5 ** (8 / h)
        ema = {n: v.clone() for n, v in w.items()} if ema is None else {n: b * ema[n] + (1 - b) * w[n] for n in w}
        if k == 1:
            assert b == 0.0
    assert set(ema) == set(ema_run)
    moved = 0.0
    for n in ema:
        if ema[n].is_floating_point():
            torch.testing.assert_close(ema_run[n], ema[n], rtol=0, atol=2e-7)
            moved = max(moved, float((weights[-1][n] - ema[n]).abs().max()))
    assert moved > 1e-4  # the EMA really lags the weights: the check above has something to see
    assert math.isfinite(moved)


def test_plain_decay_ema_of_a_real_run_follows_the_formula(tmp_path):
    """DDPM-style EMA in a real 4-step run with ema_every 2 and ema_start_step 4: the EMA is updated after
    steps 2 (a copy: 2 < start) and 4 (decay 0.9), so ema_4 = 0.9 w_2 + 0.1 w_4 by hand."""
    opts = dict(ema_decay=0.9, ema_every=2, ema_start_step=4, duration_kimg=0.032)
    runs = {k: train(tiny_cfg(stop_after_steps=k, **opts), run_dir=tmp_path / f"r{k}", progress=False)
            for k in (2, 3, 4)}
    w = {k: _weights(r, "model.") for k, r in runs.items()}
    ema2, ema3, ema4 = (_weights(runs[k], "ema.") for k in (2, 3, 4))
    moved = 0.0
    for n in w[4]:
        if not w[4][n].is_floating_point():
            continue
        torch.testing.assert_close(ema2[n], w[2][n], rtol=0, atol=1e-7)  # the copy before the start step
        torch.testing.assert_close(ema3[n], w[2][n], rtol=0, atol=1e-7)  # step 3: no update
        torch.testing.assert_close(ema4[n], 0.9 * w[2][n] + 0.1 * w[4][n], rtol=0, atol=2e-7)
        moved = max(moved, float((w[3][n] - w[2][n]).abs().max()), float((w[4][n] - w[2][n]).abs().max()))
    assert moved > 1e-4  # the weights really moved between steps 2, 3 and 4


def test_nll_of_a_conditional_run_scores_each_image_under_its_own_label(tmp_path, monkeypatch):
    """Review defect 4: `difflab nll` on a class-conditional run passed no labels (the null-label branch)."""
    import numpy as np

    from difflab.data import open_dataset
    from difflab.methods.gaussian.ddpm import DDPMMethod
    from difflab.nll import nll

    cfg = tiny_cfg(stop_after_steps=1)
    cfg.method = {"name": "ddpm", "num_timesteps": 50}
    cfg.data["use_labels"] = True
    run = train(cfg, run_dir=tmp_path / "run", progress=False)
    seen = []

    def spy(self, x0, rng, class_labels=None):
        seen.append(class_labels)
        return torch.zeros(x0.shape[0], dtype=torch.float64)

    monkeypatch.setattr(DDPMMethod, "vlb_bpd", spy)
    nll(str(run), num=10, batch=4, seed=5, device="cpu", estimator="vlb")
    ds = open_dataset(**cfg.data)
    idx = np.random.default_rng(5).permutation(len(ds))[:10]
    assert all(lab is not None for lab in seen)
    assert torch.cat(seen).tolist() == [int(ds[int(i)][1]) for i in idx]
