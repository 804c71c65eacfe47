"""The EDM family (specs/gaussian_and_dddm.md §5): VP, VE, iDDPM and EDM preconditioning, their losses,
the Heun/Euler sampler with churn and the ablation sampler, on one :class:`Method`."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from difflab.errors import UserError
from difflab.methods.base import Method
from difflab.methods.gaussian import samplers as S
from difflab.methods.gaussian.precond import PRECONDS, EDMPrecond, IDDPMPrecond
from difflab.rng import StackedRandomGenerator

ABLATION_KEYS = ("discretization", "schedule", "scaling", "epsilon_s", "C_1", "C_2", "M", "alpha")


class EDMMethod(Method):
    """``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` with the preconditioner named by ``variant``."""

    name = "edm"
    samplers: ClassVar[tuple[str, ...]] = ("heun", "euler", "ablation")
    default_sampler = "heun"

    def __init__(self, net: nn.Module, img_channels: int, img_resolution: int, label_dim: int = 0,
                 variant: str = "edm", precond_kwargs: dict[str, Any] | None = None, **unused: Any):
        super().__init__(net, img_channels, img_resolution, label_dim)
        if variant not in PRECONDS:
            raise UserError(f"--precond {variant!r} is not an EDM-family preconditioner; use one of {list(PRECONDS)}")
        self.variant = variant
        self.precond = PRECONDS[variant](**(precond_kwargs or {}))

    @classmethod
    def net_out_channels(cls, img_channels: int, variant: str = "edm", **kwargs: Any) -> int:
        return 2 * img_channels if variant == "iddpm" else img_channels

    # ---- parameterisation (§5.1) ------------------------------------------------------------
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``D(x; sigma)``: the backbone runs in float32, D is formed in the dtype of ``x``."""
        dtype = x.dtype
        sigma = torch.as_tensor(sigma, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                                device=x.device)
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma.reshape(-1)
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma)
        shape = (-1, 1, 1, 1)
        F_x = self.net((c_in.reshape(shape) * x).to(torch.float32), c_noise.to(torch.float32),
                       class_labels=class_labels, augment_labels=augment_labels)
        F_x = F_x[:, : self.img_channels].to(dtype)
        return c_skip.reshape(shape) * x + c_out.reshape(shape).to(dtype) * F_x

    # ---- objective (§5.2) -------------------------------------------------------------------
    def loss(self, x0: torch.Tensor, class_labels: torch.Tensor | None, rng: StackedRandomGenerator,
             augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        n = x0.shape[0]
        if isinstance(self.precond, EDMPrecond):
            sigma = self.precond.train_sigma_from_normal(rng.randn([n]).to(x0.device))
        else:
            sigma = self.precond.train_sigma(rng.rand([n]).to(x0.device))
        weight = self.precond.loss_weight(sigma).reshape(-1, 1, 1, 1)
        noise = rng.randn_like(x0) * sigma.reshape(-1, 1, 1, 1)
        D = self.denoise(x0 + noise, sigma, class_labels, augment_labels)
        return (weight * (D - x0) ** 2).flatten(1).sum(1)

    # ---- sampling (§5.3, §5.4) ----------------------------------------------------------------
    def guided_denoiser(self, class_labels: torch.Tensor | None, guidance: float = 1.0):
        """Denoiser closure; ``guidance != 1`` mixes conditional and null-label predictions (CFG)."""
        if guidance == 1.0 or class_labels is None:
            return lambda x, sigma: self.denoise(x, sigma, class_labels)
        null = torch.full_like(class_labels, -1)

        def D(x, sigma):
            cond = self.denoise(x, sigma, class_labels)
            uncond = self.denoise(x, sigma, null)
            return uncond + guidance * (cond - uncond)

        return D

    def _round_sigma(self):
        if isinstance(self.precond, IDDPMPrecond):
            return lambda s: self.precond.round_sigma(torch.as_tensor(s, dtype=torch.float64))
        return lambda s: s

    def draw_labels(self, rng: StackedRandomGenerator, class_labels: torch.Tensor | None) -> torch.Tensor | None:
        """Random class per seed when the model is conditional and no class is given (EDM convention)."""
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return rng.randint(self.label_dim, [len(rng)])
        return class_labels

    @torch.no_grad()
    def sample(self, rng: StackedRandomGenerator, class_labels: torch.Tensor | None = None,
               sampler: str | None = None, steps: int | None = None, **kw: Any) -> torch.Tensor:
        sampler = sampler or self.default_sampler
        if sampler not in self.samplers:
            raise UserError(f"--sampler {sampler!r} is not available for {self.variant}; use one of {self.samplers}")
        steps = int(steps or 18)
        latents = rng.randn([len(rng), *self.shape])
        class_labels = self.draw_labels(rng, class_labels)
        denoise = self.guided_denoiser(class_labels, float(kw.pop("guidance", 1.0)))
        churn = {k: float(kw[k]) for k in ("S_churn", "S_min", "S_max", "S_noise") if kw.get(k) is not None}
        net_min = float(getattr(self.precond, "sigma_min", 0.0))
        net_max = float(getattr(self.precond, "sigma_max", float("inf")))
        if sampler == "ablation":
            abl = {k: kw[k] for k in ABLATION_KEYS if kw.get(k) is not None}
            return S.sample_ablation(denoise, latents, rng.randn_like, num_steps=steps,
                                     sigma_min=kw.get("sigma_min"), sigma_max=kw.get("sigma_max"),
                                     rho=float(kw.get("rho") or 7.0), solver=kw.get("solver") or "heun",
                                     round_sigma=self._round_sigma(), net_sigma_min=net_min,
                                     net_sigma_max=net_max, **abl, **churn).to(torch.float32)
        sigma_min = max(float(kw.get("sigma_min") or 0.002), net_min)
        sigma_max = min(float(kw.get("sigma_max") or 80.0), net_max)
        sigmas = S.sigmas_edm(steps, sigma_min, sigma_max, float(kw.get("rho") or 7.0), self._round_sigma())
        return S.sample_heun(denoise, latents, sigmas, rng.randn_like, solver=sampler,
                             round_sigma=self._round_sigma(), **churn).to(torch.float32)

    def sampler_defaults(self) -> dict[str, Any]:
        return {"sampler": "heun", "steps": 18}
