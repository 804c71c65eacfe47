"""The EDM family (specs/gaussian_and_dddm.md §5): VP, VE, iDDPM and EDM preconditioning and their losses, on
one :class:`EDMMethod`. Sampling (Heun/Euler with churn, the ablation sampler, and every other Gaussian
sampler) and the likelihood come from :class:`~difflab.methods.gaussian.base.GaussianMethod`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difflab.errors import UserError
from difflab.methods.gaussian.base import GaussianMethod
from difflab.methods.gaussian.precond import PRECONDS, EDMPrecond, IDDPMPrecond
from difflab.methods.gaussian.sde import EDMSDE, VESDE, DiscreteSDE, GaussianSDE
from difflab.rng import StackedRandomGenerator


def precond_process(precond) -> GaussianSDE:
    """The process each preconditioner is trained on (§5.1): VP -> its VP SDE, VE -> a VE SDE over its
    range, iDDPM -> its u_j table, EDM -> EDM's process on [0.002, 80]."""
    name = precond.name
    if name == "vp":
        return precond.sde
    if name == "ve":
        return VESDE(precond.sigma_min, precond.sigma_max)
    if name == "iddpm":
        return DiscreteSDE(precond.u[: precond.M].flip(0))
    return EDMSDE(max(0.002, precond.sigma_min), min(80.0, precond.sigma_max))


class EDMMethod(GaussianMethod):
    """``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` with the preconditioner named by ``variant``."""

    name = "edm"
    default_sampler = "heun"

    def __init__(self, net: nn.Module, img_channels: int, img_resolution: int, label_dim: int = 0,
                 variant: str = "edm", precond_kwargs: dict[str, Any] | None = None, **unused: Any):
        super().__init__(net, img_channels, img_resolution, label_dim)
        if variant not in PRECONDS:
            raise UserError(f"--precond {variant!r} is not an EDM-family preconditioner; use one of {list(PRECONDS)}")
        self.variant = variant
        self.precond = PRECONDS[variant](**(precond_kwargs or {}))
        self.sde = precond_process(self.precond)

    @classmethod
    def net_out_channels(cls, img_channels: int, variant: str = "edm", **kwargs: Any) -> int:
        return 2 * img_channels if variant == "iddpm" else img_channels

    @property
    def sigma_range(self) -> tuple[float, float]:
        return float(getattr(self.precond, "sigma_min", 0.0)), float(getattr(self.precond, "sigma_max", float("inf")))

    def round_sigma(self, sigma):
        if isinstance(self.precond, IDDPMPrecond):
            return self.precond.round_sigma(torch.as_tensor(sigma, dtype=torch.float64))
        return sigma

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

    def sampler_defaults(self) -> dict[str, Any]:
        return {"sampler": "heun", "steps": 18}
