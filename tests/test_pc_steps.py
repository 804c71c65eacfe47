"""Predictor-corrector and probability-flow sampling replayed step by step in numpy (score SDE Alg. 2-3 and
Eq. 13; specs/gaussian_and_dddm.md §4.5; found by mutation testing, docs/testing.md): with the exact score of
Gaussian data and recorded noise, every predictor, corrector, step order, norm, corrector count, epsilon and
the noise removal give exactly the numpy recursion, and the number of network evaluations is counted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.errors import UserError
from difflab.methods.gaussian import samplers as S
from difflab.methods.gaussian.sde import VESDE, VPSDE
from tests.oracles import gaussian_denoiser

f64 = torch.float64
MU = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=f64).reshape(1, 1, 2, 2)
SD = 0.5
LATENTS = torch.tensor([[0.3, -1.2, 0.5, 2.0], [1.0, 0.1, -0.6, -1.5], [-0.2, 0.8, 1.4, 0.3]],
                       dtype=f64).reshape(3, 1, 2, 2)
SMIN, SMAX, BMIN, BMAX = 0.01, 10.0, 0.1, 2.0


class Draws:
    """randn_like returning a fixed sequence of arrays (and the same sequence for the replay)."""

    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(3)
        self.arrays = [torch.randn(LATENTS.shape, generator=g, dtype=f64) for _ in range(n)]
        self.k = 0

    def __call__(self, x):
        self.k += 1
        return self.arrays[self.k - 1].clone()

    def replay(self):
        return iter([a.numpy() for a in self.arrays])


class Process:
    """The VE (sigma_min (sigma_max/sigma_min)^t, s = 1) or VP (beta(t) = bmin + t (bmax - bmin)) process and
    its N-level chain, in numpy."""

    def __init__(self, kind: str, N: int):
        self.kind, self.N = kind, N

    def sigma_s(self, t: float) -> tuple[float, float]:
        if self.kind == "ve":
            return SMIN * (SMAX / SMIN) ** t, 1.0
        log_m = -0.25 * t * t * (BMAX - BMIN) - 0.5 * t * BMIN
        m = math.exp(log_m)
        return math.sqrt(1 - m * m) / m, m

    def score(self, x: np.ndarray, t: float) -> np.ndarray:
        sig, s = self.sigma_s(t)
        mu = MU.numpy()
        y = x / s
        D = mu + SD**2 / (SD**2 + sig**2) * (y - mu)
        return (D - y) / (sig**2 * s)

    def level(self, t: float) -> int:
        return int(math.floor(t * (self.N - 1)))

    def discretize(self, x, t):
        """f, G of the SMLD (VE) or DDPM (VP) chain at t's level."""
        k = self.level(t)
        if self.kind == "ve":
            lev = lambda j: SMIN * (SMAX / SMIN) ** (j / (self.N - 1))  # noqa: E731
            prev = lev(k - 1) if k > 0 else 0.0
            return 0.0 * x, math.sqrt(lev(k) ** 2 - prev**2)
        b = np.linspace(BMIN / self.N, BMAX / self.N, self.N)[k]
        return (math.sqrt(1 - b) - 1) * x, math.sqrt(b)

    def drift_g2(self, x, t):
        if self.kind == "ve":
            sig, _ = self.sigma_s(t)
            return 0.0 * x, 2 * sig**2 * math.log(SMAX / SMIN)
        beta = BMIN + t * (BMAX - BMIN)
        return -0.5 * beta * x, beta

    def langevin_alpha(self, t):
        if self.kind == "ve":
            return 1.0
        return 1 - np.linspace(BMIN / self.N, BMAX / self.N, self.N)[self.level(t)]

    def std(self, t):
        sig, s = self.sigma_s(t)
        return sig * s

    def prior_std(self):
        return SMAX if self.kind == "ve" else 1.0


def pc_ref(proc: Process, z, predictor, corrector, snr, corrector_steps, order, norm, eps, noise_removal):
    x = LATENTS.numpy() * proc.prior_std()
    times = list(np.linspace(1.0, eps, proc.N)) + [0.0]
    nfe = 0

    def row_norm(v):
        return np.sqrt((v.reshape(v.shape[0], -1) ** 2).sum(1)).reshape(-1, 1, 1, 1)

    def correct(x, t):
        nonlocal nfe
        if corrector == "none":
            return x
        alpha = proc.langevin_alpha(t)
        for _ in range(corrector_steps):
            grad = proc.score(x, t)
            nfe += 1
            n = next(z)
            if corrector == "langevin":
                g, nn = row_norm(grad), row_norm(n)
                if norm == "batch":
                    g, nn = g.mean(), nn.mean()
                step = 2 * alpha * (snr * nn / g) ** 2
            else:
                step = 2 * alpha * (snr * proc.std(t)) ** 2
            x = x + step * grad + np.sqrt(2 * step) * n
        return x

    def predict(x, t, t_next):
        nonlocal nfe
        if predictor == "none":
            return x, x
        grad = proc.score(x, t)
        nfe += 1
        if predictor == "reverse_diffusion":
            f, G = proc.discretize(x, t)
            mean = x - f + G**2 * grad
            return mean + G * next(z), mean
        f, g2 = proc.drift_g2(x, t)
        dt = t_next - t
        mean = x + (f - g2 * grad) * dt
        return mean + math.sqrt(g2) * math.sqrt(-dt) * next(z), mean

    x_mean = x
    for i in range(proc.N):
        t, t_next = times[i], times[i + 1]
        if order == "corrector-first":
            x = correct(x, t)
            x, x_mean = predict(x, t, t_next)
        else:
            x, x_mean = predict(x, t, t_next)
            if i < proc.N - 1:
                x = correct(x, t_next)
                x_mean = x
    return (x_mean if noise_removal else x), nfe


CASES = [
    ("ve", dict(predictor="reverse_diffusion", corrector="langevin")),
    ("ve", dict(predictor="reverse_diffusion", corrector="langevin", norm="batch", snr=0.3)),
    ("ve", dict(predictor="reverse_diffusion", corrector="langevin", order="predictor-first", corrector_steps=2)),
    ("ve", dict(predictor="euler_maruyama", corrector="ald", noise_removal=False, t_eps=0.05)),
    ("ve", dict(predictor="none", corrector="langevin", corrector_steps=3)),
    ("vp", dict(predictor="euler_maruyama", corrector="none")),
    ("vp", dict(predictor="reverse_diffusion", corrector="langevin", snr=0.2)),
    ("vp", dict(predictor="reverse_diffusion", corrector="ald", order="predictor-first", noise_removal=False)),
    ("vp", dict(predictor="euler_maruyama", corrector="langevin", order="predictor-first")),
]


@pytest.mark.parametrize("kind,kw", CASES)
def test_pc_replayed_by_hand(kind, kw):
    N = 5
    sde = VESDE(SMIN, SMAX, N=N) if kind == "ve" else VPSDE(BMIN, BMAX, N=N)
    opts = dict(predictor="reverse_diffusion", corrector="langevin", snr=0.16, corrector_steps=1,
                order="corrector-first", norm="sample", noise_removal=True) | kw
    eps = opts.pop("t_eps", sde.t_eps)
    draws, info = Draws(), {}
    out = S.sample_pc(gaussian_denoiser(MU, SD), LATENTS, sde, draws, t_eps=eps if "t_eps" in kw else None,
                      info=info, **opts)
    ref, nfe = pc_ref(Process(kind, N), draws.replay(), opts["predictor"], opts["corrector"], opts["snr"],
                      opts["corrector_steps"], opts["order"], opts["norm"], eps, opts["noise_removal"])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-12)
    assert info["nfe"] == nfe
    assert draws.k == nfe  # one draw per evaluation: predictor and corrector alike


def test_pc_defaults():
    """Reverse diffusion + Langevin at snr 0.16, one corrector step, corrector first, per-sample norms, noise
    removed."""
    sde = VESDE(SMIN, SMAX, N=4)
    a = S.sample_pc(gaussian_denoiser(MU, SD), LATENTS, sde, Draws())
    b = S.sample_pc(gaussian_denoiser(MU, SD), LATENTS, sde, Draws(), predictor="reverse_diffusion",
                    corrector="langevin", snr=0.16, corrector_steps=1, order="corrector-first", norm="sample",
                    noise_removal=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["ve", "vp"])
@pytest.mark.parametrize("solver", ["euler", "heun", "rk4"])
@pytest.mark.parametrize("denoise_final", [True, False])
def test_the_probability_flow_ode_with_fixed_steps_replayed_by_hand(kind, solver, denoise_final):
    """dx/dt = f - g^2 score / 2 on `steps` uniform steps from T to eps (Euler, Heun, classical RK4), then (with
    denoise_final) one reverse-diffusion mean at eps; info["nfe"] counts the evaluations."""
    N, steps, eps = 6, 5, 0.02
    sde = VESDE(SMIN, SMAX, N=N) if kind == "ve" else VPSDE(BMIN, BMAX, N=N)
    proc = Process(kind, N)
    info = {}
    out = S.sample_ode(gaussian_denoiser(MU, SD), LATENTS.to(torch.float32), sde, solver=solver, steps=steps,
                       t_eps=eps, denoise_final=denoise_final, info=info)

    def field(x, t):
        f, g2 = proc.drift_g2(x, t)
        return f - 0.5 * g2 * proc.score(x, t)

    x = LATENTS.to(torch.float32).to(f64).numpy() * proc.prior_std()
    ts = np.linspace(1.0, eps, steps + 1)
    per = {"euler": 1, "heun": 2, "rk4": 4}[solver]
    for a, b in zip(ts[:-1], ts[1:]):
        h = b - a
        k1 = field(x, a)
        if solver == "euler":
            x = x + h * k1
        elif solver == "heun":
            x = x + h / 2 * (k1 + field(x + h * k1, b))
        else:
            k2 = field(x + h / 2 * k1, a + h / 2)
            k3 = field(x + h / 2 * k2, a + h / 2)
            k4 = field(x + h * k3, b)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    if denoise_final:
        f, G = proc.discretize(x, eps)
        x = x - f + G**2 * proc.score(x, eps)
    np.testing.assert_allclose(out.numpy(), x, rtol=1e-10, atol=1e-12)
    assert out.dtype == f64
    assert info["nfe"] == steps * per + int(denoise_final)


def test_the_ode_sampler_defaults():
    """RK45 at rtol = atol = 1e-5 from T to the process's eps, then the denoising step; fixed solvers default to
    the process's N steps."""
    sde = VPSDE(BMIN, BMAX, N=7)
    D = gaussian_denoiser(MU, SD)
    assert torch.equal(S.sample_ode(D, LATENTS, sde),
                       S.sample_ode(D, LATENTS, sde, solver="rk45", rtol=1e-5, atol=1e-5, t_eps=sde.t_eps,
                                    denoise_final=True))
    info = {}
    S.sample_ode(D, LATENTS, sde, solver="euler", info=info)
    assert info["nfe"] == 7 + 1
    loose, tight = {}, {}
    S.sample_ode(D, LATENTS, sde, rtol=1e-2, atol=1e-2, info=loose)
    S.sample_ode(D, LATENTS, sde, rtol=1e-7, atol=1e-7, info=tight)
    assert loose["nfe"] < tight["nfe"]


def test_the_ode_sampler_hands_each_tolerance_on_and_refuses_an_unknown_solver():
    sde = VPSDE(BMIN, BMAX, N=7)
    D = gaussian_denoiser(MU, SD)

    def nfe(**kw):
        info = {}
        S.sample_ode(D, LATENTS, sde, info=info, **kw)
        return info["nfe"]

    assert nfe(rtol=1e-2, atol=1e-9) < nfe(rtol=1e-7, atol=1e-9)
    assert nfe(rtol=1e-9, atol=1e-2) < nfe(rtol=1e-9, atol=1e-7)
    with pytest.raises(UserError, match=r"^--solver 'dopri' is not an ODE solver; choose one of: rk45, euler, heun, "
                                        r"rk4$"):
        S.sample_ode(D, LATENTS, sde, solver="dopri")


def test_pc_solves_float32_latents_in_float64_and_names_a_process_without_an_ancestral_chain():
    from difflab.methods.gaussian.sde import SubVPSDE

    sde = VESDE(SMIN, SMAX, N=4)
    D = gaussian_denoiser(MU, SD)
    a = S.sample_pc(D, LATENTS.to(torch.float32), sde, Draws())
    b = S.sample_pc(D, LATENTS.to(torch.float32).to(f64), sde, Draws())
    assert a.dtype == f64 and torch.equal(a, b)
    with pytest.raises(UserError, match=r"^the ancestral predictor needs a VE or VP process, not SubVPSDE; use "
                                        r"--predictor reverse_diffusion$"):
        S.sample_pc(D, LATENTS, SubVPSDE(N=4), Draws(), predictor="ancestral")
