"""Fitted and explicit sigma grids (docs/samplers.md "Fitted grids"): the fit finds a known optimum, reports the
errors it claims, and ``--grid fitted`` / ``-o sigmas`` sample exactly the stored levels, recorded in
generate.json so that a refit never mixes one folder."""

from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch

import difflab.generate as gen
from difflab.build import build_model, load_run
from difflab.cli import main
from difflab.errors import UserError
from difflab.methods.gaussian import grid_fit as G
from difflab.methods.gaussian import samplers as S
from difflab.rng import StackedRandomGenerator
from difflab.training.loop import train
from tests.oracles import gaussian_denoiser
from tests.test_train import tiny_cfg

f64 = torch.float64
SEEDS = list(range(5))


def euler_optimum(s: float, sigma_max: float = 80.0) -> float:
    """For x0 ~ N(mu, s^2 I), Euler on [sigma_max, s1, 0] returns mu + h(s1) (x_T - mu) with
    h = a(s1) (c + b s1) / sigma_max, a(x) = s^2/(s^2 + x^2), c = sigma_max a(sigma_max), b = 1 - a(sigma_max);
    h stays below the exact factor s / sqrt(s^2 + sigma_max^2), so the error is least where h is largest:
    s1^2 + 2 (c/b) s1 - s^2 = 0."""
    a_max = s**2 / (s**2 + sigma_max**2)
    c, b = sigma_max * a_max, 1 - a_max
    return -c / b + math.sqrt((c / b) ** 2 + s**2)


def test_grid_from_weights_splits_the_log_range_and_inverts():
    """softmax(p) = (1/2, 1/4, 1/4) of ln(80/0.002) = ln 40000: levels 80, 80/40000^(1/2), 80/40000^(3/4), 0."""
    p = np.log([0.5, 0.25, 0.25])
    got = G.grid_from_weights(p, 80.0, 0.002)
    np.testing.assert_allclose(got.numpy(), [80.0, 0.4, 80 / 40000**0.75, 0.0], rtol=1e-12)
    assert got.dtype == f64 and torch.equal(G.grid_from_weights(p + 3.0, 80.0, 0.002), got)
    np.testing.assert_allclose(G.weights_of(got, 0.002), p, rtol=1e-12)
    karras = S.sigmas_edm(6)  # ends at sigma_min: its last gap is 0, taken as 1e-9
    np.testing.assert_allclose(G.grid_from_weights(G.weights_of(karras, 0.002), 80.0, 0.002).numpy(),
                               karras.numpy(), rtol=1e-7)


def test_rmse_is_the_root_mean_square_over_every_element():
    x, y = torch.tensor([[1.0, 2.0], [3.0, 5.0]]), torch.zeros(2, 2)
    assert G.rmse(x, y) == pytest.approx(math.sqrt((1 + 4 + 9 + 25) / 4), rel=1e-15)


def test_fit_sigmas_finds_the_closed_form_optimum_of_euler_on_a_gaussian():
    """One free level: the fitted s1 is the root of s1^2 + 2(c/b) s1 - s^2 (:func:`euler_optimum`), for any
    mean and latents, and the losses returned are the rmse of the start and of the fit."""
    gen_ = torch.Generator().manual_seed(0)
    s, mu = 0.5, torch.randn(32, generator=gen_, dtype=f64)
    D = gaussian_denoiser(mu, s)
    z = torch.randn(40, 32, generator=gen_, dtype=f64)
    exact = mu + s / math.sqrt(s**2 + 80.0**2) * (80.0 * z - mu)
    evals = []
    start_grid = torch.tensor([80.0, 5.0, 0.0], dtype=f64)
    grid, first, best = G.fit_sigmas(lambda g: S.sample_euler(D, z, g), exact, start_grid, 0.002, 200,
                                     callback=evals.append)
    assert float(grid[1]) == pytest.approx(euler_optimum(s), rel=1e-3)
    assert grid[0] == 80.0 and grid[-1] == 0.0 and len(grid) == 3
    start = S.sample_euler(D, z, torch.tensor([80.0, 5.0, 0.0], dtype=f64))
    assert first == pytest.approx(G.rmse(start, exact), rel=1e-12)
    assert best == pytest.approx(G.rmse(S.sample_euler(D, z, grid), exact), rel=1e-12)
    a = lambda x: s**2 / (s**2 + x**2)
    h = lambda s1: a(s1) * (80 * a(80.0) + s1 * (1 - a(80.0))) / 80
    scale = float((80 * z - mu).square().mean().sqrt())
    target = s / math.sqrt(s**2 + 80.0**2)
    assert first == pytest.approx((target - h(5.0)) * scale, rel=1e-9)
    assert best == pytest.approx((target - h(euler_optimum(s))) * scale, rel=1e-6)
    assert 0 < len(evals) <= 200 and evals == sorted(evals, reverse=True) and evals[-1] == best


def test_fit_sigmas_lowers_a_multistep_error_on_held_out_latents_at_the_same_nfe():
    """A Gaussian with scales from 0.02 to 2 (each dimension its own): the exact map is closed-form."""
    gen_ = torch.Generator().manual_seed(1)
    scales = torch.logspace(math.log10(0.02), math.log10(2.0), 8, dtype=f64)
    mu = torch.randn(8, generator=gen_, dtype=f64)
    D = gaussian_denoiser(mu, scales)
    z = torch.randn(160, 8, generator=gen_, dtype=f64)
    ref = mu + scales / (scales**2 + 80.0**2).sqrt() * (80.0 * z - mu)
    init = S.sigmas_edm(6)
    calls = []

    def counted(x, sigma):
        calls.append(1)
        return D(x, sigma)

    grid, first, best = G.fit_sigmas(lambda g: S.sample_ipndm(counted, z[:80], g), ref[:80], init, 0.002, 150)
    assert best < 0.7 * first
    held = [G.rmse(S.sample_ipndm(D, z[80:], g), ref[80:]) for g in (init, grid)]
    assert held[1] < 0.8 * held[0]
    assert len(grid) == len(init) and grid[0] == init[0] and bool((grid[:-1] > grid[1:]).all())
    assert float(grid[-2]) >= 0.002 * (1 - 1e-12)
    calls.clear()
    S.sample_ipndm(counted, z[:4], grid)
    assert len(calls) == 6  # the fitted grid keeps the NFE


def test_fit_sigmas_without_free_levels_returns_the_start():
    D = gaussian_denoiser(torch.zeros(3, dtype=f64), 1.0)
    z = torch.randn(4, 3, dtype=f64)
    init = torch.tensor([80.0, 0.0], dtype=f64)
    grid, first, best = G.fit_sigmas(lambda g: S.sample_euler(D, z, g), torch.zeros(4, 3, dtype=f64), init, 0.002)
    assert torch.equal(grid, init) and first == best


def test_fit_sigmas_budget_and_non_finite_losses():
    """``max_evals`` bounds the search (Nelder-Mead may finish its iteration: at most N + 1 over); 0 runs only the
    start; a grid whose output is not finite never wins; a one-level grid has nothing to search."""
    scales = torch.logspace(-1.5, 0.3, 6, dtype=f64)
    D = gaussian_denoiser(torch.zeros(6, dtype=f64), scales)
    z = torch.randn(8, 6, generator=torch.Generator().manual_seed(2), dtype=f64)
    ref = scales / (scales**2 + 80.0**2).sqrt() * 80.0 * z
    init = S.sigmas_edm(6)
    for budget in (0, 1, 10):
        runs, evals = [], []
        G.fit_sigmas(lambda g, runs=runs: runs.append(1) or S.sample_ipndm(D, z, g), ref, init, 0.002, budget,
                     evals.append)
        assert len(evals) == len(runs) - 1 and (budget == 0) == (not evals)
        assert budget <= len(evals) <= budget + 7
    nan_unless_start = lambda g: S.sample_ipndm(D, z, g) * (1.0 if torch.equal(g, init) else float("nan"))
    grid, first, best = G.fit_sigmas(nan_unless_start, ref, init, 0.002, 30)
    assert torch.equal(grid, init) and first == best and math.isfinite(best)
    runs = []
    G.fit_sigmas(lambda g: runs.append(g) or S.sample_euler(D, z, g), ref, torch.tensor([80.0, 0.0], dtype=f64),
                 0.002, 50)
    assert len(runs) == 1


# ---- fit_grid on a method whose denoiser is a closed-form Gaussian -------------------------------------------

def tiny_model(method: str = "edm", label_dim: int = 0):
    cfg = tiny_cfg(method)
    cfg.image = {"channels": 1, "resolution": 8, "label_dim": label_dim, "augment_dim": 0}
    return build_model(cfg).eval()


def oracle_model(s: float = 0.5):
    model = tiny_model()
    mu = torch.linspace(-0.5, 0.5, 64, dtype=f64).reshape(1, 8, 8)
    D = gaussian_denoiser(mu, s)
    model.denoise = lambda x, sigma, class_labels=None: D(x, sigma)
    return model, mu


def test_fit_grid_reports_the_errors_it_claims_and_the_known_optimum():
    """Euler at 2 levels on the Gaussian oracle: the stored level is the closed-form optimum, and the held-out
    error of the Karras grid is the one computed by hand from seeds 8..15 against the exact map."""
    s = 0.5
    model, mu = oracle_model(s)
    entry = G.fit_grid(model, "euler", 2, pilots=8, holdout=8, seed=0, max_evals=120, progress=False)
    assert entry["sigmas"][0] == 80.0 and entry["sigmas"][1] == pytest.approx(euler_optimum(s), rel=2e-3)
    z = StackedRandomGenerator("cpu", list(range(16))).randn([16, 1, 8, 8], dtype=f64)[8:]
    a = lambda x: s**2 / (s**2 + x**2)
    h = a(0.002) * (80 * a(80.0) + 0.002 * (1 - a(80.0))) / 80  # Euler on the Karras grid [80, 0.002, 0]
    exact = a(0.002) * math.sqrt((s**2 + 0.002**2) / (s**2 + 80.0**2))  # the ODE to 0.002, then D
    by_hand = abs(h - exact) * float((80 * z - mu).square().mean().sqrt())
    assert entry["rmse"]["holdout_default"] == pytest.approx(by_hand, rel=1e-4)
    h_fit = a(entry["sigmas"][1]) * (80 * a(80.0) + entry["sigmas"][1] * (1 - a(80.0))) / 80
    assert entry["rmse"]["holdout_fitted"] == pytest.approx(abs(h_fit - exact) / abs(h - exact) * by_hand, rel=1e-4)
    assert entry["rmse"]["holdout_fitted"] < 0.6 * entry["rmse"]["holdout_default"]
    assert entry["reference"]["sampler"] == "adaptive" and entry["reference"]["nfe"] > 2
    assert (entry["sampler"], entry["steps"], entry["pilots"], entry["holdout"]) == ("euler", 2, 8, 8)


def test_fit_grid_draws_labels_per_seed_and_stores_what_it_did():
    """A class-conditional oracle (mean +m for class 1, -m for class 0): each pilot and held-out row is denoised with
    its own seed's label, seeds start at ``seed``, the Karras ends follow sigma_min/sigma_max, and the entry keeps
    every setting; both errors are the ones computed by hand (the reference solved at rtol 1e-9)."""
    s, lo, hi = 0.5, 0.01, 40.0
    model = tiny_model(label_dim=2)
    m = torch.linspace(-0.5, 0.5, 64, dtype=f64).reshape(1, 8, 8)

    def denoise(x, sigma, class_labels=None):
        mu = m * (2.0 * class_labels.to(f64) - 1).reshape(-1, 1, 1, 1)
        return gaussian_denoiser(mu, s)(x, sigma)

    model.denoise = denoise
    e = G.fit_grid(model, "euler", 2, pilots=6, holdout=5, seed=3, rtol=1e-9, max_evals=40, sigma_min=lo,
                   sigma_max=hi, progress=False)
    rng = StackedRandomGenerator("cpu", list(range(3, 14)))
    z = rng.randn([11, 1, 8, 8], dtype=f64)
    mu = m * (2.0 * rng.randint(2, [11]).to(f64) - 1).reshape(-1, 1, 1, 1)
    a = lambda x: s**2 / (s**2 + x**2)
    h = lambda s1: a(s1) * (hi * a(hi) + s1 * (1 - a(hi))) / hi  # Euler on [hi, s1, 0]
    exact = a(lo) * math.sqrt((s**2 + lo**2) / (s**2 + hi**2))
    rms = lambda rows: float((hi * z[rows] - mu[rows]).square().mean().sqrt())
    s1 = e["sigmas"][1]
    assert e["sigmas"][0] == pytest.approx(hi, rel=1e-14) and lo <= s1 < hi
    assert e["rmse"]["holdout_default"] == pytest.approx(abs(h(lo) - exact) * rms(slice(6, None)), rel=1e-6)
    assert e["rmse"]["holdout_fitted"] == pytest.approx(abs(h(s1) - exact) * rms(slice(6, None)), rel=1e-6)
    assert e["rmse"]["pilots_fitted"] == pytest.approx(abs(h(s1) - exact) * rms(slice(0, 6)), rel=1e-6)
    assert {k: v for k, v in e.items() if k not in ("sigmas", "rmse")} == {
        "sampler": "euler", "steps": 2, "options": {}, "pilots": 6, "holdout": 5, "seed": 3, "max_evals": 40,
        "reference": {"sampler": "adaptive", "rtol": 1e-9, "atol": 1e-9, "nfe": e["reference"]["nfe"]}}


def test_fit_grid_hands_the_sampler_options_on():
    """iPNDM of order 1 is Euler: the same held-out error as Euler's on the same grid, unlike iPNDM's order 4."""
    model, _ = oracle_model()
    kw = dict(pilots=3, holdout=3, max_evals=1, progress=False)
    euler = G.fit_grid(model, "euler", 4, **kw)["rmse"]["holdout_default"]
    assert G.fit_grid(model, "ipndm", 4, order=1, **kw)["rmse"]["holdout_default"] == pytest.approx(euler, rel=1e-12)
    assert G.fit_grid(model, "ipndm", 4, **kw)["rmse"]["holdout_default"] != pytest.approx(euler, rel=1e-3)
    one = G.fit_grid(model, "dpmpp-2m", 1, pilots=1, holdout=1, max_evals=3, progress=False)  # dashes, N = 1
    assert one["sampler"] == "dpmpp_2m" and one["sigmas"] == [80.0]


def test_fit_grid_uses_the_runs_guidance_and_refuses_non_gaussian_runs():
    model, _ = oracle_model()
    model.sampler_defaults = lambda: {"guidance": 2.5}
    seen = []
    inner = model.guided_denoiser
    model.guided_denoiser = lambda labels, guidance=1.0, clip=False: seen.append(guidance) or inner(labels, guidance)
    G.fit_grid(model, "euler", 2, pilots=2, holdout=2, max_evals=2, progress=False)
    assert seen and set(seen) == {2.5}

    class NotGaussian:
        name = "sdd"

    with pytest.raises(UserError, match=r"^fit-grid: a sdd run has no sigma grid to fit \(Gaussian runs only\)$"):
        G.fit_grid(NotGaussian(), "euler", 2)


def test_fit_grid_shows_a_progress_bar(capsys):
    model, _ = oracle_model()
    G.fit_grid(model, "euler", 2, pilots=2, holdout=2, max_evals=5, progress=True)
    err = capsys.readouterr().err
    assert "fit-grid euler 2" in err and "eval" in err and "rmse=" in err and "/5 " in err


@pytest.mark.parametrize("kw, match", [
    ({"sampler": "euler_ancestral"}, r"deterministic sampler, one of heun, euler"),
    ({"sampler": "heun", "S_churn": 1.0}, r"S_churn > 0"),
    ({"sampler": "unipc", "rho": 3.0}, r"option\(s\) \['rho'\] are not --sampler unipc's"),
    ({"sampler": "euler", "steps": 0}, r"--steps 0: must be a positive integer"),
    ({"sampler": "euler", "pilots": 0}, r"--pilots 0: must be a positive integer"),
    ({"sampler": "euler", "holdout": 0}, r"^--holdout 0: must be a positive integer$"),
    ({"sampler": "euler", "steps": True}, r"--steps True: must be a positive integer"),
    ({"sampler": "heun", "S_churn": 0.5}, r"^fit-grid: S_churn > 0 makes heun/euler stochastic; fit with S_churn 0$"),
    ({"sampler": "dpmpp_2m", "order": 2}, r"are not --sampler dpmpp_2m's; it takes: none$"),
    ({"sampler": "unipc", "eta": 1}, r"it takes: order, variant, use_corrector, lower_order_final$"),
])
def test_fit_grid_refusals(kw, match):
    model, _ = oracle_model()
    kw = {"steps": 3, **kw}
    with pytest.raises(UserError, match=match):
        G.fit_grid(model, kw.pop("sampler"), kw.pop("steps"), progress=False, **kw)


# ---- explicit and fitted grids in sampling -------------------------------------------------------------

def test_explicit_grid_checks_and_appends_zero():
    model, _ = oracle_model()
    for given in ("80, 10 1", [80, 10, 1.0, 0], (80.0, 10.0, 1.0)):
        assert model.explicit_grid(given).tolist() == [80.0, 10.0, 1.0, 0.0]
    vp = tiny_model("sde-vp")
    hi = vp.sigma_range[1]
    for bad, match in [("80,x", "give the levels as a list"), ([1, 1], "decrease strictly"), ([0], "at least one"),
                       ([2, float("nan")], "finite level"), ([2, -1], "finite level")]:
        with pytest.raises(UserError, match=match):
            model.explicit_grid(bad)
    lo = vp.sigma_range[0]
    for bad in ([hi * 1.01, 1.0], [hi, 1.0, lo * 0.5], [lo * 0.5]):
        with pytest.raises(UserError, match=r"lie in the run's range"):
            vp.explicit_grid(bad)
    assert vp.explicit_grid([hi * (1 + 1e-12), 1.0, lo * (1 - 1e-12)])[0] == hi * (1 + 1e-12)  # rounding slack


def test_explicit_grid_snaps_to_an_iddpm_table():
    """An iDDPM run supports its table's sigmas only: a given (or fitted) level is snapped like the Karras grid's."""
    from torch import nn

    from difflab.methods.gaussian.edm import EDMMethod

    idd = EDMMethod(nn.Identity(), 1, 2, variant="iddpm", precond_kwargs={"M": 50})
    got = idd.explicit_grid([5.0, 1.0])
    snapped = idd.round_sigma(torch.tensor([5.0, 1.0], dtype=f64))
    assert got.tolist() == [*snapped.tolist(), 0.0] and abs(float(got[0]) - 5.0) > 1e-3


def test_sigma_grid_reads_the_fitted_grid_and_refuses_mixed_grid_options():
    model, _ = oracle_model()
    model.fitted_grids = {"ipndm-3": {"sigmas": [80.0, 3.0, 0.05]}}
    assert model.sigma_grid("ipndm", 3, grid="fitted").tolist() == [80.0, 3.0, 0.05, 0.0]
    assert model.sigma_grid("ipndm", 99, sigmas=[9.0, 1.0]).tolist() == [9.0, 1.0, 0.0]
    with pytest.raises(UserError, match=r"no fitted grid for --sampler ipndm --steps 4 \(it has: ipndm-3\); "
                                        r"make one with difflab fit-grid"):
        model.sigma_grid("ipndm", 4, grid="fitted")
    model.fitted_grids = {"ipndm-3": {"sigmas": [80.0, 3.0, 0.05]}, "euler-2": {"sigmas": [80.0, 1.0]}}
    with pytest.raises(UserError, match=r"\(it has: euler-2, ipndm-3\)"):
        model.sigma_grid("ipndm", 4, grid="fitted")
    model.fitted_grids = {}
    with pytest.raises(UserError, match=r"\(it has: none\)"):
        model.sigma_grid("ipndm", 4, grid="fitted")
    model.fitted_grids = {"ipndm-3": {"sigmas": [80.0, 3.0, 0.05]}}
    with pytest.raises(UserError, match=r"drop \['sigma_min'\]"):
        model.sigma_grid("ipndm", 3, grid="fitted", sigma_min=0.01)
    with pytest.raises(UserError, match=r"drop \['--grid logsnr'\]"):
        model.sigma_grid("ipndm", 3, grid="logsnr", sigmas=[1.0])


def test_sample_walks_the_given_levels():
    model, _ = oracle_model()
    model.fitted_grids = {"dpmpp_2m-3": {"sigmas": [80.0, 2.0, 0.1]}}
    grid = torch.tensor([80.0, 2.0, 0.1, 0.0], dtype=f64)
    rng = lambda: StackedRandomGenerator("cpu", [3, 4])
    D = lambda x, sigma: model.denoise(x, sigma)
    by_hand = S.sample_dpmpp_2m(D, rng().randn([2, 1, 8, 8], dtype=f64), grid).float()
    assert torch.equal(model.sample(rng(), sampler="dpmpp_2m", steps=3, grid="fitted"), by_hand)
    assert torch.equal(model.sample(rng(), sampler="dpmpp_2m", sigmas=[80.0, 2.0, 0.1]), by_hand)
    assert not torch.allclose(model.sample(rng(), sampler="dpmpp_2m", steps=3), by_hand)


# ---- a trained run: fit-grid, grids.json, generate --grid fitted ---------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(tiny_cfg(), run_dir=tmp_path_factory.mktemp("r") / "run", progress=False)


def pixels(folder) -> list[np.ndarray]:
    return [np.asarray(PIL.Image.open(folder / f"{s:06d}.png")) for s in SEEDS]


def test_fit_grid_cli_stores_the_grid_and_keeps_the_others(run, capsys):
    main(["fit-grid", "--network", str(run), "--sampler", "euler", "--steps", "3", "--pilots", "4", "--holdout", "4",
          "--max-evals", "6", "--no-progress"])
    out = capsys.readouterr().out
    assert "held-out rmse" in out and "--grid fitted" in out
    main(["fit-grid", "--network", str(run), "--sampler", "unipc", "--steps", "3", "--pilots", "4", "--holdout", "4",
          "--max-evals", "3", "-o", "order=2", "--no-progress"])
    grids = G.read_grids(run)
    assert {"euler-3", "unipc-3"} <= set(grids) and grids["unipc-3"]["options"] == {"order": 2}
    e = grids["euler-3"]
    assert len(e["sigmas"]) == 3 and e["sigmas"][0] == 80.0 and e["checkpoint"].startswith("checkpoint-")
    assert e["rmse"]["holdout_fitted"] <= e["rmse"]["holdout_default"] * 1.5
    assert load_run(run)[0].fitted_grids == grids
    main(["info", str(run)])
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("fitted grid euler-3")]
    assert line and line[0].startswith("fitted grid euler-3 (--grid fitted): 80, ")


def test_generate_grid_fitted_equals_the_explicit_levels_and_a_refit_is_refused(run, tmp_path):
    G.store_grid(run, {"sampler": "euler", "steps": 3, "sigmas": [80.0, 1.5, 0.05]})
    a = gen.generate(run, SEEDS, tmp_path / "a", progress=False, sampler="euler", steps=3, sampler_grid="fitted")
    manifest = json.loads((a / gen.MANIFEST).read_text())
    assert manifest["sampler"]["sigmas"] == [80.0, 1.5, 0.05] and manifest["sampler"]["grid"] == "fitted"
    main(["generate", "--network", str(run), "--outdir", str(tmp_path / "b"), "--seeds", "0-4", "--sampler", "euler",
          "-o", "sigmas=[80,1.5,0.05]", "--no-progress"])
    karras = gen.generate(run, SEEDS, tmp_path / "k", progress=False, sampler="euler", steps=3)
    assert all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(tmp_path / "b")))
    assert not all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(karras)))
    G.store_grid(run, {"sampler": "euler", "steps": 3, "sigmas": [80.0, 0.7, 0.05]})
    with pytest.raises(UserError, match=r"other settings \(sigmas \[80.0, 1.5, 0.05\], now \[80.0, 0.7"):
        gen.generate(run, SEEDS, tmp_path / "a", progress=False, sampler="euler", steps=3, sampler_grid="fitted")


def test_python_api_fits_and_samples_the_fitted_grid(run):
    import difflab

    entry = difflab.fit_grid(run, "dpmpp_2m", 2, pilots=2, holdout=2, max_evals=4, progress=False)
    pipe = difflab.load(run)
    fitted = pipe.sample(seeds=[1, 2], sampler="dpmpp_2m", steps=2, grid="fitted")
    assert torch.equal(fitted, pipe.sample(seeds=[1, 2], sampler="dpmpp_2m", sigmas=entry["sigmas"]))
    assert G.read_grids(run)["dpmpp_2m-2"]["sigmas"] == entry["sigmas"]


def test_generate_refusals_name_the_fix(run, tmp_path, capsys):
    for argv, want in [(["--sampler", "ipndm", "--steps", "7", "--grid", "fitted"], "make one with difflab fit-grid"),
                       (["--sampler", "euler", "--steps", "5", "-o", "sigmas=[80,1]"], "-o sigmas gives 2 levels"),
                       (["--sampler", "euler", "-o", "sigmas=[1,2]"], "decrease strictly")]:
        with pytest.raises(SystemExit):
            main(["generate", "--network", str(run), "--outdir", str(tmp_path / "x"), "--no-progress", *argv])
        err = capsys.readouterr().err
        assert want in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x" / gen.MANIFEST).exists()


def test_read_grids_refuses_a_broken_file(tmp_path):
    assert G.read_grids(tmp_path) == {}
    (tmp_path / G.GRIDS_FILE).write_text("{not json")
    with pytest.raises(UserError, match=r"grids\.json: unreadable .*run difflab fit-grid again"):
        G.read_grids(tmp_path)
    (tmp_path / G.GRIDS_FILE).write_text('{"a": [1]}')
    with pytest.raises(UserError, match=r"not a difflab grids file"):
        G.read_grids(tmp_path)
