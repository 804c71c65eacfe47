"""What every Gaussian method shares (DESIGN.md "The one idea"): a VE-form denoiser ``D(x, sigma)`` and a
process object (:mod:`~difflab.methods.gaussian.sde`); from those two, every Gaussian sampler and the exact
likelihood. A subclass supplies ``denoise``, ``sde`` and its objective; it never writes a sampler loop.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch

from difflab.errors import UserError
from difflab.methods.base import Method
from difflab.methods.gaussian import likelihood as L
from difflab.methods.gaussian import samplers as S
from difflab.methods.gaussian.grid_fit import key as grid_key
from difflab.methods.gaussian.samplers import work_dtype  # noqa: F401  (the sampler dtype; re-exported)
from difflab.methods.gaussian.sde import GaussianSDE
from difflab.rng import StackedRandomGenerator

Tensor = torch.Tensor
GRIDS = ("karras", "logsnr", "exponential", "time-uniform", "table", "fitted")


def _x0_only(D):
    return lambda x, sigma: S._x0(D(x, sigma))


class GaussianMethod(Method):
    """``x_t = s(t)(x0 + sigma(t) n)`` with a denoiser ``D(x0 + sigma n; sigma) = E[x0 | .]``.

    Subclasses set :attr:`sde` and implement :meth:`denoise` (which may return ``(x0_hat, v)`` with a
    learned-variance head ``v``). ``data_range`` is the model's data interval (Gaussian default [-1, 1]).
    """

    samplers: ClassVar[tuple[str, ...]] = S.SAMPLERS
    data_range: tuple[float, float] = (-1.0, 1.0)
    sde: GaussianSDE
    fitted_grids: dict[str, Any] = {}  # noqa: RUF012 -- replaced per model by load_run (grids.json), never mutated

    # ---- the parameterisation -------------------------------------------------------------------
    def denoise(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None):
        raise NotImplementedError

    def round_sigma(self, sigma):
        """Snap sigma to what the network supports (identity except on tables, e.g. iDDPM's)."""
        return sigma

    @property
    def sigma_range(self) -> tuple[float, float]:
        """Noise levels the network was trained on (sampler grids are clamped to it)."""
        return float(self.sde.sigma(self.sde.t_eps)), float(self.sde.sigma(self.sde.t_max))

    def process_sde(self) -> GaussianSDE:
        """The process used by SDE samplers and the likelihood (a subclass may attach a prior mean)."""
        return self.sde

    def guided_denoiser(self, class_labels: Tensor | None, guidance: float = 1.0, clip: bool = False):
        """``D(x, sigma)`` closure. ``guidance != 1`` is classifier-free guidance ``u + w (c - u)`` between the
        conditional and the null-label (-1) predictions, in one network call; a learned-variance head stays
        conditional. ``clip`` clamps ``x0_hat`` to the data range (DDPM's ``clip_denoised``)."""
        lo, hi = self.data_range
        guidance = float(guidance)

        def finish(out):
            if not clip:
                return out
            if isinstance(out, tuple):
                return out[0].clamp(lo, hi), out[1]
            return out.clamp(lo, hi)

        if guidance == 1.0 or class_labels is None or not self.label_dim:
            return lambda x, sigma: finish(self.denoise(x, sigma, class_labels))
        null = torch.full_like(class_labels, -1)

        def D(x: Tensor, sigma):
            n = x.shape[0]
            sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(n)
            out = self.denoise(torch.cat([x, x]), torch.cat([sig, sig]), torch.cat([class_labels, null]))
            x0, v = (out if isinstance(out, tuple) else (out, None))
            cond, uncond = x0[:n], x0[n:]
            mixed = uncond + guidance * (cond - uncond)
            return finish(mixed if v is None else (mixed, v[:n]))

        return D

    def rows_denoiser(self, labels: Tensor | None, guidance: float = 1.0, clip: bool = False,
                      x0_only: bool = True):
        """``denoiser(rows=None)``: the :meth:`guided_denoiser` of the rows ``rows`` (an index tensor or a slice;
        every row by default), each row with its own class label, for solvers that evaluate only some rows
        (the adaptive ODE, the likelihood, the grid fit). ``x0_only`` drops a learned-variance head."""

        def denoiser(rows=None):
            if labels is not None and rows is not None:
                lab = labels[rows.to(labels.device) if isinstance(rows, Tensor) else rows]
            else:
                lab = labels
            D = self.guided_denoiser(lab, guidance, clip=clip)
            return _x0_only(D) if x0_only else D

        return denoiser

    def draw_labels(self, rng: StackedRandomGenerator, class_labels: Tensor | None) -> Tensor | None:
        """Random class per seed when the model is conditional and no class is given (EDM convention)."""
        if not self.label_dim:
            return None
        if class_labels is None:
            return rng.randint(self.label_dim, [len(rng)])
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=rng.device).reshape(-1)
        if labels.numel() != len(rng):
            raise UserError(f"got {labels.numel()} class labels for {len(rng)} samples")
        return labels

    # ---- sigma grids ------------------------------------------------------------------------------
    def default_grid(self, sampler: str) -> str:
        return "karras"

    def sigma_grid(self, sampler: str, steps: int, grid: str | None = None, sigma_min: float | None = None,
                   sigma_max: float | None = None, rho: float | None = None, sigmas: Any = None,
                   **table_options: Any) -> Tensor:
        """The decreasing grid (ending with 0) a sigma-grid sampler walks. ``karras``: EDM's rho grid on
        [0.002, 80] (or ``sigma_min``/``sigma_max``) clamped to :attr:`sigma_range`; ``logsnr`` (= ``exponential``):
        uniform in log-SNR on the same range; ``time-uniform``: uniform in the process's time; ``table``: a DDPM
        table's own spacing (DDPM runs); ``fitted``: the run's fitted grid for ``sampler`` at ``steps``
        (:meth:`fitted_sigmas`). ``sigmas``: an explicit grid (its levels, decreasing; 0 is appended), which
        sets the step count."""
        grid = grid or (None if sigmas is not None else self.default_grid(sampler))
        if table_options and grid != "table":
            raise UserError(f"sampler option(s) {sorted(table_options)} apply to --grid table only (DDPM runs)")
        lo, hi = self.sigma_range
        given = [k for k, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)) if v is not None]
        if sigmas is not None or grid == "fitted":
            if given or grid not in (None, "fitted"):
                raise UserError(f"-o sigmas is a whole grid: drop {given or ['--grid ' + grid]}")
            return self.explicit_grid(self.fitted_sigmas(sampler, steps) if sigmas is None else sigmas)
        wrong = given if grid not in ("karras", "logsnr", "exponential") else \
            (["rho"] if grid != "karras" and rho is not None else [])
        if wrong:
            raise UserError(f"sampler option(s) {wrong} apply to --grid karras (sigma_min/sigma_max also to "
                            f"logsnr), not --grid {grid}")
        smin = max(float(sigma_min) if sigma_min is not None else 0.002, lo)
        smax = min(float(sigma_max) if sigma_max is not None else 80.0, hi)
        if grid == "karras":
            return S.sigmas_edm(int(steps), smin, smax, float(rho or 7.0), self.round_sigma)
        if grid in ("logsnr", "exponential"):
            grid = S.sigmas_logsnr(int(steps), smin, smax)[:-1]
            return S.append_zero(torch.as_tensor(self.round_sigma(grid), dtype=torch.float64))
        if grid == "time-uniform":
            return S.sigmas_time_uniform(self.sde, int(steps))
        if grid == "table":
            return self.table_grid(sampler, steps, **table_options)
        raise UserError(f"--grid {grid!r} is unknown; choose one of: {', '.join(GRIDS)}")

    def explicit_grid(self, sigmas: Any) -> Tensor:
        """A given grid (a list of levels, or ``"80,10,1"``) checked: finite, strictly decreasing, inside
        :attr:`sigma_range`, trailing zeros dropped, snapped by :meth:`round_sigma` (iDDPM's table), then 0
        appended."""
        try:
            values = [float(v) for v in (sigmas.replace(",", " ").split() if isinstance(sigmas, str)
                                         else list(sigmas))]
        except (TypeError, ValueError):
            raise UserError(f"-o sigmas={sigmas!r}: give the levels as a list, e.g. -o sigmas=[80,10,1,0.1]"
                            ) from None
        while values and values[-1] == 0:
            values.pop()
        lo, hi = self.sigma_range
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise UserError(f"-o sigmas={sigmas!r}: need at least one finite level > 0 (0 is appended)")
        if any(b >= a for a, b in zip(values, values[1:])):
            raise UserError(f"-o sigmas={sigmas!r}: the levels must decrease strictly")
        if values[0] > hi * (1 + 1e-12) or values[-1] < lo * (1 - 1e-12):
            raise UserError(f"-o sigmas={sigmas!r}: the levels must lie in the run's range [{lo:g}, {hi:g}]")
        return S.append_zero(torch.as_tensor(self.round_sigma(torch.tensor(values, dtype=torch.float64)),
                                             dtype=torch.float64))

    def fitted_sigmas(self, sampler: str, steps: int) -> list[float]:
        """The levels of the grid ``difflab fit-grid`` stored for ``sampler`` at ``steps`` in the run's
        ``grids.json`` (:attr:`fitted_grids`, read by ``load_run``)."""
        entry = self.fitted_grids.get(grid_key(sampler, steps))
        if entry is None:
            have = ", ".join(sorted(self.fitted_grids)) or "none"
            raise UserError(f"--grid fitted: this run has no fitted grid for --sampler {sampler} --steps {steps} "
                            f"(it has: {have}); make one with difflab fit-grid --network RUN --sampler {sampler} "
                            f"--steps {steps}")
        return [float(v) for v in entry["sigmas"]]

    def table_grid(self, sampler: str, steps: int, **options: Any) -> Tensor:
        raise UserError(f"--grid table needs a discrete DDPM run; {self.name} has no table")

    def clip_for(self, sampler: str, clip_denoised: bool | None) -> bool:
        """Whether a sampler clamps ``x0_hat`` (DDPM's ``clip_denoised``; off elsewhere)."""
        return bool(clip_denoised)

    # ---- sampling ---------------------------------------------------------------------------------
    def sample(self, rng: StackedRandomGenerator, class_labels: Tensor | None = None, sampler: str | None = None,
               steps: int | None = None, guidance: float | None = None, clip_denoised: bool | None = None,
               info: dict | None = None, **options: Any) -> Tensor:
        """Generate ``len(rng)`` samples in the model range (float32) with any Gaussian sampler
        (:data:`~difflab.methods.gaussian.samplers.SAMPLERS`); all noise from ``rng``."""
        defaults = self.sampler_defaults()
        sampler, steps = self.resolve_steps(sampler, steps)
        # the run's stored defaults travel with every call (generate passes them): drop those this sampler (or its
        # grid) does not take; anything else it does not take is the user's mistake
        applies = S.allowed_options(sampler)
        if (options.get("grid") or self.default_grid(sampler)) != "table":
            applies -= set(S.TABLE_OPTIONS)
        unset = object()
        options = {k: v for k, v in options.items() if v is not None and (k in applies or defaults.get(k, unset) != v)}
        S.check_options(sampler, options)
        guidance = float(defaults.get("guidance", 1.0) if guidance is None else guidance)
        with torch.no_grad():  # a function body, not a decorator: mutmut skips decorated functions
            latents = rng.randn([len(rng), *self.shape], dtype=work_dtype(rng.device))
            labels = self.draw_labels(rng, class_labels)
            # only the ancestral sampler reads a learned-variance head
            denoiser = self.rows_denoiser(labels, guidance, self.clip_for(sampler, clip_denoised),
                                          x0_only=sampler != "ancestral")
            D = denoiser()
            grid_keys = {k: options.pop(k) for k in list(options) if k in S.GRID_OPTIONS + S.TABLE_OPTIONS}
            fn = getattr(S, f"sample_{sampler}")
            takes = inspect.signature(fn).parameters
            if "round_sigma" in takes:
                options["round_sigma"] = self.round_sigma
            if "var_type" in takes:
                options.setdefault("var_type", self.default_var_type())
            if "info" in takes:
                options["info"] = info
            if "denoise_rows" in takes and labels is not None:
                options["denoise_rows"] = denoiser
            if sampler == "ablation":  # builds its own grid from EDM's discretisation options
                lo, hi = self.sigma_range
                x = fn(D, latents, rng.randn_like, num_steps=steps, net_sigma_min=lo, net_sigma_max=hi, **grid_keys,
                       **options)
            elif sampler in S.SDE_SAMPLERS:
                x = fn(D, latents, self.process_sde().with_steps(steps), rng.randn_like, **options)
            else:
                x = fn(D, latents, self.sigma_grid(sampler, steps, **grid_keys), rng.randn_like, **options)
            return x.to(torch.float32)

    def resolve_steps(self, sampler: str | None, steps: int | None) -> tuple[str, int]:
        """The sampler and step count :meth:`sample` runs: the given ones, else the run's stored ones (the stored
        step count belongs to the stored sampler), else :meth:`default_steps`."""
        defaults = self.sampler_defaults()
        sampler = (sampler or defaults.get("sampler") or self.default_sampler).replace("-", "_")  # dpmpp-2m alias
        if steps is not None and int(steps) < 1:
            raise UserError(f"--steps {steps}: must be a positive integer")
        if steps is None:
            steps = defaults.get("steps") if sampler == defaults.get("sampler") else None
        return sampler, int(steps or self.default_steps(sampler))

    def default_steps(self, sampler: str) -> int:
        fast = dict.fromkeys(S.FAST_SAMPLERS, 20) | {"dpmpp_2s": 10}  # NFE 20 (2s: 19)
        return ({"heun": 18, "euler": 18, "ablation": 18, "pc": 1000, "ode": 1000, "ddim": 50} | fast
                ).get(sampler, 50)

    def default_var_type(self) -> str:
        return "fixedlarge"

    # ---- likelihood (§4.6) ------------------------------------------------------------------------
    def ode_bpd(self, images: Tensor, rng: StackedRandomGenerator, class_labels: Tensor | None = None,
                probe: str = "rademacher", exact: bool = False, dequantize: bool = True, t_eps: float = 1e-5,
                rtol: float = 1e-5, atol: float = 1e-5, info: dict | None = None) -> Tensor:
        """Bits/dim of uint8 ``images`` through the probability-flow ODE (§4.6), one value per image: uniform
        dequantisation and the Hutchinson probe come from each image's own row of ``rng``; ``exact`` takes
        the exact divergence instead (small data only)."""
        if dequantize:
            u = rng.rand([images.shape[0], *images.shape[1:]], dtype=torch.float64).to(images.device)
            x = L.dequantize(images, u, self.data_range)
        else:
            lo, hi = self.data_range
            x = lo + (hi - lo) * images.to(torch.float64) / 255
        e = None if exact else L.probe_vectors(rng.rand_like, rng.randn_like, x, probe)
        labels = self.draw_labels(rng, class_labels) if class_labels is not None else None
        denoiser = self.rows_denoiser(labels)
        logp = L.ode_logp(denoiser(), self.process_sde(), x, e, t_eps=t_eps, rtol=rtol, atol=atol, info=info,
                          denoise_rows=None if labels is None else denoiser)
        return L.bits_per_dim(logp, x[0].numel(), L.bpd_offset(self.data_range))
