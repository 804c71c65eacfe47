"""Sampler accuracy on a closed-form oracle (issue 11 item 2): every difflab sampler x grid against diffusers'
schedulers, all driven by the same exact denoiser. Accuracy only (no timings), so it may run on a busy machine.

    PYTHONPATH=. python bench/bench_samplers.py            # needs the `bench` extra (diffusers, scipy)

The oracle is a Gaussian mixture in ``d`` dimensions with isotropic components (specs/gaussian_and_dddm.md §7:
per component ``E[x0 | x, k] = mu_k + s_k^2/(s_k^2 + sigma^2)(x - mu_k)``, posterior weights from
``N(x; mu_k, (s_k^2 + sigma^2) I)``), so ``D(x, sigma) = E[x0 | x0 + sigma n]`` is exact at every sigma.

Two errors, both in data space:

* **pointwise** (deterministic samplers): RMS per coordinate of ``x_sampler(z) - Phi(z)``, where ``Phi`` is the
  exact PF-ODE map from the sampler's own starting point (its first denoiser call ``(x, sigma_start)``) down to
  sigma = 1e-6, solved with the per-row Dormand-Prince RK45 of difflab.methods.gaussian.ode at rtol = atol =
  1e-10 in ``u = ln sigma``; the reference's own error (against rtol 1e-12) is printed. A sampler that stops at
  ``sigma_min`` carries the truncation error of its grid; ``floor(grid)`` prints that error for an exact solve on
  the grid's range, the best any sampler on that grid can do.
* **SW2** (every sampler, stochastic ones too): sliced 2-Wasserstein distance (fixed random directions) between
  the ``n`` samples and ``n`` independent exact draws from the mixture. Its Monte Carlo floor is SW2 between two
  independent exact sets (mean and sd over repeats): a sampler within ``mean + 2 sd`` of it is indistinguishable
  from exact sampling at this ``n`` ("at the noise floor").

diffusers' schedulers run on their own grids of a linear DDPM table (1000 steps, beta 1e-4..0.02) and, for
EDMEuler/EDMDPMSolverMultistep, on the EDM grid; each is driven the way its pipeline drives a model
(``scale_model_input``, ``model(x_in, t)``, ``step``), the model answering eps (or EDM's F) from the exact ``D``
at the scheduler's sigma of that step. NFE is counted (denoiser calls per image) for every entry.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import torch

from difflab.build import build_model
from difflab.config import RunConfig
from difflab.methods.gaussian import ode
from difflab.methods.gaussian import samplers as S

f64 = torch.float64
NFES = (5, 10, 20, 35, 50)


# ---- the oracle -------------------------------------------------------------------------------------------

class Mixture:
    """Isotropic Gaussian mixture: weights ``pi`` [K], means ``mu`` [K, d], stds ``s`` [K]."""

    def __init__(self, d: int = 8, K: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mu = (torch.rand(K, d, generator=g, dtype=f64) * 1.4 - 0.7)
        self.s = torch.tensor([0.08, 0.12, 0.2, 0.3], dtype=f64)[:K]
        w = torch.rand(K, generator=g, dtype=f64) + 0.5
        self.pi = w / w.sum()
        self.d, self.K = d, K

    def sample(self, n: int, g: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.pi, n, replacement=True, generator=g)
        return self.mu[k] + self.s[k, None] * torch.randn(n, self.d, generator=g, dtype=f64)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Exact ``E[x0 | x0 + sigma n = x]`` (sigma scalar or per row)."""
        sig2 = torch.as_tensor(sigma, dtype=f64).reshape(-1, 1) ** 2  # [1 or n, 1]
        var = self.s[None, :] ** 2 + sig2  # [., K]
        d2 = ((x[:, None, :] - self.mu[None]) ** 2).sum(-1)  # [n, K]
        logw = self.pi.log()[None] - 0.5 * d2 / var - 0.5 * self.d * var.log()
        w = torch.softmax(logw, dim=1)
        shrink = self.s[None, :] ** 2 / var  # [., K]
        means = self.mu[None] + shrink[..., None] * (x[:, None, :] - self.mu[None])
        return (w[..., None] * means).sum(1)


class Recorder:
    """Wraps ``D``: counts calls (NFE per image) and keeps the first call's ``(x, sigma)`` (the sampler's start)."""

    def __init__(self, D: Callable):
        self.D, self.calls, self.start = D, 0, None

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1).to(f64)
        if self.start is None:
            self.start = (x.clone(), float(torch.as_tensor(sigma).reshape(-1)[0]))
        self.calls += 1
        return self.D(x, sigma)


def pf_ode_map(mix: Mixture, x: torch.Tensor, sigma_from: float, sigma_to: float = 1e-6, tol: float = 1e-10
               ) -> torch.Tensor:
    """The exact PF-ODE map ``dx/du = x - D(x, e^u)`` (``u = ln sigma``) from ``sigma_from`` to ``sigma_to``, then
    ``D(x, sigma_to)`` (at 1e-6 the posterior mean equals x to ~1e-10 for the smallest component)."""
    field = lambda y, u, rows=None: y - mix.denoise(y, u.exp())  # noqa: E731
    y, _ = ode.solve_rk45(field, x.clone(), math.log(sigma_from), math.log(sigma_to), rtol=tol, atol=tol)
    return mix.denoise(y, torch.tensor(sigma_to, dtype=f64))


def sliced_w2(a: torch.Tensor, b: torch.Tensor, dirs: torch.Tensor) -> float:
    pa, pb = (a @ dirs.T).sort(0).values, (b @ dirs.T).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


class Bench:
    def __init__(self, n: int, d: int, seed: int = 0):
        self.mix = Mixture(d=d, seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.z = torch.randn(n, d, generator=g, dtype=f64)
        self.noise_seed = seed + 2
        self.ref = self.mix.sample(n, g)
        dirs = torch.randn(256, d, generator=g, dtype=f64)
        self.dirs = dirs / dirs.norm(dim=1, keepdim=True)
        floors = [sliced_w2(self.mix.sample(n, g), self.ref, self.dirs) for _ in range(8)]
        self.sw_floor = (sum(floors) / len(floors), torch.tensor(floors).std().item())
        self._maps: dict = {}

    def exact(self, x_start: torch.Tensor, sigma_start: float) -> torch.Tensor:
        """``Phi(x_start)``; starts that are a multiple ``c z`` of the latents share one solve."""
        c = float((x_start * self.z).sum() / (self.z * self.z).sum())
        key = (round(c, 9), round(sigma_start, 9)) if torch.allclose(x_start, c * self.z, rtol=1e-9, atol=1e-9) \
            else (id(x_start), sigma_start)
        if key not in self._maps:
            self._maps[key] = pf_ode_map(self.mix, x_start, sigma_start)
        return self._maps[key]

    def score(self, rec: Recorder, x: torch.Tensor, stochastic: bool) -> dict:
        x = x.reshape(x.shape[0], -1).to(f64)
        out = {"nfe": rec.calls, "sw": sliced_w2(x, self.ref, self.dirs)}
        if not stochastic:
            out["rmse"] = float(((x - self.exact(*rec.start)) ** 2).mean().sqrt())
        return out

    def randn_like(self):
        g = torch.Generator().manual_seed(self.noise_seed)
        return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


# ---- difflab ----------------------------------------------------------------------------------------------

TINY = {"name": "ddpmpp", "model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": [],
        "dropout": 0.0, "channel_mult_emb": 2}


def method(name: str, **kw):
    cfg = RunConfig.from_dict({"method": {"name": name, **kw}, "network": dict(TINY)})
    cfg.image = {"channels": 1, "resolution": 4, "label_dim": 0, "augment_dim": 0}
    return build_model(cfg)


# (label, sampler, options, stochastic)
DIFFLAB = [
    ("euler", "euler", {}, False), ("heun", "heun", {}, False), ("ddim", "ddim", {}, False),
    ("dpmpp_2m", "dpmpp_2m", {}, False), ("dpmpp_3m", "dpmpp_3m", {}, False), ("dpmpp_2s", "dpmpp_2s", {}, False),
    ("unipc bh1 p2", "unipc", {"order": 2, "variant": "bh1"}, False),
    ("unipc bh2 p2", "unipc", {"order": 2, "variant": "bh2"}, False),
    ("unipc bh1 p3", "unipc", {"order": 3, "variant": "bh1"}, False),
    ("unipc bh2 p3", "unipc", {"order": 3, "variant": "bh2"}, False),
    ("ipndm", "ipndm", {}, False), ("deis", "deis", {}, False),
    ("euler_ancestral", "euler_ancestral", {}, True), ("dpmpp_sde", "dpmpp_sde", {}, True),
]
TWO_EVAL = ("heun", "dpmpp_2s")


def difflab_grids():
    edm, vp, ddpm = method("edm"), method("vp"), method("ddpm", num_timesteps=1000)
    return {
        "karras (EDM)": lambda s, n: edm.sigma_grid(s, n, grid="karras"),
        "logsnr (EDM)": lambda s, n: edm.sigma_grid(s, n, grid="logsnr"),
        "time-uniform (VP)": lambda s, n: vp.sigma_grid(s, n, grid="time-uniform"),
        "table (DDPM 1000)": lambda s, n: ddpm.sigma_grid(s, n, grid="table"),
        "logsnr (DDPM 1000 run: [0.01, 80])": lambda s, n: ddpm.sigma_grid(s, n, grid="logsnr"),
    }


def run_difflab(bench: Bench) -> dict:
    rows: dict = {}
    for gname, grid in difflab_grids().items():
        for label, name, opts, stochastic in DIFFLAB:
            for target in NFES:
                steps = (target + 1) // 2 if name in TWO_EVAL else target
                rec = Recorder(bench.mix.denoise)
                sig = grid(name, steps)
                x = getattr(S, f"sample_{name}")(rec, bench.z, sig, bench.randn_like(), **opts)
                rows[(gname, label, target)] = bench.score(rec, x, stochastic)
        # the best any solver can do on this grid's range (exact ODE to sigma_min, then D there)
        sig = grid("euler", 10)
        x0 = bench.z * sig[0]
        smin = float(sig[sig > 0][-1])
        floor = pf_ode_map(bench.mix, x0, float(sig[0]), smin)
        rows[(gname, "floor(grid)", 0)] = {"rmse": float(((floor - bench.exact(x0, float(sig[0]))) ** 2).mean()
                                                         .sqrt()), "nfe": 0}
    for rtol in (1e-2, 1e-3, 1e-4):
        rec = Recorder(bench.mix.denoise)
        sig = difflab_grids()["karras (EDM)"]("adaptive", 2)
        info: dict = {}
        x = S.sample_adaptive(rec, bench.z, sig, rtol=rtol, atol=rtol, info=info)
        rows[("adaptive", f"rk45 rtol {rtol:g}", 0)] = bench.score(rec, x, False) | {"nfe": info["nfe"]}
    return rows


# difflab fit-grid on the oracle: the samplers whose 10-NFE grid is fitted, the pilots and the search budget
FITTED = [("ipndm", "ipndm", {}), ("dpmpp_2m", "dpmpp_2m", {}), ("dpmpp_3m", "dpmpp_3m", {}),
          ("unipc bh2 p3", "unipc", {"order": 3, "variant": "bh2"})]
FIT_NFES = (5, 10, 20)


def run_fitted(bench: Bench, pilots: int = 64, max_evals: int = 500) -> dict:
    """``difflab fit-grid``'s search (:func:`~difflab.methods.gaussian.grid_fit.fit_sigmas`, its defaults: 64
    pilots, 500 evaluations, the Karras start, the adaptive solve at rtol 1e-5 as the target) on pilot latents
    drawn apart from the bench's, so every scored latent is held out."""
    from difflab.methods.gaussian import grid_fit as G

    edm = method("edm")
    z = torch.randn(pilots, bench.mix.d, generator=torch.Generator().manual_seed(bench.noise_seed + 1), dtype=f64)
    ref = S.sample_adaptive(bench.mix.denoise, z, S.sigmas_edm(2), rtol=1e-5, atol=1e-5)
    rows: dict = {}
    for label, name, opts in FITTED:
        fn = getattr(S, f"sample_{name}")
        for target in FIT_NFES:
            init = edm.sigma_grid(name, target, grid="karras")
            grid, _, _ = G.fit_sigmas(lambda g, fn=fn, opts=opts: fn(bench.mix.denoise, z, g, None, **opts), ref,
                                      init, 0.002, max_evals)
            rec = Recorder(bench.mix.denoise)
            rows[("fitted (EDM range, difflab fit-grid)", label, target)] = bench.score(rec, fn(rec, bench.z, grid,
                                                                                               None, **opts), False)
    return rows


# ---- diffusers --------------------------------------------------------------------------------------------

TABLE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
             prediction_type="epsilon")


def diffusers_list():
    import diffusers as df

    out = [("DDIMScheduler", lambda: df.DDIMScheduler(**TABLE), False),
           ("EulerDiscrete", lambda: df.EulerDiscreteScheduler(**TABLE), False),
           ("EulerDiscrete karras", lambda: df.EulerDiscreteScheduler(**TABLE, use_karras_sigmas=True), False),
           ("HeunDiscrete", lambda: df.HeunDiscreteScheduler(**TABLE), False),
           ("HeunDiscrete karras", lambda: df.HeunDiscreteScheduler(**TABLE, use_karras_sigmas=True), False)]
    for order in (2, 3):
        out += [(f"DPMSolverMultistep++ {order}M", lambda o=order: df.DPMSolverMultistepScheduler(
                    **TABLE, solver_order=o, algorithm_type="dpmsolver++"), False),
                (f"DPMSolverMultistep++ {order}M karras", lambda o=order: df.DPMSolverMultistepScheduler(
                    **TABLE, solver_order=o, algorithm_type="dpmsolver++", use_karras_sigmas=True), False),
                (f"DPMSolverMultistep++ {order}M lu-lambdas", lambda o=order: df.DPMSolverMultistepScheduler(
                    **TABLE, solver_order=o, algorithm_type="dpmsolver++", use_lu_lambdas=True), False)]
        for var in ("bh1", "bh2"):
            out += [(f"UniPC {var} p{order}", lambda o=order, v=var: df.UniPCMultistepScheduler(
                        **TABLE, solver_order=o, solver_type=v), False),
                    (f"UniPC {var} p{order} karras", lambda o=order, v=var: df.UniPCMultistepScheduler(
                        **TABLE, solver_order=o, solver_type=v, use_karras_sigmas=True), False)]
    for order in (2, 3):  # their log-SNR-uniform ("exponential") grid where offered
        out += [(f"DPMSolverMultistep++ {order}M exponential", lambda o=order: df.DPMSolverMultistepScheduler(
                    **TABLE, solver_order=o, algorithm_type="dpmsolver++", use_exponential_sigmas=True), False),
                (f"UniPC bh2 p{order} exponential", lambda o=order: df.UniPCMultistepScheduler(
                    **TABLE, solver_order=o, solver_type="bh2", use_exponential_sigmas=True), False)]
    out += [("DEISMultistep 3", lambda: df.DEISMultistepScheduler(**TABLE, solver_order=3), False),
            ("DEISMultistep 3 exponential", lambda: df.DEISMultistepScheduler(**TABLE, solver_order=3,
                                                                              use_exponential_sigmas=True), False),
            ("LMSDiscrete 4 karras", lambda: df.LMSDiscreteScheduler(**TABLE, use_karras_sigmas=True), False),
            ("PNDM (PLMS)", lambda: df.PNDMScheduler(**TABLE, skip_prk_steps=True, set_alpha_to_one=True), False),
            ("DEISMultistep 3 karras", lambda: df.DEISMultistepScheduler(**TABLE, solver_order=3,
                                                                         use_karras_sigmas=True), False),
            ("DPMSolverSinglestep 2", lambda: df.DPMSolverSinglestepScheduler(**TABLE, solver_order=2), False)]
    edm = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction_type="epsilon")
    out += [("EDMEuler (EDM grid)", lambda: df.EDMEulerScheduler(**edm), False)]
    for order in (2, 3):
        out += [(f"EDMDPMSolverMultistep {order}M (EDM grid)", lambda o=order: df.EDMDPMSolverMultistepScheduler(
            **edm, solver_order=o, algorithm_type="dpmsolver++"), False)]
    out += [("EulerAncestralDiscrete", lambda: df.EulerAncestralDiscreteScheduler(**TABLE), True),
            ("DPMSolverMultistep sde-dpmsolver++ 2M", lambda: df.DPMSolverMultistepScheduler(
                **TABLE, solver_order=2, algorithm_type="sde-dpmsolver++"), True)]
    return out


def _sched_sigma(sched, t) -> float:
    """The sigma the scheduler assigns to the current step (its own table; EDM schedulers: c_noise^-1)."""
    if getattr(sched, "step_index", None) is None and hasattr(sched, "_init_step_index"):
        sched._init_step_index(t)
    if hasattr(sched, "sigmas") and getattr(sched, "step_index", None) is not None:
        return float(sched.sigmas[sched.step_index])
    abar = float(sched.alphas_cumprod[int(t)])  # DDIM: the table at t
    return math.sqrt((1 - abar) / abar)


def drive(sched, steps: int, bench: Bench, rec: Recorder) -> torch.Tensor:
    """One diffusers sampling loop, the model answering from the exact D (eps; EDM schedulers: F)."""
    edm = hasattr(sched, "precondition_outputs")
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(bench.noise_seed)
    x = bench.z * float(sched.init_noise_sigma)
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        sigma = _sched_sigma(sched, t)
        if edm:
            c_in = float(sched.precondition_inputs(torch.ones(1, dtype=f64), sigma))
            D = rec(x_in / c_in, torch.tensor(sigma, dtype=f64))
            a = sched.precondition_outputs(x, torch.zeros_like(x), sigma)
            b = sched.precondition_outputs(x, torch.ones_like(x), sigma) - a
            out = (D - a) / b
        else:
            xt = x_in * math.sqrt(1 + sigma**2)
            out = (xt - rec(xt, torch.tensor(sigma, dtype=f64))) / sigma
        kw = {"generator": g} if "generator" in sched.step.__code__.co_varnames else {}
        x = sched.step(out, t, x, **kw).prev_sample
    return x


def steps_for_nfe(make, target: int) -> int:
    """The step count whose NFE (len(timesteps)) is nearest ``target`` from below."""
    best = 1
    for n in range(1, target + 1):
        s = make()
        s.set_timesteps(n)
        if len(s.timesteps) <= target:
            best = n
    return best


def run_diffusers(bench: Bench) -> dict:
    rows: dict = {}
    for label, make, stochastic in diffusers_list():
        group = "diffusers-edm" if "EDM grid" in label else "diffusers"
        for target in NFES:
            rec = Recorder(bench.mix.denoise)
            try:
                x = drive(make(), steps_for_nfe(make, target), bench, rec)
                rows[(group, label, target)] = bench.score(rec, x, stochastic)
            except Exception as e:  # a scheduler that fails at this NFE is reported, not fatal
                rows[(group, label, target)] = {"error": f"{type(e).__name__}: {e}"[:60], "nfe": rec.calls}
    return rows


# ---- report -----------------------------------------------------------------------------------------------

def fmt(r: dict | None, key: str) -> str:
    if r is None:
        return "—"
    if "error" in r:
        return "fails"
    v = r.get(key)
    if v is None:
        return "—"
    return ("nan" if v != v else f"{v:.2e}") + f" ({r['nfe']})"


def print_tables(rows: dict, key: str, out) -> None:
    groups: dict = {}
    for (g, label, target), r in rows.items():
        groups.setdefault(g, {}).setdefault(label, {})[target] = r
    for g, labels in groups.items():
        if g == "adaptive":
            continue
        g = {"diffusers": "diffusers (linear DDPM table, 1000 steps)",
             "diffusers-edm": "diffusers (EDM grid)"}.get(g, g)
        print(f"\n### {g} — {key} (NFE in brackets)\n", file=out)
        print("| sampler | " + " | ".join(f"NFE {n}" for n in NFES) + " |", file=out)
        print("|---" * (len(NFES) + 1) + "|", file=out)
        for label, by in labels.items():
            if label == "floor(grid)":
                if key == "rmse":
                    print(f"| *floor(grid): exact solve on this grid's range* | {by[0]['rmse']:.2e} |"
                          + " |" * (len(NFES) - 1), file=out)
                continue
            cells = [fmt(by.get(n), key) for n in NFES]
            if all(c == "—" for c in cells):
                continue
            print(f"| {label} | " + " | ".join(cells) + " |", file=out)


def best(rows: dict, key: str, target: int, libs: Callable[[str], bool]) -> tuple[float, str]:
    cands = [(r[key], f"{g} / {label} ({r['nfe']})") for (g, label, t), r in rows.items()
             if t == target and libs(g) and key in r and r[key] == r[key] and abs(r["nfe"] - target) <= 1]
    return min(cands) if cands else (float("nan"), "none")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="latents (samples) per run")
    p.add_argument("--d", type=int, default=8, help="data dimension")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--no-fit", action="store_true", help="skip the fitted grids (difflab fit-grid, ~2 min)")
    args = p.parse_args()
    t0 = time.time()
    bench = Bench(args.n, args.d, args.seed)
    out = sys.stdout
    # the reference solver's own error: rtol 1e-10 against 1e-12, on the EDM start
    x0 = bench.z[:500] * 80.0
    ref_err = float(((pf_ode_map(bench.mix, x0, 80.0) - pf_ode_map(bench.mix, x0, 80.0, tol=1e-12)) ** 2).mean()
                    .sqrt())
    print(f"oracle: {bench.mix.K}-component Gaussian mixture in d = {bench.mix.d}, stds "
          f"{bench.mix.s.tolist()}, n = {args.n}; reference PF-ODE error (rtol 1e-10 vs 1e-12) {ref_err:.1e}; "
          f"SW2 noise floor {bench.sw_floor[0]:.2e} +- {bench.sw_floor[1]:.1e}", file=out)
    rows = run_difflab(bench)
    if not args.no_fit:
        rows |= run_fitted(bench)
    if not args.no_diffusers:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()  # their "lower_order_final changed" notices
        print(f"diffusers {diffusers.__version__}", file=out)
        rows |= run_diffusers(bench)
    for key in ("rmse", "sw"):
        print_tables(rows, key, out)
    print("\n### adaptive (difflab sample_adaptive on the karras range)\n", file=out)
    for (g, label, _), r in rows.items():
        if g == "adaptive":
            print(f"- {label}: rmse {r['rmse']:.2e}, SW2 {r['sw']:.2e}, mean NFE {r['nfe']:.1f}", file=out)
    print("\n### summary\n", file=out)
    floor_cut = bench.sw_floor[0] + 2 * bench.sw_floor[1]
    edm_grid = lambda g: g in ("karras (EDM)", "logsnr (EDM)")  # noqa: E731  (both on [0.002, 80])
    fitted = lambda g: g.startswith("fitted")  # noqa: E731  (fitted inside [0.002, 80])
    for target in (10, 20):
        ours = best(rows, "rmse", target, lambda g: not g.startswith("diffusers") and g != "adaptive")
        ours_edm = best(rows, "rmse", target, edm_grid)
        theirs = best(rows, "rmse", target, lambda g: g.startswith("diffusers"))
        theirs_edm = best(rows, "rmse", target, lambda g: g == "diffusers-edm")
        print(f"- NFE {target}: best difflab rmse {ours[0]:.2e} [{ours[1]}]; on the EDM range {ours_edm[0]:.2e} "
              f"[{ours_edm[1]}]; best diffusers {theirs[0]:.2e} [{theirs[1]}], on the EDM grid "
              f"{theirs_edm[0]:.2e} [{theirs_edm[1]}]; ratios: difflab EDM range / diffusers best "
              f"{ours_edm[0] / theirs[0]:.3f}, / diffusers EDM grid {ours_edm[0] / theirs_edm[0]:.3f}", file=out)
        fit, fit_sw = best(rows, "rmse", target, fitted), best(rows, "sw", target, fitted)
        if fit[0] == fit[0]:
            print(f"  fitted grid (difflab fit-grid, EDM range, held-out latents): {fit[0]:.2e} [{fit[1]}]; "
                  f"/ diffusers best {fit[0] / theirs[0]:.3f}, / diffusers EDM grid {fit[0] / theirs_edm[0]:.3f}; "
                  f"SW2 {fit_sw[0]:.2e} [{fit_sw[1]}] -> {'AT' if fit_sw[0] <= floor_cut else 'ABOVE'} the floor",
                  file=out)
        sw_ours = best(rows, "sw", target, edm_grid)
        sw_theirs = best(rows, "sw", target, lambda g: g.startswith("diffusers"))
        print(f"  SW2: difflab EDM grid {sw_ours[0]:.2e} [{sw_ours[1]}], diffusers {sw_theirs[0]:.2e} "
              f"[{sw_theirs[1]}]; noise floor {bench.sw_floor[0]:.2e} + 2 sd = {floor_cut:.2e} -> difflab "
              f"{'AT' if sw_ours[0] <= floor_cut else 'ABOVE'} the floor", file=out)
    print(f"\n(total {time.time() - t0:.0f} s)", file=out)


if __name__ == "__main__":
    main()
