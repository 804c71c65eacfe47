"""DDPM's wiring that the closed-form tests do not reach (found by mutation testing, docs/testing.md): the
binary cross-entropy loss against its formula, the labels and augmentation labels reaching the backbone
from every entry point, and the x0 clipping of the table samplers (specs/gaussian_and_dddm.md §2.2, §2.3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difflab.methods.base import Batch
from difflab.methods.gaussian.ddpm import DDPMMethod
from difflab.methods.gaussian.precond import EDMPrecond, IDDPMPrecond, VEPrecond, VPPrecond
from difflab.rng import StackedRandomGenerator

f64 = torch.float64


class FixedOutput(nn.Module):
    """Returns ``out`` whatever the input, and records what it was called with."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        self.calls.append({"class_labels": class_labels, "augment_labels": augment_labels})
        return self.out.to(x.dtype).expand_as(x).clone()


def test_bce_loss_is_the_binary_cross_entropy_of_the_clamped_probabilities():
    """loss=bce (the DDPM-MNIST seed): mean over pixels of -(y log p + (1 - y) log(1 - p)) with
    p = clamp((x0_hat + 1)/2, 1e-6, 1 - 1e-6) and y = clamp((x0 + 1)/2, 0, 1); x0_hat is the x0 prediction.
    Predictions and data beyond [-1, 1] exercise every clamp."""
    pred = torch.tensor([1.7, -1.6, 0.3, -0.4], dtype=f64).reshape(1, 1, 2, 2)
    x0 = torch.tensor([[0.5, -0.9, 1.3, -1.2], [0.0, 0.8, -0.3, 0.6]], dtype=f64).reshape(2, 1, 2, 2)
    m = DDPMMethod(FixedOutput(pred), 1, 2, prediction="x0", loss="bce", num_timesteps=100)
    got = m.loss(x0, None, StackedRandomGenerator("cpu", [3, 4]))
    p = ((pred + 1) / 2).clamp(1e-6, 1 - 1e-6)
    y = ((x0 + 1) / 2).clamp(0, 1)
    expected = (-(y * p.log() + (1 - y) * (1 - p).log())).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert float(expected.min()) > 1.0  # the saturated pixels dominate: the clamps matter


def test_labels_and_augment_labels_reach_the_backbone_from_every_entry_point():
    """loss, batch_loss, the samplers' model call and the variational bound hand the class labels (and, in
    training, the augmentation labels) to the network unchanged."""
    net = FixedOutput(torch.zeros(1, 1, 1, 1, dtype=f64))
    m = DDPMMethod(net, 1, 2, label_dim=3, num_timesteps=20)
    x0 = torch.zeros(2, 1, 2, 2, dtype=f64)
    labels, aug = torch.tensor([2, 0]), torch.tensor([[0.5, 1.0], [0.25, 0.0]], dtype=f64)

    def last():
        call = net.calls[-1]
        assert torch.equal(call["class_labels"], labels)
        return call["augment_labels"]

    m.loss(x0, labels, StackedRandomGenerator("cpu", [0, 1]), aug)
    assert torch.equal(last(), aug)
    m.batch_loss(Batch(x0, labels, StackedRandomGenerator("cpu", [0, 1]), aug))
    assert torch.equal(last(), aug)
    m._x0_eps(x0, 5, float(m.process.abar[5]), labels, clip=False)
    assert last() is None
    net.calls.clear()
    m.vlb_bpd(x0, StackedRandomGenerator("cpu", [0, 1]), labels)
    assert len(net.calls) == 20 and all(torch.equal(c["class_labels"], labels) for c in net.calls)


@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_clipping_clamps_x0_and_recomputes_eps(prediction):
    """With clip, x0_hat = clamp(x0_hat, -1, 1) and eps_hat = (x - sqrt(abar) x0_hat)/sqrt(1 - abar), so
    the DDIM/ancestral update uses the clipped pair; without it both are the model's."""
    t = 40
    m = DDPMMethod(nn.Identity(), 1, 2, prediction=prediction, num_timesteps=100)
    abar = float(m.process.abar[t])
    a, b = abar**0.5, (1 - abar) ** 0.5
    x = torch.tensor([0.3, -2.0, 1.1, 0.05], dtype=f64).reshape(1, 1, 2, 2)
    x0_raw = torch.tensor([1.7, -1.6, 0.3, -0.4], dtype=f64).reshape(1, 1, 2, 2)
    out = x0_raw if prediction == "x0" else (x - a * x0_raw) / b
    m.net = FixedOutput(out)
    x0_hat, eps_hat, _ = m._x0_eps(x, t, abar, None, clip=True)
    clipped = x0_raw.clamp(-1, 1)
    torch.testing.assert_close(x0_hat, clipped, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps_hat, (x - a * clipped) / b, rtol=1e-10, atol=1e-10)
    x0_free, eps_free, _ = m._x0_eps(x, t, abar, None, clip=False)
    torch.testing.assert_close(x0_free, x0_raw, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_free, (x - a * x0_raw) / b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("precond", [VPPrecond(), VEPrecond(), EDMPrecond(), IDDPMPrecond(M=50)])
def test_round_sigma_takes_floats_and_keeps_the_dtype(precond):
    """round_sigma of a Python float is a float64 tensor of that value (VP/VE/EDM) or of the nearest table entry
    (iDDPM); a float32 tensor stays float32; iDDPM's c_noise has sigma's dtype."""
    r = precond.round_sigma(0.75)
    assert isinstance(r, torch.Tensor) and r.dtype == f64
    if isinstance(precond, IDDPMPrecond):
        nearest = precond.u[(precond.u - 0.75).abs().argmin()]
        assert float(r) == float(nearest)
        s32 = torch.tensor([0.75, 3.0], dtype=torch.float32)
        assert precond.round_sigma(s32).dtype == torch.float32
        assert precond.coefficients(s32)[3].dtype == torch.float32
        j = torch.tensor([0.0, 0.5, 0.999999])
        assert precond.train_sigma(j).dtype == torch.float32
    else:
        assert float(r) == 0.75


# ---- the tables: DDIM's step, respacing and the schedule bounds (§2.1, §2.3, §3) ----------------------

@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_is_the_formula_with_the_given_noise(eta):
    """x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z, sigma = eta sqrt((1 - abar_t/abar_s)
    (1 - abar_s)/(1 - abar_t)), with the caller's z (a sign or scale error in the noise term shows here,
    not in a distribution test: z and -z have the same law)."""
    from difflab.methods.gaussian.discrete import ddim_step

    abar_t, abar_s = 0.3, 0.7
    x0, eps = torch.tensor([0.4, -0.8], dtype=f64), torch.tensor([1.2, 0.3], dtype=f64)
    z = torch.tensor([0.9, -1.7], dtype=f64)
    sigma = eta * ((1 - abar_t / abar_s) * (1 - abar_s) / (1 - abar_t)) ** 0.5
    expected = abar_s**0.5 * x0 + (1 - abar_s - sigma**2) ** 0.5 * eps + sigma * z
    torch.testing.assert_close(ddim_step(x0, eps, abar_t, abar_s, eta, z), expected, rtol=1e-14, atol=1e-14)
    no_noise = abar_s**0.5 * x0 + (1 - abar_s - sigma**2) ** 0.5 * eps
    torch.testing.assert_close(ddim_step(x0, eps, abar_t, abar_s, eta, None), no_noise, rtol=1e-14, atol=1e-14)


def test_respacing_edges():
    """improved-diffusion's sections: a count of 1 keeps the section's start; ddimN with N = T keeps every
    step (stride 1), also for T = 1; ddim_timesteps takes 1 and T steps; counts outside [1, size] refused."""
    from difflab.errors import UserError
    from difflab.methods.gaussian.schedules import ddim_timesteps, space_timesteps

    assert space_timesteps(10, "1,3") == [0, 5, 7, 9]
    assert space_timesteps(10, "1") == [0]
    assert space_timesteps(10, "ddim10") == list(range(10))
    assert space_timesteps(1, "ddim1") == [0]
    assert space_timesteps(10, "ddim5") == [0, 2, 4, 6, 8]
    assert len(ddim_timesteps(10, 1)) == 1 and ddim_timesteps(10, 10) == list(range(10))
    for bad in ("0,3", "6,3"):
        with pytest.raises(UserError, match="cannot keep"):
            space_timesteps(10, bad)
    with pytest.raises(UserError, match="try another N$"):
        space_timesteps(10, "ddim6")
    for steps in (0, 11):
        with pytest.raises(UserError):
            ddim_timesteps(10, steps)


def test_schedule_bounds_scale_with_T_and_are_checked():
    """(low, high) x 1000/T; 0 <= low < high and high x 1000/T <= 1 (equality allowed)."""
    from difflab.errors import UserError
    from difflab.methods.gaussian.schedules import _scaled_bounds

    assert _scaled_bounds(1e-4, 0.02, 4000) == pytest.approx((2.5e-5, 0.005))
    assert _scaled_bounds(0.0, 1.0, 1000) == (0.0, 1.0)
    for low, high in ((0.02, 0.02), (-1e-4, 0.02), (0.03, 0.02)):
        with pytest.raises(UserError, match="need 0 <= low < high"):
            _scaled_bounds(low, high, 1000)
    with pytest.raises(UserError, match="exceeds 1; lower it or raise --num-timesteps$"):
        _scaled_bounds(1e-4, 1.5, 1000)


def test_loss_second_moment_sampler_keeps_ten_losses_per_step():
    """improved DDPM's LossSecondMomentResampler: history_per_term = 10, uniform_prob = 0.001."""
    from difflab.methods.gaussian.discrete import LossSecondMomentSampler

    s = LossSecondMomentSampler(7)
    assert (s.history, s.uniform_prob) == (10, 0.001)
    state = s.init_state()
    assert state["loss_history"].shape == (7, 10) and state["loss_history"].dtype == f64
    assert state["loss_counts"].shape == (7,) and state["loss_counts"].dtype == torch.long


def test_default_steps_of_ddpm_runs():
    """pc / ode / ancestral / deterministic run the whole chain of a DDPM run; DDIM min(50, T); the EDM-grid
    samplers their own defaults (Heun 18)."""
    for T in (100, 20):
        m = DDPMMethod(nn.Identity(), 1, 2, num_timesteps=T)
        for sampler in ("ancestral", "deterministic", "pc", "ode"):
            assert m.default_steps(sampler) == T
        assert m.default_steps("ddim") == min(50, T)
        assert m.default_steps("heun") == 18


def test_respacing_is_refused_for_ddim_with_the_flags_to_use():
    from difflab.errors import UserError

    m = DDPMMethod(nn.Identity(), 1, 2, num_timesteps=100)
    with pytest.raises(UserError, match="^--respacing applies to ancestral / deterministic; DDIM takes --steps and"
                                        " --skip$"):
        m.table_grid("ddim", 10, respacing="10")


def test_sum_reduction_of_a_single_example():
    """loss_reduction=sum multiplies the per-pixel mean by the pixels of one example (also for N = 1)."""
    x0 = torch.tensor([0.2, -0.5, 0.7, 0.1], dtype=f64).reshape(1, 1, 2, 2)
    mean = DDPMMethod(FixedOutput(torch.zeros(1, 1, 1, 1)), 1, 2, num_timesteps=50)
    total = DDPMMethod(FixedOutput(torch.zeros(1, 1, 1, 1)), 1, 2, num_timesteps=50, loss_reduction="sum")
    a = mean.loss(x0, None, StackedRandomGenerator("cpu", [7]))
    torch.testing.assert_close(total.loss(x0, None, StackedRandomGenerator("cpu", [7])), 4 * a)


def test_vp_preconditioner_hands_its_epsilon_t_to_the_sde():
    """EDM's VP epsilon_t (1e-5) is the SDE's smallest training time, which pc/ode on a VP run start from."""
    assert VPPrecond().sde.t_train_eps == 1e-5
    assert VPPrecond(epsilon_t=1e-3).sde.t_train_eps == 1e-3
    sde = VPPrecond(beta_d=10.0, beta_min=0.5).sde  # beta(t) from beta_min to beta_min + beta_d
    assert float(sde.beta(torch.tensor(0.0, dtype=f64))) == pytest.approx(0.5)
    assert float(sde.beta(torch.tensor(1.0, dtype=f64))) == pytest.approx(10.5)


def test_another_sampler_does_not_inherit_the_runs_sampler_settings():
    """A run stored with pc-500 (predictor, corrector, snr) sampled with --sampler heun: only what Heun takes
    carries over (guidance does; the step count, predictor and corrector do not). Before, a score-SDE run whose
    method defaults differed from its stored pc settings refused `--sampler heun` ('corrector', 'predictor'
    do not apply)."""
    from difflab.generate import sampler_kwargs

    m = DDPMMethod(nn.Identity(), 1, 2, num_timesteps=20)
    stored = {"sampler": "pc", "steps": 500, "predictor": "reverse_diffusion", "corrector": "langevin",
              "snr": 0.16, "guidance": 1.5, "sigma_max": 5.0}
    assert sampler_kwargs(m, stored, {"sampler": "heun", "steps": 18}) == {"sampler": "heun", "steps": 18,
                                                                          "guidance": 1.5, "sigma_max": 5.0}
    assert "steps" not in sampler_kwargs(m, stored, {"sampler": "heun"})
    assert sampler_kwargs(m, stored, {"snr": 0.2}) == {**stored, "snr": 0.2}  # the same sampler: all stored


def test_constructor_defaults_are_ddpms():
    """DDPM's defaults (Ho et al. 2020, iDDPM's hybrid lambda): the linear 1000-step table, eps, L2, fixed
    large variance, lambda 0.001; the sampler's stored defaults: ancestral over the whole chain, DDIM eta 0 /
    uniform skip when chosen, no guidance, x0 clipped."""
    from difflab.methods.gaussian.schedules import get_betas

    m = DDPMMethod(nn.Identity(), 1, 2)
    assert torch.equal(m.process.betas, get_betas("linear", 1000, 1e-4, 0.02)) and m.num_timesteps == 1000
    assert (m.prediction, m.loss_type, m.var_type, m.learn_sigma, m.hybrid_lambda) == ("eps", "l2", "fixedlarge",
                                                                                       False, 0.001)
    assert m.sampler_defaults() == {"sampler": "ancestral", "steps": None, "eta": 0.0, "skip": "uniform",
                                    "guidance": 1.0, "clip_denoised": True}
    from difflab.errors import UserError

    with pytest.raises(UserError, match=r"^--loss-reduction 'avg' is not supported; choose one of: mean, sum$"):
        DDPMMethod(nn.Identity(), 1, 2, loss_reduction="avg")


def test_noise_labels_rescale_to_1000_steps_only_when_asked():
    for rescale, want in [(True, [0.0, 100.0, 990.0]), (False, [0.0, 10.0, 99.0])]:
        m = DDPMMethod(nn.Identity(), 1, 2, num_timesteps=100, rescale_timesteps=rescale)
        got = m.noise_labels(torch.tensor([0, 10, 99]))
        assert got.dtype == torch.float32 and got.tolist() == want


def test_labels_reach_only_a_conditional_backbone_and_the_null_label_is_minus_one():
    net = FixedOutput(torch.zeros(1, 1, 1, 1))
    x = torch.zeros(2, 1, 2, 2, dtype=f64)
    DDPMMethod(net, 1, 2, num_timesteps=50).model_output(x, torch.tensor([3.0]), torch.tensor([1, 0]))
    assert net.calls[-1]["class_labels"] is None  # an unconditional model is never handed labels
    cond = DDPMMethod(net, 1, 2, label_dim=3, num_timesteps=50)
    cond.model_output(x, torch.tensor([3.0]))
    got = net.calls[-1]["class_labels"]
    assert got.dtype == torch.long and got.tolist() == [-1, -1]


def test_clip_for_follows_the_flag_then_the_runs_default_on_table_samplers():
    m = DDPMMethod(nn.Identity(), 1, 2, num_timesteps=50)
    assert m.clip_for("heun", True) is True and m.clip_for("ancestral", False) is False
    assert m.clip_for("ancestral", None) is True and m.clip_for("ddim", None) is True
    assert m.clip_for("heun", None) is False  # the EDM-grid samplers do not clip by default
    assert DDPMMethod(nn.Identity(), 1, 2, num_timesteps=50, clip_denoised=False).clip_for("ddim", None) is False


def test_respacing_sets_the_chain_length_of_the_table_grid():
    m = DDPMMethod(nn.Identity(), 1, 2, num_timesteps=100)
    assert len(m.table_grid("ancestral", 50)) == 50 + 1 and len(m.table_grid("ancestral", 50, respacing="10")) == 11


def test_nll_terms_use_the_variance_head_and_the_clip_setting(monkeypatch):
    """The bound scores the learned variance (v reaches every term), clips x0 as the run does unless told,
    and returns vb / prior / total with the prior term of the data."""
    class MeanAndVariance(nn.Module):
        def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
            return torch.cat([0.1 * x, torch.full_like(x, 0.3)], dim=1)

    m = DDPMMethod(MeanAndVariance(), 1, 2, num_timesteps=4, learn_sigma=True, schedule="cosine")
    seen = {"clip": [], "v": []}
    x0_eps, vb_terms = m._x0_eps, m._vb_terms

    def spy_x0(x, t, abar_t, labels, clip):
        seen["clip"].append(clip)
        return x0_eps(x, t, abar_t, labels, clip)

    def spy_vb(x0, x_t, idx, x0_hat, v_head, process=None):
        seen["v"].append(v_head)
        return vb_terms(x0, x_t, idx, x0_hat, v_head, process)

    monkeypatch.setattr(m, "_x0_eps", spy_x0)
    monkeypatch.setattr(m, "_vb_terms", spy_vb)
    pix = torch.tensor([0, 77, 128, 255], dtype=torch.uint8).reshape(1, 1, 2, 2)
    terms = m.nll_terms(pix, StackedRandomGenerator("cpu", [0]))
    assert set(terms) == {"vb", "prior", "total"} and seen["clip"] == [True] * 4
    assert all(v is not None and torch.allclose(v, torch.full_like(v, 0.3)) for v in seen["v"])
    torch.testing.assert_close(terms["prior"], m.process.prior_bpd(m.encode(pix).to(f64)).cpu())
    m.nll_terms(pix, StackedRandomGenerator("cpu", [0]), clip_denoised=False)
    assert seen["clip"][4:] == [False] * 4


class RecordInput(nn.Module):
    """Zero output; records the dtype and value of the input it was called with."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        self.seen.append(x.detach().clone())
        return torch.zeros_like(x)


def test_denoise_hands_the_backbone_the_callers_dtype_and_sqrt_abar_x():
    """A float32 call stays float32 end to end: the net sees ``sqrt(abar) x`` in float32 (abar = 1/(1 + sigma^2)),
    not a float64 promotion of it, and the eps-prediction denoiser returns float32."""
    net = RecordInput()
    m = DDPMMethod(net, 1, 2, num_timesteps=50)
    x = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.0, 0.0, -0.5, 3.0]]).reshape(2, 1, 2, 2)
    out = m.denoise(x, torch.tensor([0.5, 2.0]))
    seen = net.seen[-1]
    assert seen.dtype == torch.float32 and out.dtype == torch.float32
    expected = x * torch.tensor([1 / (1 + 0.25) ** 0.5, 1 / (1 + 4.0) ** 0.5]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(seen, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out, x)  # eps = 0: D(x) = x
