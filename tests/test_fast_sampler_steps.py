"""The fast samplers step by step against independent references (found by mutation testing, docs/testing.md):
each update written from its paper's formula in numpy, with the integrals done by Gauss-Legendre quadrature
instead of the closed-form moments the samplers use; the order schedules (warm-up, lower-order final steps),
the callbacks, the default orders and the order refusals. A smooth nonlinear denoiser makes every
interpolation node matter (with an affine one, different orders can agree)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.errors import UserError
from difflab.methods.gaussian import samplers as S

f64 = torch.float64
GL_U, GL_W = np.polynomial.legendre.leggauss(24)
# a non-uniform grid (Karras rho = 7 on [0.05, 20], 5 levels), then 0
SIGMAS = S.sigmas_edm(5, 0.05, 20.0)
Z = torch.tensor([[0.3, -1.2], [1.5, 0.4], [-0.7, 2.2]], dtype=f64).reshape(3, 1, 1, 2)


def D_np(x: np.ndarray, sigma: float) -> np.ndarray:
    return 0.6 * np.tanh(x / (1 + sigma)) + 0.2 * np.sin(x) / (1 + sigma**2)


def D_torch(x: torch.Tensor, sigma) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=f64).reshape(-1, 1, 1, 1)  # a scalar or one sigma per row (adaptive)
    return 0.6 * torch.tanh(x / (1 + s)) + 0.2 * torch.sin(x) / (1 + s**2)


def quad(f, a: float, b: float) -> float | np.ndarray:
    """int_a^b f by 24-point Gauss-Legendre (exact for the degree <= 3 polynomials times e^u used here up to
    ~1e-15)."""
    mid, half = (a + b) / 2, (b - a) / 2
    return sum(w * f(mid + half * u) for u, w in zip(GL_U, GL_W)) * half


def lagrange(nodes: list[float], values: list[np.ndarray]):
    def P(u):
        out = 0.0
        for k, (uk, vk) in enumerate(zip(nodes, values)):
            L = 1.0
            for m, um in enumerate(nodes):
                if m != k:
                    L *= (u - um) / (uk - um)
            out = out + L * vk
        return out

    return P


def exp_multistep_ref(sigmas, z: np.ndarray, orders: list[int]) -> np.ndarray:
    """x_{i+1} = e^{-h} x_i + int_0^h e^{u-h} P(u) du in lambda = -ln sigma (DPM-Solver++ data prediction), P the
    polynomial through the last ``orders[i]`` denoiser values; the step to sigma = 0 is x = D."""
    s = [float(v) for v in sigmas]
    x = z * s[0]
    Ds, lams = [], []
    for i in range(len(s) - 1):
        D = D_np(x, s[i])
        Ds, lams = [D, *Ds], [-math.log(s[i]), *lams]
        if s[i + 1] == 0:
            x = D
            continue
        h = -math.log(s[i + 1]) - lams[0]
        p = orders[i]
        P = lagrange([lam - lams[0] for lam in lams[:p]], Ds[:p])
        x = math.exp(-h) * x + quad(lambda u, h=h, P=P: math.exp(u - h) * P(u), 0.0, h)
    return x


def run(fn, **kw) -> np.ndarray:
    return fn(D_torch, Z, SIGMAS, **kw).numpy()


@pytest.mark.parametrize("lower_order_final,orders", [(True, [1, 2, 3, 2]), (False, [1, 2, 3, 3])])
def test_dpmpp_3m_warms_up_and_lowers_its_final_order(lower_order_final, orders):
    """5 levels + 0: steps 0-3 take orders 1, 2, 3 and (lower_order_final) 2 on the second-last step, 3 without;
    step 4 (to sigma = 0) is x = D."""
    got = run(S.sample_dpmpp_3m, lower_order_final=lower_order_final)
    np.testing.assert_allclose(got, exp_multistep_ref(SIGMAS, Z.numpy(), orders), rtol=1e-12, atol=1e-13)


def test_dpmpp_3m_lowering_the_final_order_is_observable():
    a, b = run(S.sample_dpmpp_3m, lower_order_final=True), run(S.sample_dpmpp_3m, lower_order_final=False)
    assert np.abs(a - b).max() > 1e-4
    assert np.abs(a - run(S.sample_dpmpp_3m)).max() == 0  # the default lowers it


def test_dpmpp_2m_is_the_paper_update():
    """Lu et al. 2022 Alg. 2: D_d = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1}/h_i, x = e^{-h} x + (1 - e^{-h}) D_d;
    the first step D_d = D_0."""
    s = [float(v) for v in SIGMAS]
    x = Z.numpy() * s[0]
    D_prev, h_prev = None, None
    for i in range(len(s) - 1):
        D = D_np(x, s[i])
        if s[i + 1] == 0:
            x = D
            break
        h = math.log(s[i]) - math.log(s[i + 1])
        D_d = D if D_prev is None else (1 + 1 / (2 * h_prev / h)) * D - 1 / (2 * h_prev / h) * D_prev
        x = math.exp(-h) * x + (1 - math.exp(-h)) * D_d
        D_prev, h_prev = D, h
    np.testing.assert_allclose(run(S.sample_dpmpp_2m), x, rtol=1e-12, atol=1e-13)


def test_dpmpp_2s_is_the_midpoint_update():
    """Lu et al. 2022 Alg. 1 with r = 1/2: u = e^{-h/2} x + (1 - e^{-h/2}) D(x, sigma), sigma_mid = sigma e^{-h/2},
    x = e^{-h} x + (1 - e^{-h}) D(u, sigma_mid)."""
    s = [float(v) for v in SIGMAS]
    x = Z.numpy() * s[0]
    for i in range(len(s) - 1):
        D = D_np(x, s[i])
        if s[i + 1] == 0:
            x = D
            break
        h = math.log(s[i]) - math.log(s[i + 1])
        u = math.exp(-h / 2) * x + (1 - math.exp(-h / 2)) * D
        x = math.exp(-h) * x + (1 - math.exp(-h)) * D_np(u, s[i] * math.exp(-h / 2))
    np.testing.assert_allclose(run(S.sample_dpmpp_2s), x, rtol=1e-12, atol=1e-13)


AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def linear_multistep_ref(order: int, variable: bool) -> np.ndarray:
    """On dx/dsigma = (x - D)/sigma: iPNDM takes the equal-step Adams-Bashforth weights (whatever the grid),
    DEIS integrates the slopes' Lagrange polynomial in sigma over the actual step; orders min(order, i + 1); the
    step to sigma = 0 is x = D."""
    s = [float(v) for v in SIGMAS]
    x = Z.numpy() * s[0]
    ds = []
    for i in range(len(s) - 1):
        D = D_np(x, s[i])
        if s[i + 1] == 0:
            x = D
            continue
        ds = [(x - D) / s[i], *ds]
        p = min(order, i + 1)
        if variable:
            x = x + quad(lagrange(s[i - p + 1:i + 1][::-1], ds[:p]), s[i], s[i + 1])
        else:
            x = x + (s[i + 1] - s[i]) * sum(w * d for w, d in zip(AB[p], ds[:p]))
    return x


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_takes_the_equal_step_weights_on_any_grid(order):
    np.testing.assert_allclose(run(S.sample_ipndm, order=order), linear_multistep_ref(order, False), rtol=1e-12,
                               atol=1e-13)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_deis_integrates_the_lagrange_polynomial_over_the_actual_step(order):
    np.testing.assert_allclose(run(S.sample_deis, order=order), linear_multistep_ref(order, True), rtol=1e-11,
                               atol=1e-12)


def test_on_a_non_uniform_grid_ipndm_and_deis_differ():
    assert np.abs(run(S.sample_ipndm, order=3) - run(S.sample_deis, order=3)).max() > 1e-4


@pytest.mark.parametrize("fn,default", [(S.sample_deis, 3), (S.sample_ipndm, 4), (S.sample_unipc, 3)])
def test_default_orders(fn, default):
    assert np.array_equal(run(fn), run(fn, order=default))
    assert not np.array_equal(run(fn), run(fn, order=default - 1))


@pytest.mark.parametrize("name,fn,allowed", [("deis", S.sample_deis, (1, 2, 3, 4)),
                                             ("ipndm", S.sample_ipndm, (1, 2, 3, 4)),
                                             ("unipc", S.sample_unipc, (1, 2, 3))])
def test_every_allowed_order_runs_and_others_are_refused_by_name(name, fn, allowed):
    for order in allowed:
        assert np.isfinite(run(fn, order=order)).all()
    for bad in (0, max(allowed) + 1, 2.5, "two"):
        msg = rf"^--order {bad!r} does not apply to --sampler {name}; choose one of: {', '.join(map(str, allowed))}$"
        with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            run(fn, order=bad)


CALLBACK_SAMPLERS = ["heun", "euler", "ancestral", "ddim", "deterministic", "dpmpp_2m", "dpmpp_3m", "dpmpp_2s",
                     "dpmpp_sde", "unipc", "euler_ancestral", "ipndm", "deis"]


@pytest.mark.parametrize("name", CALLBACK_SAMPLERS)
def test_the_callback_sees_every_step_and_the_last_one_is_the_output(name):
    """callback(i, x) once per step, i = 0..N-1 in order, with the state after step i: the last is the output."""
    fn = getattr(S, f"sample_{name}")
    seen = []
    gen = torch.Generator().manual_seed(0)
    out = fn(D_torch, Z, SIGMAS, randn_like=lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype),
             callback=lambda i, x: seen.append((i, x.clone())))
    assert [i for i, _ in seen] == list(range(len(SIGMAS) - 1))
    assert torch.equal(seen[-1][1], out)
    assert all(x.shape == Z.shape and x.dtype == f64 for _, x in seen)
    assert not torch.equal(seen[0][1], seen[1][1])


def euler_churn_ref(z: np.ndarray, noise: list[np.ndarray], S_churn: float, S_min: float, S_max: float,
                    S_noise: float, round_sigma=lambda v: v) -> np.ndarray:
    """EDM Alg. 2 with Euler steps: gamma = min(S_churn/N, sqrt 2 - 1) on [S_min, S_max], sigma_hat =
    (1 + gamma) sigma, x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise z, then x + (sigma_next - sigma_hat) d."""
    s = [float(v) for v in SIGMAS]
    N = len(s) - 1
    x, k = z * s[0], 0
    for i in range(N):
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_min <= s[i] <= S_max else 0.0
        s_hat = round_sigma(s[i] * (1 + gamma))
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s[i] ** 2) * S_noise * noise[k]
            k += 1
        x = x + (s[i + 1] - s_hat) * (x - D_np(x, s_hat)) / s_hat
    return x


class Recorded:
    """randn_like from a fixed list of draws (and the list, for the reference)."""

    def __init__(self, shape, n: int = 8):
        g = torch.Generator().manual_seed(5)
        self.draws = [torch.randn(shape, generator=g, dtype=f64) for _ in range(n)]
        self.k = 0

    def __call__(self, x):
        self.k += 1
        return self.draws[self.k - 1].to(x.dtype)


@pytest.mark.parametrize("kw", [dict(S_churn=40.0), dict(S_churn=2.0, S_min=0.5, S_max=10.0, S_noise=1.3)])
def test_euler_with_churn_by_hand(kw):
    """sample_euler hands its churn options (defaults S_min = 0, S_max = inf, S_noise = 1) and the noise on."""
    full = dict(S_min=0.0, S_max=float("inf"), S_noise=1.0) | kw
    rec = Recorded(Z.shape)
    got = S.sample_euler(D_torch, Z, SIGMAS, rec, **kw).numpy()
    ref = euler_churn_ref(Z.numpy(), [d.numpy() for d in rec.draws], full["S_churn"], full["S_min"], full["S_max"],
                          full["S_noise"])
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)
    assert 0 < rec.k < len(SIGMAS)  # churn drew noise, and not on every step when S_min/S_max cut


def test_euler_rounds_the_churned_sigma():
    """round_sigma (iDDPM's nearest table entry) applies to sigma_hat before the step."""
    rnd = lambda v: math.floor(float(v) * 8 + 0.5) / 8  # noqa: E731
    rec = Recorded(Z.shape)
    got = S.sample_euler(D_torch, Z, SIGMAS, rec, S_churn=40.0, round_sigma=lambda v: torch.tensor(rnd(v), dtype=f64))
    ref = euler_churn_ref(Z.numpy(), [d.numpy() for d in rec.draws], 40.0, 0.0, float("inf"), 1.0, rnd)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-13)
    assert np.abs(ref - euler_churn_ref(Z.numpy(), [d.numpy() for d in rec.draws], 40.0, 0.0, float("inf"), 1.0)
                  ).max() > 1e-3


ALL_GRID_SAMPLERS = CALLBACK_SAMPLERS + ["adaptive"]


@pytest.mark.parametrize("name", ALL_GRID_SAMPLERS)
def test_float32_latents_are_solved_in_float64_with_float64_sigmas(name):
    """Every sampler works in float64 whatever the latents' dtype (the output equals the float64-latent run) and
    hands the denoiser sigma as a float64 tensor."""
    fn = getattr(S, f"sample_{name}")
    sig_types = []

    def D(x, sigma):
        sig_types.append((type(sigma), getattr(sigma, "dtype", None)))
        return D_torch(x, sigma)

    z32 = Z.to(torch.float32)
    out32 = fn(D, z32, SIGMAS, randn_like=Recorded(Z.shape))
    out64 = fn(D, z32.to(f64), SIGMAS, randn_like=Recorded(Z.shape))
    assert out32.dtype == f64 and torch.equal(out32, out64)
    assert set(sig_types) == {(torch.Tensor, f64)}


def test_adaptive_hands_its_tolerances_on():
    """A looser rtol (atol fixed) takes fewer evaluations; the reported NFE includes the final denoiser call."""
    nfe = {}
    for rtol in (1e-2, 1e-7):
        info: dict = {}
        S.sample_adaptive(D_torch, Z, SIGMAS, rtol=rtol, atol=1e-9, info=info)
        nfe[rtol] = info["nfe"]
    assert nfe[1e-2] < nfe[1e-7]
    info = {}
    S.sample_adaptive(D_torch, Z, SIGMAS, rtol=1e-7, atol=1e-2, info=info)
    assert info["nfe"] < nfe[1e-7]


def unipc_g(h: float, p: int, variant: str) -> tuple[float, list[float]]:
    """B(h) (bh1: -h, bh2: e^{-h} - 1) and g_k = k! (-h) phi_{k+1}(-h) / B(h), k = 1..p, with
    phi_{k+1}(z) = int_0^1 e^{(1 - tau) z} tau^k / k! dtau by quadrature (Zhao et al. 2023 §3, data prediction)."""
    z = -h
    B = z if variant == "bh1" else math.expm1(z)
    return B, [z * quad(lambda tau, k=k: math.exp((1 - tau) * z) * tau**k, 0.0, 1.0) / B for k in range(1, p + 1)]


def unipc_ref(order: int, variant: str, use_corrector: bool, lower_order_final: bool) -> np.ndarray:
    """UniP-p / UniC-p: x_next = e^{-h} x + (1 - e^{-h}) D_0 - B(h) sum_k rho_k (D_k - D_0)/r_k, r_k the log-SNR
    distance of D_k in units of h; rho solves sum_k rho_k r_k^{j-1} = g_j (rho = 1/2 for the order-2 predictor and
    the order-1 corrector); the corrector redoes the step just taken with D(x_next) at r = 1."""
    s = [float(v) for v in SIGMAS]
    N = len(s) - 1
    x = Z.numpy() * s[0]
    Ds, lams, prev = [], [], None

    def update(x_from, h, D0, others, p, corrector):
        B, g = unipc_g(h, p, variant)
        out = math.exp(-h) * x_from + (1 - math.exp(-h)) * D0
        if not others:
            return out
        if (len(others) == 1 and not corrector) or p == 1:
            rho = [0.5] * len(others)
        else:
            R = np.array([[r**k for r, _ in others] for k in range(len(others))])
            rho = np.linalg.solve(R, np.array(g[:len(others)]))
        return out - B * sum(rk * (Dk - D0) / r for rk, (r, Dk) in zip(rho, others))

    for i in range(N):
        D = D_np(x, s[i])
        lam = -math.log(s[i])
        if prev is not None and use_corrector:
            x_from, h, p = prev
            others = [((lk - lams[0]) / h, Dk) for lk, Dk in zip(lams[1:p], Ds[1:p])] + [(1.0, D)]
            x = update(x_from, h, Ds[0], others, p, True)
        Ds, lams = [D, *Ds][:order], [lam, *lams][:order]
        if s[i + 1] == 0:
            x = D
            continue
        p = min(order, i + 1)
        p = min(p, N - i) if lower_order_final else p
        h = -math.log(s[i + 1]) - lam
        others = [((lk - lam) / h, Dk) for lk, Dk in zip(lams[1:p], Ds[1:p])]
        prev = (x, h, p)
        x = update(x, h, D, others, p, False)
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("use_corrector,lower_order_final", [(True, True), (False, True), (True, False)])
def test_unipc_against_its_order_conditions_by_quadrature(order, variant, use_corrector, lower_order_final):
    got = run(S.sample_unipc, order=order, variant=variant, use_corrector=use_corrector,
              lower_order_final=lower_order_final)
    np.testing.assert_allclose(got, unipc_ref(order, variant, use_corrector, lower_order_final), rtol=1e-11,
                               atol=1e-12)


def test_unipc_options_are_observable_and_default_to_bh2_with_corrector_and_lower_final_order():
    base = run(S.sample_unipc)
    assert np.array_equal(base, run(S.sample_unipc, variant="bh2", use_corrector=True, lower_order_final=True))
    for kw in (dict(variant="bh1"), dict(use_corrector=False), dict(lower_order_final=False)):
        assert np.abs(run(S.sample_unipc, **kw) - base).max() > 1e-6, kw
    with pytest.raises(UserError, match=r"^--variant 'bh3' is not a UniPC variant; choose one of: bh1, bh2$"):
        run(S.sample_unipc, variant="bh3")


def dpmpp_sde_ref(noise: list[np.ndarray], eta: float, S_noise: float) -> np.ndarray:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022 App.): x_next = e^{-eta h} (sigma_n/sigma) x + (1 - e^{-(1+eta) h}) D_d
    + sigma_n sqrt(1 - e^{-2 eta h}) S_noise z, D_d = D + (D - D_prev) h/(2 h_prev) after the first step."""
    s = [float(v) for v in SIGMAS]
    x = Z.numpy() * s[0]
    D_prev, h_prev, k = None, None, 0
    for i in range(len(s) - 1):
        D = D_np(x, s[i])
        if s[i + 1] == 0:
            return D
        h = math.log(s[i] / s[i + 1])
        D_d = D if D_prev is None else D + (D - D_prev) * h / (2 * h_prev)
        x = math.exp(-eta * h) * (s[i + 1] / s[i]) * x + (1 - math.exp(-(1 + eta) * h)) * D_d
        if eta > 0:
            x = x + s[i + 1] * math.sqrt(1 - math.exp(-2 * eta * h)) * S_noise * noise[k]
            k += 1
        D_prev, h_prev = D, h
    return x


@pytest.mark.parametrize("kw,eta,S_noise", [({}, 1.0, 1.0), (dict(eta=0.5, S_noise=1.2), 0.5, 1.2)])
def test_dpmpp_sde_by_hand(kw, eta, S_noise):
    """The default is the full SDE (eta = 1, S_noise = 1); noise on every step but the last."""
    rec = Recorded(Z.shape)
    got = S.sample_dpmpp_sde(D_torch, Z, SIGMAS, rec, **kw).numpy()
    np.testing.assert_allclose(got, dpmpp_sde_ref([d.numpy() for d in rec.draws], eta, S_noise), rtol=1e-12,
                               atol=1e-13)
    assert rec.k == len(SIGMAS) - 2


# ---- EDM's generalised ODE solver (§5.4) in the time and scaling of a process ----------------------------

def scaled_ode_ref(noise: list[np.ndarray], solver: str = "heun", alpha: float = 1.0, S_churn: float = 0.0,
                   S_noise: float = 1.0) -> np.ndarray:
    """EDM Alg. 1-2 generalised (§5.4) for sigma(t) = t with the VP scaling s(t) = 1/sqrt(1 + t^2):
    d(x, t) = (sigma'/sigma + s'/s) x - sigma' s / sigma D(x/s; sigma); churn t_hat = (1 + gamma) t with
    x_hat = s(t_hat)/s(t) x + sqrt(t_hat^2 - t^2) s(t_hat) S_noise z; Euler, or the alpha-Heun step
    x + h ((1 - 1/(2 alpha)) d + 1/(2 alpha) d(x + alpha h d, t + alpha h)); the last step Euler."""
    s_ = lambda t: 1 / math.sqrt(1 + t * t)  # noqa: E731
    ds_ = lambda t: -t * (1 + t * t) ** -1.5  # noqa: E731

    def d(x, t):
        return (1 / t + ds_(t) / s_(t)) * x - s_(t) / t * D_np(x / s_(t), t)

    t_steps = [float(v) for v in SIGMAS]
    N = len(t_steps) - 1
    x, k = Z.to(torch.float32).to(f64).numpy() * t_steps[0] * s_(t_steps[0]), 0  # the test's float32 latents
    for i in range(N):
        t = t_steps[i]
        gamma = min(S_churn / N, math.sqrt(2) - 1)
        t_hat = t * (1 + gamma)
        x_hat = s_(t_hat) / s_(t) * x
        if gamma > 0:
            x_hat = x_hat + math.sqrt(t_hat**2 - t**2) * s_(t_hat) * S_noise * noise[k]
            k += 1
        h = t_steps[i + 1] - t_hat
        dc = d(x_hat, t_hat)
        if solver == "euler" or i == N - 1:
            x = x_hat + h * dc
        else:
            dp = d(x_hat + alpha * h * dc, t_hat + alpha * h)
            x = x_hat + h * ((1 - 1 / (2 * alpha)) * dc + 1 / (2 * alpha) * dp)
    return x


def _vp_linear():
    from difflab.methods.gaussian.sde import LinearVE, VPScaling

    return VPScaling(LinearVE(80.0))


@pytest.mark.parametrize("kw", [{}, dict(solver="euler"), dict(alpha=0.6), dict(S_churn=3.0, S_noise=1.1),
                                dict(solver="euler", S_churn=3.0)])
def test_the_scaled_ode_solver_by_hand(kw):
    """Defaults: Heun, alpha = 1, no churn (S_min = 0, S_noise = 1); float32 latents are solved in float64."""
    rec = Recorded(Z.shape)
    got = S.sample_scaled_ode(D_torch, Z.to(torch.float32), SIGMAS, _vp_linear(), rec, **kw)
    assert got.dtype == f64
    ref = scaled_ode_ref([d.numpy() for d in rec.draws], **kw)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-11, atol=1e-12)
    assert rec.k == (len(SIGMAS) - 1 if kw.get("S_churn") else 0)


def test_the_scaled_ode_options_are_observable():
    ref = scaled_ode_ref([])
    for kw in (dict(solver="euler"), dict(alpha=0.6)):
        assert np.abs(scaled_ode_ref([], **kw) - ref).max() > 1e-4
    with pytest.raises(ValueError, match=r"^solver must be 'euler' or 'heun', got 'rk4'$"):
        S.sample_scaled_ode(D_torch, Z, SIGMAS, _vp_linear(), solver="rk4")


def test_the_ablation_sampler_defaults():
    """18 Heun steps (35 evaluations) on EDM's grid; the iddpm discretisation's table defaults C_1 = 0.001,
    C_2 = 0.008, M = 1000 on [0.002, 81]."""
    from difflab.methods.gaussian.sde import ablation_sde

    calls = []

    def D(x, sigma):
        calls.append(float(sigma))
        return D_torch(x, sigma)

    S.sample_ablation(D, Z)
    assert len(calls) == 35
    got = S.sample_ablation(D_torch, Z, discretization="iddpm", num_steps=6)
    grid = S.sigmas_iddpm(6, 0.002, 81.0, C_1=0.001, C_2=0.008, M=1000)
    want = S.sample_scaled_ode(D_torch, Z, grid, ablation_sde("linear", "none", 0.002, 81.0))
    assert torch.equal(got, want)
    other = S.sample_scaled_ode(D_torch, Z, S.sigmas_iddpm(6, 0.002, 81.0, C_2=0.016, M=500),
                                ablation_sde("linear", "none", 0.002, 81.0))
    assert not torch.equal(got, other)


# ---- the remaining grid samplers by hand ---------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 6])
def test_the_karras_grid_and_its_defaults(n):
    """t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, then 0; EDM's 0.002, 80, rho = 7 by
    default; round_sigma applies to the levels."""
    i = np.arange(n) / max(n - 1, 1)
    ref = lambda lo, hi, rho: (hi ** (1 / rho) + i * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho  # noqa: E731
    np.testing.assert_allclose(S.sigmas_edm(n).numpy(), np.append(ref(0.002, 80.0, 7.0), 0), rtol=1e-13)
    np.testing.assert_allclose(S.sigmas_edm(n, 0.01, 20.0, 3.0).numpy(), np.append(ref(0.01, 20.0, 3.0), 0),
                               rtol=1e-13)
    got = S.sigmas_edm(n, 0.01, 20.0, 3.0, round_sigma=lambda s: torch.round(s * 4) / 4)
    np.testing.assert_allclose(got.numpy(), np.append(np.round(ref(0.01, 20.0, 3.0) * 4) / 4, 0), rtol=1e-13)
    assert got.dtype == f64


def heun_ref(noise, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0) -> np.ndarray:
    """EDM Alg. 2: churn as in Euler, then the Heun correction x_hat + (s_next - s_hat)(d + d')/2 with
    d' = (x' - D(x', s_next))/s_next, except on the last step (to sigma = 0), which is Euler."""
    s = [float(v) for v in SIGMAS]
    N = len(s) - 1
    x, k = Z.numpy() * s[0], 0
    for i in range(N):
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_min <= s[i] <= S_max else 0.0
        s_hat = s[i] * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s[i] ** 2) * S_noise * noise[k]
            k += 1
        d = (x - D_np(x, s_hat)) / s_hat
        x_next = x + (s[i + 1] - s_hat) * d
        if i < N - 1:
            d2 = (x_next - D_np(x_next, s[i + 1])) / s[i + 1]
            x_next = x + (s[i + 1] - s_hat) * (d + d2) / 2
        x = x_next
    return x


@pytest.mark.parametrize("kw", [{}, dict(S_churn=40.0), dict(S_churn=5.0, S_min=0.2, S_max=5.0, S_noise=1.007),
                                dict(S_churn=5.0, S_min=float(SIGMAS[2]), S_max=float(SIGMAS[1]))])
def test_heun_with_churn_by_hand(kw):
    """The churn window [S_min, S_max] is closed: levels equal to its ends are churned."""
    rec = Recorded(Z.shape)
    got = S.sample_heun(D_torch, Z, SIGMAS, rec, **kw).numpy()
    np.testing.assert_allclose(got, heun_ref([d.numpy() for d in rec.draws], **kw), rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match=r"^solver must be 'heun' or 'euler', got 'rk4'$"):
        S.sample_heun(D_torch, Z, SIGMAS, solver="rk4")


@pytest.mark.parametrize("kw,eta,S_noise", [({}, 1.0, 1.0), (dict(eta=0.5, S_noise=1.2), 0.5, 1.2),
                                            (dict(eta=0.0), 0.0, 1.0)])
def test_euler_ancestral_by_hand(kw, eta, S_noise):
    """sigma_up = min(s_n, eta sqrt(s_n^2 (s^2 - s_n^2)/s^2)), sigma_down = sqrt(s_n^2 - sigma_up^2); Euler to
    sigma_down, then + sigma_up S_noise z; the step to 0 is x = D. Defaults eta = 1, S_noise = 1."""
    rec = Recorded(Z.shape)
    got = S.sample_euler_ancestral(D_torch, Z, SIGMAS, rec, **kw).numpy()
    s = [float(v) for v in SIGMAS]
    x, k = Z.numpy() * s[0], 0
    for i in range(len(s) - 1):
        D = D_np(x, s[i])
        if s[i + 1] == 0:
            x = D
            break
        up = min(s[i + 1], eta * math.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2))
        down = math.sqrt(s[i + 1] ** 2 - up**2)
        x = x + (down - s[i]) * (x - D) / s[i]
        if up > 0:
            x = x + up * S_noise * rec.draws[k].numpy()
            k += 1
    np.testing.assert_allclose(got, x, rtol=1e-12, atol=1e-13)
    assert rec.k == k == (0 if eta == 0 else len(s) - 2)


def vp_chain_ref(D_vp, z: np.ndarray, noise, kind: str, var_type: str = "fixedlarge", eta: float = 0.0):
    """The VP chain of the grid (§2.3, §3): abar = 1/(1 + sigma^2), x_T = z, x0 = D(x/sqrt(abar_t)); ancestral:
    the posterior mean and the variance beta (fixedlarge), beta~ (fixedsmall) or exp(f ln beta + (1 - f) ln beta~),
    f = (v + 1)/2 (learned); DDIM: sqrt(abar_s) x0 + sqrt(1 - abar_s - c^2) eps + c z, c = eta sqrt(beta~);
    no noise on the last step; the output x / sqrt(abar_0)."""
    s = [float(v) for v in SIGMAS]
    ab = [1 / (1 + v * v) for v in s]
    x, k = z.copy(), 0
    N = len(s) - 1
    for i in range(N):
        t, u = ab[i], ab[i + 1]
        x0, v = D_vp(x / math.sqrt(t), s[i])
        beta = 1 - t / u
        bt = beta * (1 - u) / (1 - t)
        if kind == "ancestral":
            mean = beta * math.sqrt(u) / (1 - t) * x0 + (1 - u) * math.sqrt(1 - beta) / (1 - t) * x
            if i < N - 1:
                if var_type == "fixedlarge":
                    logvar = math.log(beta)
                elif var_type == "fixedsmall":
                    logvar = math.log(bt)
                else:
                    f = (v + 1) / 2
                    logvar = f * math.log(beta) + (1 - f) * math.log(bt)
                x = mean + np.exp(0.5 * logvar) * noise[k]
                k += 1
            else:
                x = mean
        else:
            eps = (x - math.sqrt(t) * x0) / math.sqrt(1 - t)
            c = eta * math.sqrt(bt)
            x = math.sqrt(u) * x0 + math.sqrt(max(1 - u - c * c, 0)) * eps
            if eta > 0 and i < N - 1:
                x = x + c * noise[k]
                k += 1
    return x / math.sqrt(ab[-1])


def V_np(x, sigma):
    return np.tanh(0.3 * x + 0.1 * sigma)  # a variance-head output in (-1, 1)


def test_a_learned_variance_needs_the_head_and_is_read_in_float64():
    """var_type=learned without a variance head is refused in one line; a float32 head is interpolated in
    float64 (exactly the run with the head cast up first)."""
    with pytest.raises(UserError, match=r"^--var-type learned needs a model with a learned variance \(learn_sigma\)$"):
        S.sample_ancestral(D_torch, Z, SIGMAS, Recorded(Z.shape), var_type="learned")

    def head(dtype):
        return lambda x, s: (D_torch(x, s), torch.tanh(0.3 * x + 0.1 * float(s)).to(torch.float32).to(dtype))

    a = S.sample_ancestral(head(torch.float32), Z, SIGMAS, Recorded(Z.shape), var_type="learned")
    b = S.sample_ancestral(head(f64), Z, SIGMAS, Recorded(Z.shape), var_type="learned")
    assert torch.equal(a, b)


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall", "learned"])
def test_ancestral_by_hand(var_type):
    rec = Recorded(Z.shape)

    def D(x, sigma):
        return (D_torch(x, sigma), torch.tanh(0.3 * x + 0.1 * float(sigma))) if var_type == "learned" else \
            D_torch(x, sigma)

    got = S.sample_ancestral(D, Z, SIGMAS, rec, var_type=var_type).numpy()
    ref = vp_chain_ref(lambda x, s: (D_np(x, s), V_np(x, s)), Z.numpy(), [d.numpy() for d in rec.draws],
                       "ancestral", var_type)
    np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-12)
    assert rec.k == len(SIGMAS) - 2


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_by_hand(eta):
    rec = Recorded(Z.shape)
    got = S.sample_ddim(D_torch, Z, SIGMAS, rec, eta=eta).numpy()
    ref = vp_chain_ref(lambda x, s: (D_np(x, s), None), Z.numpy(), [d.numpy() for d in rec.draws], "ddim", eta=eta)
    np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-12)
    assert rec.k == (0 if eta == 0 else len(SIGMAS) - 2)
    if eta == 0:
        assert torch.equal(S.sample_deterministic(D_torch, Z, SIGMAS), S.sample_ddim(D_torch, Z, SIGMAS))
        assert torch.equal(S.sample_ddim(D_torch, Z, SIGMAS), S.sample_ddim(D_torch, Z, SIGMAS, eta=0.0))


def test_every_samplers_options_by_hand():
    """What each sampler takes: its own options plus the sigma grid's (the ablation sampler has no --grid, the
    adaptive one reads only the grid's ends) plus, for the table samplers, the DDPM table's spacing."""
    grid = {"sigma_min", "sigma_max", "rho", "grid", "sigmas"}
    assert S.allowed_options("heun") == {"S_churn", "S_min", "S_max", "S_noise"} | grid
    assert S.allowed_options("adaptive") == {"rtol", "atol", "sigma_min", "sigma_max"}
    assert S.allowed_options("ablation") == set(S.SAMPLER_OPTIONS["ablation"]) | {"sigma_min", "sigma_max", "rho"}
    assert S.allowed_options("ddim") == {"eta", "skip", "respacing"} | grid
    assert S.allowed_options("deterministic") == {"skip", "respacing"} | grid
    assert S.allowed_options("pc") == set(S.SAMPLER_OPTIONS["pc"])
    assert S.allowed_options("ode") == {"solver", "rtol", "atol", "t_eps", "denoise_final"}
    assert S.allowed_options("unipc") == {"order", "variant", "use_corrector", "lower_order_final"} | grid
    with pytest.raises(UserError, match=r"^--sampler 'dpm' is unknown; choose one of: heun, euler, ablation, "):
        S.allowed_options("dpm")
    S.check_options("heun", {"S_churn": 1.0, "eta": None})  # None means unset
    with pytest.raises(UserError, match=r"^sampler option\(s\) \['eta', 'order'\] do not apply to --sampler heun; "
                                        r"it takes: S_churn, S_max, S_min, S_noise, grid, rho, sigma_max, sigma_min, "
                                        r"sigmas$"):
        S.check_options("heun", {"order": 2, "eta": 0.5, "S_churn": 1.0})


@pytest.mark.parametrize("name", ALL_GRID_SAMPLERS)
def test_a_float32_grid_is_read_in_float64(name):
    """The grid's levels are converted to float64 before any arithmetic: a float32 grid gives exactly the run on
    the same levels in float64."""
    fn = getattr(S, f"sample_{name}")
    g32 = SIGMAS.to(torch.float32)
    a = fn(D_torch, Z, g32, randn_like=Recorded(Z.shape))
    b = fn(D_torch, Z, g32.to(f64), randn_like=Recorded(Z.shape))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,kw", [("ancestral", {"var_type": "fixedsmall"}), ("ddim", {"eta": 0.5})])
def test_a_vp_chain_stopping_short_of_zero_returns_the_ve_form(name, kw):
    """On a grid ending at sigma_N > 0 the VP state is divided by sqrt(abar_N) (x = x0 + sigma n form)."""
    short = SIGMAS[:-1]
    rec = Recorded(Z.shape)
    got = getattr(S, f"sample_{name}")(D_torch, Z, short, rec, **kw).numpy()
    s = [float(v) for v in short]
    ab = [1 / (1 + v * v) for v in s]
    x, k = Z.numpy().copy(), 0
    for i in range(len(s) - 1):
        t, u = ab[i], ab[i + 1]
        x0 = D_np(x / math.sqrt(t), s[i])
        beta = 1 - t / u
        bt = beta * (1 - u) / (1 - t)
        last = i == len(s) - 2
        if name == "ancestral":
            x = beta * math.sqrt(u) / (1 - t) * x0 + (1 - u) * math.sqrt(1 - beta) / (1 - t) * x
            if not last:
                x = x + math.sqrt(bt) * rec.draws[k].numpy()
                k += 1
        else:
            eps = (x - math.sqrt(t) * x0) / math.sqrt(1 - t)
            c = 0.5 * math.sqrt(bt)
            x = math.sqrt(u) * x0 + math.sqrt(1 - u - c * c) * eps
            if not last:
                x = x + c * rec.draws[k].numpy()
                k += 1
    np.testing.assert_allclose(got, x / math.sqrt(ab[-1]), rtol=1e-11, atol=1e-12)
    with pytest.raises(UserError, match=r"^--var-type 'huge' is not supported; choose one of: fixedlarge, fixedsmall, "
                                        r"learned$"):
        S.sample_ancestral(D_torch, Z, SIGMAS, var_type="huge")


def test_the_ablation_sampler_hands_every_option_to_its_grid_process_and_solver():
    """discretization / rho / sigma range -> the grid, schedule / scaling / epsilon_s -> the process, the solver
    options (alpha, churn, round_sigma) -> the generalised solver; churn defaults S_min = 0, S_noise = 1."""
    from difflab.methods.gaussian.sde import ablation_sde

    rnd = lambda s: torch.round(torch.as_tensor(s, dtype=f64) * 64) / 64  # noqa: E731
    kw = dict(num_steps=5, sigma_min=0.05, sigma_max=20.0, rho=3.0, schedule="vp", scaling="vp", epsilon_s=0.01,
              alpha=0.7, S_churn=2.0, round_sigma=rnd)
    got = S.sample_ablation(D_torch, Z, Recorded(Z.shape), discretization="edm", solver="heun", **kw)
    want = S.sample_scaled_ode(D_torch, Z, S.sigmas_edm(5, 0.05, 20.0, 3.0),
                               ablation_sde("vp", "vp", 0.05, 20.0, 0.01), Recorded(Z.shape), solver="heun",
                               alpha=0.7, S_churn=2.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, round_sigma=rnd)
    assert torch.equal(got, want)
    euler = S.sample_ablation(D_torch, Z, Recorded(Z.shape), discretization="edm", solver="euler", **kw)
    assert not torch.equal(euler, got)


@pytest.mark.parametrize("opt,value,allowed", [("solver", "rk4", "('euler', 'heun')"),
                                               ("discretization", "karras", "('vp', 've', 'iddpm', 'edm')"),
                                               ("schedule", "cosine", "('vp', 've', 'linear')"),
                                               ("scaling", "ve", "('vp', 'none')")])
def test_the_ablation_sampler_refuses_an_unknown_option_value_by_name(opt, value, allowed):
    msg = f"{opt} must be one of {allowed}, got {value!r}"
    with pytest.raises(ValueError, match="^" + msg.replace("(", r"\(").replace(")", r"\)") + "$"):
        S.sample_ablation(D_torch, Z, **{opt: value})


@pytest.mark.parametrize("discretization", ["vp", "ve", "iddpm", "edm"])
def test_the_ablation_discretisations_and_their_default_ranges(discretization):
    """vp: the refit VP grid through epsilon_s on EDM's VP range, sigma(eps_s) and sigma(1) of beta_min = 0.1,
    beta_max = 20 (by hand: sqrt(expm1(beta_d t^2/2 + beta_min t))); ve: [0.02, 100]; iddpm: the table (C_1, C_2,
    M handed on) inside [0.002, 81]; edm: Karras on [0.002, 80] with rho."""
    from difflab.methods.gaussian.sde import ablation_sde

    eps = 0.01
    vp_sig = lambda t: math.sqrt(math.expm1(0.5 * 19.9 * t * t + 0.1 * t))  # noqa: E731
    lo, hi, grid = {
        "vp": (vp_sig(eps), vp_sig(1.0), lambda lo, hi: S.sigmas_vp(5, lo, hi, eps)),
        "ve": (0.02, 100.0, lambda lo, hi: S.sigmas_ve(5, lo, hi)),
        "iddpm": (0.002, 81.0, lambda lo, hi: S.sigmas_iddpm(5, lo, hi, 0.002, 0.016, 500)),
        "edm": (0.002, 80.0, lambda lo, hi: S.sigmas_edm(5, lo, hi, 3.0)),
    }[discretization]
    kw = dict(schedule="ve", scaling="none", epsilon_s=eps, C_1=0.002, C_2=0.016, M=500, rho=3.0)
    got = S.sample_ablation(D_torch, Z, num_steps=5, discretization=discretization, **kw)
    want = S.sample_scaled_ode(D_torch, Z, grid(lo, hi), ablation_sde("ve", "none", lo, hi, eps))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
