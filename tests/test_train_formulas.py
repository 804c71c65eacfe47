"""The training loop's formulas pinned against hand-computed values (EMA beta, its ramp-up, the EMA update
itself), not against another run of the same code."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.train.ema import ema_beta
from difflab.train.loop import train
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
