"""DDPM, improved DDPM and DDIM: the discrete-time Gaussian family (specs/gaussian_and_dddm.md §2–3).

One :class:`DDPMMethod` covers Ho et al. (eps-prediction, L_simple, ancestral sampling), improved DDPM
(cosine schedule, learned-range variance, hybrid / VLB loss, loss-aware timestep sampling, respacing,
bits/dim) and DDIM (eta, uniform/quad skipping). Its ᾱ table is a :class:`~difflab.methods.gaussian.sde.DiscreteSDE`
and its network a VE-form denoiser ``denoise(x, sigma)``, so the ancestral / DDIM loops are the shared samplers
of :mod:`~difflab.methods.gaussian.samplers` walking the table's own spacing, and every other Gaussian sampler
runs DDPM models too.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import UserError
from difflab.methods.base import Batch
from difflab.methods.gaussian import discrete as dm
from difflab.methods.gaussian import samplers as S
from difflab.methods.gaussian.base import GaussianMethod, work_dtype
from difflab.methods.gaussian.schedules import (
    alpha_bar_from_sigma,
    ddim_timesteps,
    get_betas,
    schedule_name,
    space_timesteps,
)
from difflab.methods.gaussian.sde import DiscreteSDE
from difflab.rng import StackedRandomGenerator

PREDICTIONS = ("eps", "x0", "v")
LOSSES = ("l2", "l1", "bce", "kl")
VAR_TYPES = ("fixedlarge", "fixedsmall")
TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")


def _check(option: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        choices = ", ".join(map(str, allowed))
        raise UserError(f"--{option} {value!r} is not supported; choose one of: {choices}")


class DDPMMethod(GaussianMethod):
    """T-step discrete Gaussian diffusion (§2.1) with eps/x0/v parameterisation (§1, §2.2).

    Options (all stored in the run's training options):

    * ``schedule`` ``l|linear|cos|cosine|DNS|DNST``, ``schedule_low``, ``schedule_high`` (scaled by 1000/T),
      ``num_timesteps`` T;
    * ``prediction`` ``eps|x0|v``; ``loss`` ``l2|l1|bce|kl`` (``bce`` compares the [0,1] images;
      ``kl`` is the rescaled VLB ``T * L_t``, iDDPM ``use_kl``);
    * ``learn_sigma`` (net outputs 2C channels; hybrid loss ``L_simple + hybrid_lambda * T * L_t`` with the
      mean detached in the VLB term), ``var_type`` ``fixedlarge|fixedsmall`` for fixed variances;
    * ``timestep_sampler`` ``uniform|loss-second-moment``; ``rescale_timesteps`` (net sees ``t * 1000/T``);
    * ``loss_reduction`` ``mean`` (per-pixel mean, as the DDPM codebases; their lr and grad-clip assume it)
      or ``sum`` (EDM-style sum over the example);
    * sampler defaults: ``sampler``, ``steps``, ``eta``, ``skip``, ``guidance``, ``clip_denoised``.
    """

    name: ClassVar[str] = "ddpm"
    default_sampler: ClassVar[str] = "ancestral"
    # difflab <= 0.1 kept the loss history in module buffers
    legacy_state_keys: ClassVar[dict[str, str]] = {"timestep_sampler.loss_history": "loss_history",
                                                   "timestep_sampler.loss_counts": "loss_counts"}

    def __init__(self, net: nn.Module, img_channels: int, img_resolution: int, label_dim: int = 0,
                 schedule: str = "linear", schedule_low: float = 1e-4,
                 schedule_high: float = 0.02, num_timesteps: int = 1000, prediction: str = "eps",
                 loss: str = "l2", learn_sigma: bool = False, hybrid_lambda: float = 0.001,
                 var_type: str = "fixedlarge", timestep_sampler: str = "uniform",
                 rescale_timesteps: bool = True,
                 loss_reduction: str = "mean", sampler: str = "ancestral", steps: int | None = None,
                 eta: float = 0.0, skip: str = "uniform", guidance: float = 1.0, clip_denoised: bool = True,
                 **unused: Any):
        super().__init__(net, img_channels, img_resolution, label_dim)
        _check("prediction", prediction, PREDICTIONS)
        _check("loss", loss, LOSSES)
        _check("var-type", var_type, VAR_TYPES)
        _check("timestep-sampler", timestep_sampler, TIMESTEP_SAMPLERS)
        _check("loss-reduction", loss_reduction, ("mean", "sum"))
        _check("sampler", sampler, self.samplers)
        self.schedule = schedule_name(schedule)
        self.num_timesteps = int(num_timesteps)
        betas = get_betas(self.schedule, self.num_timesteps, schedule_low, schedule_high)
        self.process = dm.DiscreteProcess(betas)
        self.sde = DiscreteSDE(self.process.sigmas)
        self.prediction, self.loss_type, self.learn_sigma = prediction, loss, bool(learn_sigma)
        self.hybrid_lambda, self.var_type = float(hybrid_lambda), var_type
        self.rescale_timesteps, self.loss_reduction = bool(rescale_timesteps), loss_reduction
        self.timestep_sampler = (dm.LossSecondMomentSampler(self.num_timesteps)
                                 if timestep_sampler == "loss-second-moment" else None)
        self.sampler_cfg = {"sampler": sampler, "steps": steps, "eta": float(eta), "skip": skip,
                            "guidance": float(guidance), "clip_denoised": bool(clip_denoised)}

    @classmethod
    def net_out_channels(cls, img_channels: int, **method_kwargs: Any) -> int:
        return 2 * img_channels if method_kwargs.get("learn_sigma") else img_channels

    def sampler_defaults(self) -> dict[str, Any]:
        return dict(self.sampler_cfg)

    # ---- σ-framework view (§1) ------------------------------------------------------------------
    def sigmas(self) -> torch.Tensor:
        """The σ table ``sqrt((1 - abar_i)/abar_i)``, float64 ``[T]``, increasing with the index i."""
        return self.process.sigmas.clone()

    @property
    def sigma_min(self) -> float:
        return float(self.process.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.process.sigmas[-1])

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous index for any σ: piecewise-linear in log σ through the table (exact at table points,
        clamped to [0, T-1]); the table's :class:`DiscreteSDE` time."""
        return self.sde.sigma_inv(torch.as_tensor(sigma, dtype=torch.float64).cpu())

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`t_from_sigma` on [0, T-1]."""
        return self.sde.sigma(torch.as_tensor(t, dtype=torch.float64).cpu())

    def noise_labels(self, t: torch.Tensor) -> torch.Tensor:
        """What the backbone sees as time: ``t * 1000/T`` (iDDPM ``rescale_timesteps``) or the raw index."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return (t * (1000.0 / self.num_timesteps) if self.rescale_timesteps else t).to(torch.float32)

    # ---- network evaluation -------------------------------------------------------------------
    def _net_dtype(self, like: torch.Tensor) -> torch.dtype:
        p = next(self.net.parameters(), None)
        return p.dtype if p is not None else like.dtype

    def _net(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None,
             augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = class_labels if (self.label_dim and class_labels is not None) else None
        x_in = x_t.to(self._net_dtype(x_t))
        out = self.net(x_in, self.noise_labels(t).to(x_t.device), labels, augment_labels)
        return out.to(x_t.dtype)

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Backbone output at ``(x_t, t)``; a conditional model given no labels sees the null label (-1)."""
        N = x_t.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(N)
        if self.label_dim and class_labels is None:
            class_labels = torch.full((N,), -1, dtype=torch.long, device=x_t.device)
        return self._net(x_t, t, class_labels)

    def predict(self, x_t: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(x0_hat, eps_hat, v_head)`` from a backbone output (§1 conversions)."""
        C = self.img_channels
        mean_out, v_head = (out[:, :C], out[:, C:]) if self.learn_sigma else (out, None)
        if self.prediction == "eps":
            eps = mean_out
            x0 = dm.eps_to_x0(x_t, eps, a, b)
        elif self.prediction == "x0":
            x0 = mean_out
            eps = dm.x0_to_eps(x_t, x0, a, b)
        else:
            x0, eps = dm.v_to_x0(x_t, mean_out, a, b), dm.v_to_eps(x_t, mean_out, a, b)
        return x0, eps, v_head

    def _ab(self, abar: torch.Tensor | float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = torch.as_tensor(abar, dtype=torch.float64).reshape(-1).to(like.device, like.dtype)
        abar = abar.expand(like.shape[0]).reshape(-1, *([1] * (like.ndim - 1)))
        return abar.sqrt(), (1 - abar).sqrt()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None):
        """EDM-form denoiser ``D(x; sigma) = x0_hat`` for ``x = x0 + sigma n`` (VE scaling, §1): the net sees
        ``sqrt(abar) x`` with ``abar = 1/(1 + sigma^2)`` at the matching (possibly fractional) index. With a
        learned variance it returns ``(x0_hat, v)``, ``v`` the variance head."""
        sigma = torch.as_tensor(sigma).detach().cpu().to(torch.float64).reshape(-1).expand(x.shape[0])
        a, b = self._ab(alpha_bar_from_sigma(sigma), x)
        x_t = a * x
        out = self.model_output(x_t, self.t_from_sigma(sigma), class_labels)
        x0_hat, _, v_head = self.predict(x_t, out, a, b)
        return x0_hat if v_head is None else (x0_hat, v_head)

    # ---- objective (§2.2) ---------------------------------------------------------------------
    def _vb_terms(self, x0: torch.Tensor, x_t: torch.Tensor, idx: torch.Tensor, x0_hat: torch.Tensor,
                  v_head: torch.Tensor | None, process: dm.DiscreteProcess | None = None) -> torch.Tensor:
        proc = process or self.process
        mean, _, _ = proc.posterior(x0_hat, x_t, idx)
        var_type = "learned" if self.learn_sigma else self.var_type
        logvar = proc.model_log_variance(idx, x_t, var_type, v_head)
        return proc.vb_bpd(x0, x_t, idx, mean, logvar)

    # ---- training state: the loss-second-moment history (§2.2) ----------------------------------------
    def init_training_state(self, num_examples: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.timestep_sampler.init_state() if self.timestep_sampler is not None else {}

    def update_training_state(self, state: dict[str, torch.Tensor],
                              updates: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.timestep_sampler is not None and "loss_history" in updates:
            rows = updates["loss_history"]
            self.timestep_sampler.update(state, rows["t"].cpu(), rows["loss"].cpu())

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        """:meth:`loss`, with the importance sampler reading the history in ``batch.state`` and recording
        each example's unweighted loss for the update after the step."""
        return self.loss(batch.x0, batch.class_labels, batch.rng, batch.augment_labels, batch)

    def loss(self, x0: torch.Tensor, class_labels: torch.Tensor | None, rng: StackedRandomGenerator,
             augment_labels: torch.Tensor | None = None, batch: Batch | None = None) -> torch.Tensor:
        """Per-example loss ``[N]``; t, noise (and importance-sampling uniforms) come from ``rng``. The
        loss-second-moment sampler is uniform without a training state (``batch`` None)."""
        N, T = x0.shape[0], self.num_timesteps
        if self.timestep_sampler is None:
            idx = rng.randint(T, [N]).cpu()
            weights = None
        else:
            state = batch.state if batch is not None else None
            idx, weights = self.timestep_sampler.sample(rng.rand([N]).cpu().to(torch.float64), state)
        noise = rng.randn_like(x0)
        x_t = self.process.q_sample(x0, idx, noise)
        out = self._net(x_t, idx, class_labels, augment_labels)
        a, b = self._ab(self.process.abar[idx], x0)
        x0_hat, eps_hat, v_head = self.predict(x_t, out, a, b)

        if self.loss_type == "kl":
            terms = T * self._vb_terms(x0, x_t, idx, x0_hat, v_head)
        else:
            mean_out = out[:, : self.img_channels]
            target = {"eps": noise, "x0": x0, "v": dm.velocity(x0, noise, a, b)}[self.prediction]
            if self.loss_type == "l2":
                terms = dm.mean_flat((mean_out - target) ** 2)
            elif self.loss_type == "l1":
                terms = dm.mean_flat((mean_out - target).abs())
            else:
                p = ((x0_hat + 1) / 2).clamp(1e-6, 1 - 1e-6)
                terms = dm.mean_flat(F.binary_cross_entropy(p, ((x0 + 1) / 2).clamp(0, 1), reduction="none"))
            if self.learn_sigma:
                # the VLB term trains only the variance head: the mean enters detached (iDDPM RESCALED_MSE)
                x0_frozen = self.predict(x_t, torch.cat([mean_out.detach(), v_head], 1), a, b)[0]
                terms = terms + self.hybrid_lambda * T * self._vb_terms(x0, x_t, idx, x0_frozen, v_head)
        if self.timestep_sampler is not None:
            if batch is not None:
                batch.record("loss_history", t=idx.to(terms.device), loss=terms.to(torch.float64))
            terms = terms * weights.to(terms.device)
        if self.loss_reduction == "sum":
            terms = terms * x0[0].numel()
        return terms

    # ---- samplers (§2.3, §3): the shared ones on the table's own spacing ------------------------------
    def _x0_eps(self, x: torch.Tensor, t: int, abar_t: float, labels, clip: bool):
        """``(x0_hat, eps_hat, v)`` of the model at table index ``t`` (x0 clipped when ``clip``)."""
        a, b = self._ab(abar_t, x)
        out = self.model_output(x, torch.tensor([float(t)]), labels)
        x0_hat, eps_hat, v_head = self.predict(x, out, a, b)
        if clip:
            x0_hat = x0_hat.clamp(-1, 1)
            eps_hat = dm.x0_to_eps(x, x0_hat, a, b)
        return x0_hat, eps_hat, v_head

    def default_grid(self, sampler: str) -> str:
        return "table" if sampler in S.TABLE_SAMPLERS else "karras"

    def default_steps(self, sampler: str) -> int:
        if sampler in ("ancestral", "deterministic", "pc", "ode"):
            return self.num_timesteps  # the full chain
        return min(50, self.num_timesteps) if sampler == "ddim" else super().default_steps(sampler)

    def default_var_type(self) -> str:
        return "learned" if self.learn_sigma else self.var_type

    def clip_for(self, sampler: str, clip_denoised: bool | None) -> bool:
        if clip_denoised is not None:
            return bool(clip_denoised)
        return bool(self.sampler_cfg["clip_denoised"]) and sampler in S.TABLE_SAMPLERS

    def table_grid(self, sampler: str, steps: int, skip: str | None = None, respacing: str | None = None
                   ) -> torch.Tensor:
        """The table's own spacing (§2.3, §3): ``ancestral``/``deterministic`` the respaced chain of ``steps``
        (improved-diffusion spec ``"N"``; ``respacing`` takes ``"N"``, ``"a,b,c"`` or ``"ddimN"``), ``ddim`` the
        ``skip`` (uniform/quad) subsequence of ``steps``."""
        T = self.num_timesteps
        if sampler == "ddim":
            if respacing is not None:
                raise UserError("--respacing applies to ancestral / deterministic; DDIM takes --steps and --skip")
            seq = ddim_timesteps(T, steps, skip or self.sampler_cfg["skip"])
        else:
            seq = space_timesteps(T, respacing if respacing is not None else str(steps))
        return S.sigmas_table(self.process.sigmas, seq)

    # ---- likelihood (§2.3 calc_bpd_loop) ------------------------------------------------------
    def nll_terms(self, x0: torch.Tensor, rng: StackedRandomGenerator,
                  class_labels: torch.Tensor | None = None, clip_denoised: bool | None = None
                  ) -> dict[str, torch.Tensor]:
        """All VLB terms in bits/dim: ``vb`` ``[N, T]`` (index 0 = decoder NLL), ``prior`` ``[N]`` and
        ``total`` = sum. ``x0`` is uint8 (encoded here) or already in [-1, 1] on the 256-level grid."""
        with torch.no_grad():
            if x0.dtype == torch.uint8:
                x0 = self.encode(x0)
            x0 = x0.to(work_dtype(x0.device))
            clip = self.sampler_cfg["clip_denoised"] if clip_denoised is None else clip_denoised
            labels = None if class_labels is None else torch.as_tensor(class_labels, dtype=torch.long,
                                                                        device=x0.device).reshape(-1)
            N, T = x0.shape[0], self.num_timesteps
            vb = torch.zeros(N, T, dtype=torch.float64)
            for t in reversed(range(T)):
                idx = torch.full((N,), t, dtype=torch.long)
                x_t = self.process.q_sample(x0, idx, rng.randn_like(x0))
                x0_hat, _, v_head = self._x0_eps(x_t, t, float(self.process.abar[t]), labels, clip)
                vb[:, t] = self._vb_terms(x0, x_t, idx, x0_hat, v_head).cpu()
            prior = self.process.prior_bpd(x0).cpu()
            return {"vb": vb, "prior": prior, "total": vb.sum(1) + prior}

    def vlb_bpd(self, x0: torch.Tensor, rng: StackedRandomGenerator, class_labels: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Per-example upper bound on the negative log-likelihood in bits/dim (iDDPM's ``calc_bpd_loop``:
        all T terms with fresh noise each, plus the prior term)."""
        return self.nll_terms(x0, rng, class_labels)["total"]

    nll_bpd = vlb_bpd  # the name of difflab <= 0.1
