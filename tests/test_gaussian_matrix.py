"""Every Gaussian sampler on a run of every Gaussian method (issue 9 "Must show"): with the exact Gaussian
denoiser each (method, sampler) pair reproduces the data, and with a real tiny network each pair runs, and PC
and ODE samples depend on their seed alone."""

from __future__ import annotations

import pytest
import torch

from difflab.build import build_model
from difflab.config import RunConfig
from difflab.methods.gaussian.samplers import SAMPLERS
from difflab.rng import StackedRandomGenerator
from tests.oracles import gaussian_denoiser
from tests.test_score_sde import BatchRNG

f64 = torch.float64
MU = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=f64).reshape(1, 1, 2, 2)
SD = 0.5
METHODS = {
    "edm": {"name": "edm"}, "vp": {"name": "vp"}, "ve": {"name": "ve"}, "iddpm": {"name": "iddpm"},
    "ddpm": {"name": "ddpm", "num_timesteps": 200}, "ddpm-learned": {"name": "ddpm", "num_timesteps": 200,
                                                                    "learn_sigma": True, "schedule": "cosine"},
    "sde-ve": {"name": "sde-ve", "centered": True}, "sde-vp": {"name": "sde-vp"}, "sde-subvp": {"name": "sde-subvp"},
}
TINY = {"name": "ddpmpp", "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [],
        "dropout": 0.0, "channel_mult_emb": 2}
# steps at which each sampler is accurate on the 4-d Gaussian (std within 0.02 of 0.5)
STEPS = {"heun": 40, "euler": 200, "ablation": 40, "ancestral": 200, "deterministic": 100, "ddim": 100, "pc": 300,
         "ode": None, "dpmpp_2m": 40, "dpmpp_3m": 40, "dpmpp_2s": 20, "dpmpp_sde": 100, "unipc": 40,
         "euler_ancestral": 400, "ipndm": 40, "deis": 40, "adaptive": None}


def build(method: str, resolution: int = 2):
    cfg = RunConfig.from_dict({"method": dict(METHODS[method]), "network": dict(TINY)})
    cfg.image = {"channels": 1, "resolution": resolution, "label_dim": 0, "augment_dim": 0}
    torch.manual_seed(0)
    return build_model(cfg).eval()


def oracle(model):
    """Swap the model's denoiser for the exact posterior mean (a learned-variance model answers v = +1,
    the "fixedlarge" end of its range)."""
    D = gaussian_denoiser(MU, SD)
    learned = getattr(model, "learn_sigma", False)
    model.denoise = lambda x, sigma, class_labels=None: (D(x, sigma), torch.ones_like(x)) if learned else D(x, sigma)
    return model


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("method", list(METHODS))
def test_every_sampler_reproduces_gaussian_data_on_every_method(method, sampler):
    # at d = 4 a per-image noise norm is far from constant: use the reference's batch-mean Langevin norms here
    # (test_score_sde checks that the per-image default matches them at image sizes)
    kw = {"norm": "batch"} if sampler == "pc" else {}
    if method.startswith("ddpm"):
        kw["clip_denoised"] = False  # clamping x0_hat to [-1, 1] would shrink the Gaussian
    m = oracle(build(method))
    steps = STEPS[sampler]
    if sampler in ("pc", "ancestral", "deterministic", "ode") and method.startswith("ddpm"):
        steps = None  # the table's full chain
    x = m.sample(BatchRNG(2000, seed=1, antithetic=True), sampler=sampler, steps=steps, **kw).to(f64)
    r = x.reshape(-1, 4) - MU.reshape(1, 4)
    std, mean_err = float(r.std()), float(r.mean(0).abs().max())
    assert abs(std - SD) < 0.025 and mean_err < 0.02, (std, mean_err)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_sampler_runs_on_a_real_tiny_network(method):
    m = build(method, resolution=8)
    for sampler in SAMPLERS:
        steps = {"pc": 25, "ode": None}.get(sampler, 4)
        kw = {"rtol": 1e-2, "atol": 1e-2} if sampler in ("ode", "adaptive") else {}
        x = m.sample(StackedRandomGenerator("cpu", [0, 1]), sampler=sampler, steps=steps, **kw)
        assert x.shape == (2, 1, 8, 8) and bool(torch.isfinite(x).all()), (method, sampler)


@pytest.mark.parametrize("sampler,kw", [("pc", {"steps": 25}), ("pc", {"steps": 25, "corrector": "langevin"}),
                                        ("ode", {"rtol": 1e-3, "atol": 1e-3})])
def test_pc_and_ode_samples_depend_on_their_seed_alone(sampler, kw):
    """Per-image Langevin norms and per-row RK45 step control: seeds 0-6 alone, in one batch of 7, and
    inside a batch of 7 different seeds give identical images."""
    m = build("sde-vp", resolution=8)
    with torch.no_grad():  # make the untrained net's output non-trivial
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seeds = list(range(7))
    with m.batch_invariant(4):
        together = m.sample(StackedRandomGenerator("cpu", seeds), sampler=sampler, **kw)
        alone = torch.cat([m.sample(StackedRandomGenerator("cpu", [s]), sampler=sampler, **kw) for s in seeds])
        mixed = m.sample(StackedRandomGenerator("cpu", [3, 100, 101, 102, 103, 104, 105]), sampler=sampler, **kw)
    assert torch.equal(together, alone)
    assert torch.equal(together[3], mixed[0])
    assert together.std() > 0
