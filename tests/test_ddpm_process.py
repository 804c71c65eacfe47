"""Forward process, posterior, conversions, VLB pieces, importance sampler and the DDPM objective
(specs/gaussian_and_dddm.md §1, §2.1–2.2, §2.7 checks 3–4)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from difflab.errors import UserError
from difflab.methods.gaussian import discrete as dm
from difflab.methods.gaussian.ddpm import DDPMMethod
from difflab.methods.gaussian.schedules import get_betas
from difflab.rng import StackedRandomGenerator

SCHEDULES = ["linear", "cosine", "DNS", "DNST"]
f64 = torch.float64


@pytest.mark.parametrize("name", SCHEDULES)
def test_marginal_matches_the_markov_chain(name):
    """Iterating q(x_t|x_{t-1}) = N(sqrt(1-beta) x, beta) gives mean sqrt(abar) x0, variance 1 - abar."""
    proc = dm.DiscreteProcess(get_betas(name, 200))
    coef, var = 1.0, 0.0
    for i, beta in enumerate(proc.betas.tolist()):
        coef, var = coef * math.sqrt(1 - beta), (1 - beta) * var + beta
        assert coef == pytest.approx(float(proc.abar[i].sqrt()), rel=1e-12)
        assert var == pytest.approx(float(1 - proc.abar[i]), rel=1e-12, abs=1e-15)
    x0 = torch.tensor([[0.7, -0.3]], dtype=f64)
    mean, v = proc.q_mean_variance(x0, torch.tensor([150]))
    torch.testing.assert_close(mean, proc.abar[150].sqrt() * x0)
    torch.testing.assert_close(v, (1 - proc.abar[150]).expand(1, 2))


@pytest.mark.parametrize("name", SCHEDULES)
def test_q_sample_monte_carlo(name):
    proc = dm.DiscreteProcess(get_betas(name, 100))
    g = torch.Generator().manual_seed(0)
    n = 40000
    x0 = torch.full((n, 1), 0.6, dtype=f64)
    for i in (0, 30, 99):
        x = proc.q_sample(x0, torch.full((n,), i), torch.randn(n, 1, generator=g, dtype=f64))
        ab = float(proc.abar[i])
        se = math.sqrt((1 - ab) / n)
        assert abs(float(x.mean()) - math.sqrt(ab) * 0.6) < 5 * se + 1e-12
        assert float(x.var()) == pytest.approx(1 - ab, rel=0.05, abs=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
def test_posterior_is_bayes_rule(name):
    """q(x_{t-1}|x_t,x0) ∝ N(x_{t-1}; sqrt(abar_{t-1}) x0, 1-abar_{t-1}) N(x_t; sqrt(alpha_t) x_{t-1}, beta_t)
    (independent derivation by Gaussian conditioning)."""
    proc = dm.DiscreteProcess(get_betas(name, 300))
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(3, 4, generator=g, dtype=f64), torch.randn(3, 4, generator=g, dtype=f64)
    for i in (1, 2, 57, 298, 299):
        ab_prev, beta = float(proc.abar[i - 1]), float(proc.betas[i])
        prec = 1 / (1 - ab_prev) + (1 - beta) / beta
        var = 1 / prec
        want_mean = var * (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(1 - beta) * x_t / beta)
        mean, v, logv = proc.posterior(x0, x_t, torch.full((3,), i))
        torch.testing.assert_close(mean, want_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(v, torch.full_like(v, var), rtol=1e-10, atol=0)
        torch.testing.assert_close(logv, torch.full_like(v, math.log(var)), rtol=1e-10, atol=1e-12)
    mean, v, logv = proc.posterior(x0, x_t, torch.zeros(3, dtype=torch.long))  # one step of noise: x0 itself
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)
    assert bool((v == 0).all())
    torch.testing.assert_close(logv, torch.full_like(v, float(proc.posterior_variance[1].log())))


@pytest.mark.parametrize("name", SCHEDULES)
def test_posterior_mean_is_hos_eps_form(name):
    """§2.3: Ho's Alg. 2 mean (x_t - beta/sqrt(1-abar) eps)/sqrt(alpha) equals the posterior mean at
    x0_hat = (x_t - sqrt(1-abar) eps)/sqrt(abar) (the unclipped iDDPM form)."""
    proc = dm.DiscreteProcess(get_betas(name, 100))
    g = torch.Generator().manual_seed(6)
    x_t, eps = torch.randn(3, 4, generator=g, dtype=f64), torch.randn(3, 4, generator=g, dtype=f64)
    for i in (0, 1, 50, 99):
        ab, beta = proc.abar[i], proc.betas[i]
        ho = (x_t - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt()
        x0_hat = dm.eps_to_x0(x_t, eps, ab.sqrt(), (1 - ab).sqrt())
        torch.testing.assert_close(proc.posterior(x0_hat, x_t, i)[0], ho, rtol=1e-9, atol=1e-9)


def test_conversions_are_exact_inverses():
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(6, 5, generator=g, dtype=f64), torch.randn(6, 5, generator=g, dtype=f64)
    abar = torch.rand(6, 1, generator=g, dtype=f64) * 0.98 + 0.01
    a, b = abar.sqrt(), (1 - abar).sqrt()
    x_t = a * x0 + b * eps
    v = dm.velocity(x0, eps, a, b)
    for got, want in [(dm.eps_to_x0(x_t, eps, a, b), x0), (dm.x0_to_eps(x_t, x0, a, b), eps),
                      (dm.v_to_x0(x_t, v, a, b), x0), (dm.v_to_eps(x_t, v, a, b), eps)]:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # loss equivalences for an arbitrary estimate x0_hat (§1)
    x0_hat = x0 + 0.3 * torch.randn(6, 5, generator=g, dtype=f64)
    eps_hat = dm.x0_to_eps(x_t, x0_hat, a, b)
    v_hat = dm.velocity(x0_hat, eps_hat, a, b)
    snr = abar / (1 - abar)
    torch.testing.assert_close(((eps - eps_hat) ** 2).sum(1, keepdim=True),
                               snr * ((x0 - x0_hat) ** 2).sum(1, keepdim=True), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(((v - v_hat) ** 2).sum(1, keepdim=True),
                               (1 + snr) * ((x0 - x0_hat) ** 2).sum(1, keepdim=True), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_method_predict_reads_each_parameterisation(prediction):
    m = DDPMMethod(nn.Identity(), 1, 2, prediction=prediction)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 1, 2, 2, generator=g, dtype=f64), torch.randn(4, 1, 2, 2, generator=g, dtype=f64)
    a, b = m._ab(m.process.abar[[5, 100, 500, 999]], x0)
    x_t = a * x0 + b * eps
    out = {"eps": eps, "x0": x0, "v": dm.velocity(x0, eps, a, b)}[prediction]
    x0_hat, eps_hat, _ = m.predict(x_t, out, a, b)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


def test_normal_kl_against_torch_distributions():
    m1, m2 = torch.tensor([0.3, -1.0], dtype=f64), torch.tensor([-0.2, 0.5], dtype=f64)
    lv1, lv2 = torch.tensor([0.1, -2.0], dtype=f64), torch.tensor([-0.4, 0.7], dtype=f64)
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                             torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(dm.normal_kl(m1, lv1, m2, lv2), want, rtol=1e-12, atol=1e-14)
    assert bool((dm.normal_kl(m1, lv1, m1, lv1) == 0).all())


@pytest.mark.parametrize("mean,log_scale", [(0.0, -1.0), (0.97, -4.0), (-1.3, 0.5), (0.2, -7.0)])
def test_discretized_gaussian_bins_sum_to_one(mean, log_scale):
    x = torch.linspace(-1, 1, 256, dtype=f64)
    logp = dm.discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    # interior bin = CDF difference over its width (tanh-approximated normal CDF)
    k = 100
    s = math.exp(log_scale)
    cdf = lambda z: 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    want = cdf((float(x[k]) - mean + 1 / 255) / s) - cdf((float(x[k]) - mean - 1 / 255) / s)
    assert float(logp[k]) == pytest.approx(math.log(max(want, 1e-12)), rel=1e-9)


def test_learned_range_end_points():
    proc = dm.DiscreteProcess(get_betas("cosine", 50))
    like = torch.zeros(50, 1)
    idx = torch.arange(50)
    for v, table in [(1.0, proc.betas.log()), (-1.0, proc.log_beta_tilde_clipped)]:
        got = proc.model_log_variance(idx, like, "learned", torch.full((50, 1), v))
        torch.testing.assert_close(got.squeeze(1).to(f64), table.to(torch.float32).to(f64), rtol=1e-6, atol=0)
    assert float(proc.log_beta_tilde_clipped[0]) == float(proc.posterior_variance[1].log())
    large = proc.model_log_variance(idx, like, "fixedlarge").squeeze(1).to(f64)
    torch.testing.assert_close(large[1:], proc.betas[1:].log().to(torch.float32).to(f64))


def test_loss_second_moment_sampler():
    T = 4
    s = dm.LossSecondMomentSampler(T, history=3)
    state = s.init_state()
    assert set(state) == {"loss_history", "loss_counts"}  # training state, saved once per checkpoint by the loop
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=f64)
    idx, w = s.sample(u, state)
    assert bool((w == 1).all()) and set(idx.tolist()) == set(range(T))  # uniform before warm-up
    losses = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    for _ in range(4):  # one more than the history: the oldest (0.0-valued) entries must roll out
        vals = [0.0] * T if _ == 0 else list(losses.values())
        s.update(state, torch.arange(T), torch.tensor(vals))
    assert s.warmed_up(state)
    p = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=f64) / 10
    p = 0.999 * p + 0.001 / T
    torch.testing.assert_close(s.probabilities(state), p, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.probabilities(None), torch.full((T,), 1 / T, dtype=f64))  # no state: uniform
    idx, w = s.sample(torch.tensor([0.0, 0.1005, 0.5, 0.9999], dtype=f64), state)
    assert idx.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(w.to(f64), 1 / (T * p[idx]), rtol=1e-6, atol=0)
    s.update(state, torch.tensor([2, 2]), torch.tensor([5.0, 6.0]))  # a full history shifts: oldest out, newest last
    assert state["loss_history"][2].tolist() == [3.0, 5.0, 6.0] and state["loss_counts"].tolist() == [3] * T


def test_a_one_step_chain_has_its_one_variance():
    """T = 1: beta_tilde_0 = 0 has no index 1 to borrow its log from, so both variance tables hold beta_0."""
    proc = dm.DiscreteProcess(get_betas("linear", 1, high=5e-4))
    assert proc.T == 1 and float(proc.betas[0]) == pytest.approx(0.1, rel=1e-15)
    assert proc.log_beta_large.tolist() == proc.log_beta_tilde_clipped.tolist() == [math.log(float(proc.betas[0]))]


# ---- the objective -----------------------------------------------------------------------------

class ConstantHead(nn.Module):
    """Output = (mean parameter, variance-head parameter) broadcast: isolates the two gradients."""

    def __init__(self, channels: int, learn_sigma: bool):
        super().__init__()
        self.mean = nn.Parameter(torch.tensor(0.1))
        self.var = nn.Parameter(torch.tensor(0.2)) if learn_sigma else None
        self.channels = channels

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        parts = [self.mean * torch.ones_like(x)]
        if self.var is not None:
            parts.append(self.var * torch.ones_like(x))
        return torch.cat(parts, dim=1)


def _grid_x0(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 2, 2), generator=g).float() / 127.5 - 1


def test_hybrid_vlb_term_trains_only_the_variance_head():
    x0 = _grid_x0(8)
    grads = {}
    for lam in (0.0, 0.001):
        net = ConstantHead(1, True)
        m = DDPMMethod(net, 1, 2, learn_sigma=True, hybrid_lambda=lam, num_timesteps=100)
        m.loss(x0, None, StackedRandomGenerator("cpu", range(8))).sum().backward()
        grads[lam] = (float(net.mean.grad), float(net.var.grad))
    assert grads[0.0][0] == pytest.approx(grads[0.001][0], rel=1e-6)
    assert grads[0.0][1] == 0.0 and grads[0.001][1] != 0.0
    net = ConstantHead(1, True)  # the pure VLB ("kl") trains the mean too
    DDPMMethod(net, 1, 2, learn_sigma=True, loss="kl", num_timesteps=100).loss(
        x0, None, StackedRandomGenerator("cpu", range(8))).sum().backward()
    assert float(net.mean.grad) != 0.0 and float(net.var.grad) != 0.0


class PointMassNet(nn.Module):
    """Exact network for data = the point x_star (§7 C), in any parameterisation."""

    def __init__(self, method: DDPMMethod, x_star: torch.Tensor):
        super().__init__()
        self.method, self.x_star = [method], x_star

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, context=None):
        m = self.method[0]
        sigma = m.sigma_at(noise_labels.to(f64) * m.num_timesteps / 1000).to(x.dtype).reshape(-1, 1, 1, 1)
        a = (1 / (1 + sigma**2)).sqrt()
        b = sigma * a
        x0 = self.x_star.to(x.dtype).expand_as(x)
        eps = (x - a * x0) / b
        return {"eps": eps, "x0": x0, "v": dm.velocity(x0, eps, a, b)}[m.prediction]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss", ["l2", "l1"])
def test_exact_model_has_zero_loss(prediction, loss):
    x_star = _grid_x0(1, seed=4)
    m = DDPMMethod(nn.Identity(), 1, 2, prediction=prediction, loss=loss, num_timesteps=100)
    m.net = PointMassNet(m, x_star)
    losses = m.loss(x_star.expand(16, -1, -1, -1).double(), None, StackedRandomGenerator("cpu", range(16)))
    assert losses.shape == (16,)
    assert float(losses.abs().max()) < 1e-12
    wrong = DDPMMethod(nn.Identity(), 1, 2, prediction=prediction, loss=loss, num_timesteps=100)
    wrong.net = PointMassNet(m, x_star + 0.5)  # a wrong model must have a positive loss
    assert float(wrong.loss(x_star.expand(4, -1, -1, -1).double(), None,
                            StackedRandomGenerator("cpu", range(4))).min()) > 1e-8


def test_loss_depends_on_the_seed_alone_and_reduction():
    x0 = _grid_x0(5)
    m = DDPMMethod(ConstantHead(1, False), 1, 2, num_timesteps=100)
    full = m.loss(x0, None, StackedRandomGenerator("cpu", [10, 11, 12, 13, 14]))
    one = m.loss(x0[3:4], None, StackedRandomGenerator("cpu", [13]))
    torch.testing.assert_close(full[3:4], one)
    m_sum = DDPMMethod(ConstantHead(1, False), 1, 2, num_timesteps=100, loss_reduction="sum")
    summed = m_sum.loss(x0, None, StackedRandomGenerator("cpu", [10, 11, 12, 13, 14]))
    torch.testing.assert_close(summed, full * 4)


def test_importance_sampling_records_losses_and_reweights():
    from difflab.methods.base import Batch

    x0 = _grid_x0(6)
    m = DDPMMethod(ConstantHead(1, False), 1, 2, num_timesteps=3, schedule_high=2e-3,
                   timestep_sampler="loss-second-moment")
    assert "timestep_sampler.loss_history" not in m.state_dict()  # not a module buffer: not in model/EMA/DDP
    state = m.init_training_state(6, torch.Generator())
    for k in range(20):
        batch = Batch(x0, None, StackedRandomGenerator("cpu", range(6 * k, 6 * k + 6)), state=state)
        m(batch)
        rows = batch.updates["loss_history"]
        assert rows["t"].shape == rows["loss"].shape == (6,)
        m.update_training_state(state, {"loss_history": rows})
    assert m.timestep_sampler.warmed_up(state)
    p = m.timestep_sampler.probabilities(state)
    assert not torch.allclose(p, torch.full_like(p, 1 / 3))
    # the weighted loss is the plain per-t loss times 1/(T p_t), t drawn by inverting the CDF at u
    seeds = list(range(500, 506))
    with torch.no_grad():
        weighted = m(Batch(x0, None, StackedRandomGenerator("cpu", seeds), state=state))
        rng = StackedRandomGenerator("cpu", seeds)
        u = rng.rand([6]).to(f64)  # the method draws float32 uniforms (MPS has no float64)
        noise = rng.randn_like(x0)
        idx = torch.searchsorted(p.cumsum(0), u, right=True)
        out = m.net(m.process.q_sample(x0, idx, noise), m.noise_labels(idx))
        want = ((out - noise) ** 2).flatten(1).mean(1) / (3 * p[idx])
    torch.testing.assert_close(weighted, want.float())
    # without a training state (a bare loss call, a validation loss) the sampler is uniform: weights 1
    plain = m.loss(x0, None, StackedRandomGenerator("cpu", seeds))
    u_idx = torch.searchsorted(torch.arange(1, 4, dtype=f64) / 3, u, right=True).clamp(max=2)
    out = m.net(m.process.q_sample(x0, u_idx, noise), m.noise_labels(u_idx))
    torch.testing.assert_close(plain, ((out - noise) ** 2).flatten(1).mean(1).float())


def test_options_are_checked():
    for kw, flag in [({"prediction": "score"}, "--prediction"), ({"loss": "huber"}, "--loss"),
                     ({"schedule": "quad"}, "--schedule"),
                     ({"timestep_sampler": "lossy"}, "--timestep-sampler"),
                     ({"var_type": "big"}, "--var-type"), ({"sampler": "pndm"}, "--sampler")]:
        with pytest.raises(UserError, match=flag):
            DDPMMethod(nn.Identity(), 1, 2, **kw)
    assert DDPMMethod.net_out_channels(3, learn_sigma=True) == 6
    assert DDPMMethod.net_out_channels(3) == 3


def test_a_two_step_chain_borrows_index_1_of_the_posterior_variance():
    """T = 2: beta_tilde_0 = 0, so both log-variance tables start with log beta_tilde_1 =
    log(beta_1 (1 - abar_0) / (1 - abar_1)); index 1 holds beta_tilde_1 (clipped) and beta_1 (large)."""
    betas = torch.tensor([0.1, 0.3], dtype=f64)
    proc = dm.DiscreteProcess(betas)
    abar0, abar1 = 0.9, 0.9 * 0.7
    bt1 = 0.3 * (1 - abar0) / (1 - abar1)
    torch.testing.assert_close(proc.log_beta_tilde_clipped, torch.tensor([bt1, bt1], dtype=f64).log())
    torch.testing.assert_close(proc.log_beta_large, torch.tensor([bt1, 0.3], dtype=f64).log())


def test_prior_bpd_is_the_kl_to_the_unit_gaussian_per_example():
    """KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) = (abar x0^2 + (1 - abar) - 1 - ln(1 - abar)) / 2 per
    dimension, averaged and divided by ln 2; a batch of 2 with 3 channels (one index per example, not per
    channel)."""
    betas = torch.tensor([0.2, 0.5, 0.6], dtype=f64)
    proc = dm.DiscreteProcess(betas)
    abar = 0.8 * 0.5 * 0.4
    x0 = torch.linspace(-1, 1, 2 * 3 * 2 * 2, dtype=f64).reshape(2, 3, 2, 2)
    kl = 0.5 * (abar * x0**2 + (1 - abar) - 1 - math.log(1 - abar))
    torch.testing.assert_close(proc.prior_bpd(x0), kl.mean(dim=(1, 2, 3)) / math.log(2))
