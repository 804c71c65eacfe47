"""Score SDE (Song et al. 2021; specs/gaussian_and_dddm.md §4): VE, VP and sub-VP SDEs trained by denoising
score matching, as the methods ``sde-ve``, ``sde-vp`` and ``sde-subvp`` (EDM's ``vp``/``ve`` are its
preconditioners, a different parameterisation and loss).

The score model is a VE-form denoiser like every Gaussian method (§4.2):

* VE: the net sees ``x`` and ``ln sigma`` (NCSN++ Fourier-embeds it) and its output is divided by sigma,
  ``score = F/sigma``, i.e. ``D = x + sigma F``;
* VP / sub-VP: the net sees ``x_t = s x`` and ``999 t`` and predicts noise, ``score = -F/std`` with
  ``std = s sigma``, i.e. ``D = x - sigma F``;
* data in [0, 1] (``centered=False``, the VE configs) enter the net as ``2x - 1``.

Loss (§4.3): ``t ~ U(eps, 1)``, ``x = x0 + sigma z``; sigma^2 weighting ``|std s_theta + z|^2 = |D - x0|^2/sigma^2``
or likelihood weighting ``g^2 |s_theta + z/std|^2 = g^2 |D - x0|^2 / (sigma^4 s^2)``; mean over elements
(``reduce_mean``) or half the sum. Sampling defaults to predictor-corrector (VE: reverse diffusion + Langevin,
snr 0.16; VP/sub-VP: Euler-Maruyama, no corrector).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from difflab.errors import UserError
from difflab.methods.gaussian import samplers as S
from difflab.methods.gaussian.base import GaussianMethod
from difflab.methods.gaussian.sde import VESDE, VPSDE, GaussianSDE, SubVPSDE
from difflab.rng import StackedRandomGenerator

VARIANTS = ("sde-ve", "sde-vp", "sde-subvp")
PRIOR_MEANS = ("zero", "data")


def _choose(option: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise UserError(f"{option}={value!r} is not supported; choose one of: {', '.join(map(str, allowed))}")
    return value


class ScoreSDEMethod(GaussianMethod):
    """Continuous-time score SDE (§4.1-§4.3). ``variant`` is ``sde-ve``, ``sde-vp`` or ``sde-subvp``."""

    name: ClassVar[str] = "sde"
    default_sampler: ClassVar[str] = "pc"

    def __init__(self, net: nn.Module, img_channels: int, img_resolution: int, label_dim: int = 0,
                 variant: str = "sde-ve", sigma_min: float = 0.01, sigma_max: float = 50.0, beta_min: float = 0.1,
                 beta_max: float = 20.0, num_scales: int = 1000, continuous: bool = True,
                 likelihood_weighting: bool = False, reduce_mean: bool | None = None, train_eps: float = 1e-5,
                 sampling_eps: float | None = None, centered: bool | None = None, prior_mean: str = "zero",
                 sampler: str = "pc", steps: int | None = None, predictor: str | None = None,
                 corrector: str | None = None, snr: float = 0.16, corrector_steps: int = 1,
                 order: str = "corrector-first", norm: str = "sample", noise_removal: bool = True, **unused: Any):
        super().__init__(net, img_channels, img_resolution, label_dim)
        self.variant = _choose("method", variant, VARIANTS)
        ve = variant == "sde-ve"
        N = int(num_scales)
        if N < 2:
            raise UserError(f"num_scales={num_scales}: need at least 2 discretisation levels")
        if ve:
            if not 0 < sigma_min < sigma_max:
                raise UserError(f"sigma_min={sigma_min}, sigma_max={sigma_max}: need 0 < sigma_min < sigma_max")
            self.sde: GaussianSDE = VESDE(sigma_min, sigma_max, N)
        else:
            if not 0 <= beta_min < beta_max:
                raise UserError(f"beta_min={beta_min}, beta_max={beta_max}: need 0 <= beta_min < beta_max")
            self.sde = (VPSDE if variant == "sde-vp" else SubVPSDE)(beta_min, beta_max, N)
        if not 0 < train_eps < 1:
            raise UserError(f"train_eps={train_eps} must lie in (0, 1)")
        self.sde.t_train_eps = float(train_eps)
        if sampling_eps is not None:
            self.sde.t_eps = float(sampling_eps)
        self.continuous, self.likelihood_weighting = bool(continuous), bool(likelihood_weighting)
        self.reduce_mean = (not ve) if reduce_mean is None else bool(reduce_mean)
        self.centered = (not ve) if centered is None else bool(centered)
        self.data_range = (-1.0, 1.0) if self.centered else (0.0, 1.0)
        self.prior_mean_mode = _choose("prior_mean", prior_mean, PRIOR_MEANS)
        # per-channel data mean of the rewrite's prior (§4.8), set by fit_data; zero until then
        self.register_buffer("prior_mean", torch.zeros(img_channels, 1, 1))
        _choose("sampler", sampler, S.SAMPLERS)
        self.sampler_cfg = {
            "sampler": sampler, "steps": steps,
            "predictor": predictor or ("reverse_diffusion" if ve else "euler_maruyama"),
            "corrector": corrector or ("langevin" if ve else "none"),
            "snr": float(snr), "corrector_steps": int(corrector_steps), "order": order, "norm": norm,
            "noise_removal": bool(noise_removal),
        }
        S.check_options("pc", {k: v for k, v in self.sampler_cfg.items() if k not in ("sampler", "steps")})
        S.check_pc(*(self.sampler_cfg[k] for k in ("predictor", "corrector", "order", "norm")))

    def sampler_defaults(self) -> dict[str, Any]:
        return dict(self.sampler_cfg)

    def default_steps(self, sampler: str) -> int:
        return self.sde.N if sampler in S.SDE_SAMPLERS else super().default_steps(sampler)

    # ---- data range (§4.4: VE configs keep data in [0, 1]) ---------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.centered:
            return super().encode(images)
        return images.to(torch.float32) / 255

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.centered:
            return super().decode(x)
        return (x.to(torch.float32) * 255 + 0.5).clip(0, 255).to(torch.uint8)

    def fit_data(self, dataset: Any) -> None:
        """Per-channel mean of the training images (model units) for ``prior_mean="data"`` (§4.8)."""
        if self.prior_mean_mode != "data":
            return
        mean_image = getattr(dataset, "mean_image", None)
        if callable(mean_image):
            mean = np.asarray(mean_image(), dtype=np.float64)
        else:
            mean = np.mean([np.asarray(dataset[i][0], dtype=np.float64) for i in range(len(dataset))], axis=0)
        lo, hi = self.data_range
        per_channel = lo + (hi - lo) * mean.reshape(mean.shape[0], -1).mean(1) / 255
        self.prior_mean.copy_(torch.as_tensor(per_channel, dtype=torch.float32).reshape(-1, 1, 1))

    def process_sde(self) -> GaussianSDE:
        if self.prior_mean_mode == "zero":
            return self.sde
        sde = self.sde.with_steps(self.sde.N)
        sde.prior_mean = self.prior_mean.to(torch.float64)
        return sde

    # ---- parameterisation (§4.2) -------------------------------------------------------------------
    @property
    def sigma_range(self) -> tuple[float, float]:
        return float(self.sde.sigma(self.sde.t_train_eps)), float(self.sde.sigma(self.sde.t_max))

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        sig = sig.expand(x.shape[0]) if sig.numel() == 1 else sig
        r = lambda v: v.to(device=x.device, dtype=dtype).reshape(-1, 1, 1, 1)  # noqa: E731
        if self.variant == "sde-ve":
            x_in, c_noise = x, sig.log()
        else:
            t = self.sde.sigma_inv(sig)
            x_in, c_noise = r(self.sde.s(t)) * x, 999 * t
        if not self.centered:
            x_in = 2 * x_in - 1
        F = self.net(x_in.to(torch.float32), c_noise.to(device=x.device, dtype=torch.float32),
                     class_labels=class_labels, augment_labels=augment_labels)[:, : self.img_channels].to(dtype)
        return x + r(sig) * F if self.variant == "sde-ve" else x - r(sig) * F

    # ---- objective (§4.3) -------------------------------------------------------------------------
    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-example weight of ``|D - x0|^2``: ``1/sigma^2`` or ``g^2/(sigma^4 s^2)`` (likelihood weighting)."""
        sig = self.sde.sigma(t)
        if self.likelihood_weighting:
            return self.sde.diffusion(t) ** 2 / (sig**4 * self.sde.s(t) ** 2)
        return 1 / sig**2

    def train_times(self, rng: StackedRandomGenerator, n: int) -> torch.Tensor:
        """``t ~ U(eps, T)`` (continuous) or a uniformly drawn level ``k/(N-1)`` (SMLD / DDPM training)."""
        if self.continuous:
            eps = self.sde.t_train_eps
            return eps + rng.rand([n], dtype=torch.float64) * (self.sde.t_max - eps)
        k = rng.randint(self.sde.N, [n]).to(torch.float64)
        return (k / (self.sde.N - 1) * self.sde.t_max).clamp(min=self.sde.t_train_eps)

    def loss(self, x0: torch.Tensor, class_labels: torch.Tensor | None, rng: StackedRandomGenerator,
             augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        n = x0.shape[0]
        t = self.train_times(rng, n)
        sig = self.sde.sigma(t).to(device=x0.device, dtype=x0.dtype)
        noise = rng.randn_like(x0)
        D = self.denoise(x0 + sig.reshape(-1, 1, 1, 1) * noise, sig, class_labels, augment_labels)
        w = self.loss_weight(t).to(device=x0.device, dtype=x0.dtype).reshape(-1, 1, 1, 1)
        per = (w * (D - x0) ** 2).flatten(1)
        return per.mean(1) if self.reduce_mean else 0.5 * per.sum(1)
