"""Beta diffusion and Smoothed Dirichlet Diffusion as one :class:`Method` (specs/beta_sdd.md).

``variant="betadiff"`` is Beta diffusion (Zhou et al., NeurIPS 2023); ``variant="sdd"`` adds SDD's
smoothness rescaling of the noisy logit (§4.1), its penalty integral (§5.4 item 3), its loss weights
and the constant prior (§6). Everything else — process, preconditioning, sampler — is shared.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from difflab.errors import UserError
from difflab.methods.base import Method
from difflab.methods.beta.divergences import penalty_expected, penalty_mc
from difflab.methods.beta.losses import canonical_loss_type, default_kl_weights, elementwise_loss
from difflab.methods.beta.process import (
    alpha_gap,
    calc_dtype,
    log_gamma,
    logit_alpha,
    logit_moments,
    reverse_logit_update,
    sampler_logit_grid,
    smoothness_factor,
)
from difflab.rng import StackedRandomGenerator

VARIANTS = ("betadiff", "sdd")
PENALTIES = ("off", "mc", "expected")
PRIORS = ("mean", "constant")
GRIDS = ("auto", "alpha", "t")
OUTPUTS = ("x0_hat", "z0", "both")
# Output logits are clamped here before the sigmoid: float64 sigmoid rounds to exactly 1 beyond ~37,
# and the clamp keeps x0_hat strictly inside (Shift, Shift + Scale) (§4.2).
_LOGIT_LIMIT = 30.0


def _choose(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise UserError(f"{name}={value!r} is unknown; choose one of: {', '.join(allowed)}")
    return value


class BetaMethod(Method):
    """Beta diffusion / SDD on any backbone ``net(x, noise_labels, class_labels, augment_labels)``.

    Process ``q(z_t|x0) = Beta(eta alpha_t x0, eta (1 - alpha_t x0))`` on data mapped to
    ``[shift, shift + scale]`` with ``logit alpha(t) = sigmoid_start + (sigmoid_end - sigmoid_start) t^p``.
    All hyperparameters are constructor arguments, so a stored run rebuilds the method exactly.
    ``None`` picks the variant's paper default.
    """

    name = "beta"
    samplers = ("sdd",)
    default_sampler = "sdd"
    # Flag spellings of the reference train.py -> constructor argument (for the CLI's option routing).
    flag_aliases: ClassVar[dict[str, str]] = {"Shift": "shift", "Scale": "scale", "lossType": "loss_type"}

    def __init__(
        self, net: nn.Module, img_channels: int, img_resolution: int, label_dim: int = 0,
        variant: str = "sdd", eta: float = 10000.0, sigmoid_start: float = 10.0,
        sigmoid_end: float = -13.0, sigmoid_power: float = 1.0, shift: float = 0.6, scale: float = 0.39,
        loss_type: str | None = None, kl_weights: tuple[float, float] | None = None,
        hpd_weight: float = 0.7, holder_gamma: float = 1.8, hpd_offset: float = 0.5,
        smooth_lambda: float | None = None, penalty: str | None = None, penalty_samples: int = 100,
        penalty_delta: float = 1e-6, penalty_temperature: float = 0.02, t_min: float = 1e-5,
        prev_ratio: float = 0.95, prior: str | None = None, sampler_steps: int = 200,
        sampler_grid: str = "auto", **unused: Any,
    ):
        super().__init__(net, img_channels, img_resolution, label_dim)
        self.variant = _choose("variant", variant, VARIANTS)
        sdd = self.variant == "sdd"
        if not eta > 0:
            raise UserError(f"eta={eta} must be positive (it is the Beta concentration)")
        if not (shift > 0 and scale > 0 and shift + scale < 1):
            raise UserError(f"shift={shift}, scale={scale}: need shift > 0, scale > 0 and shift + scale < 1")
        if not sigmoid_start > sigmoid_end:
            raise UserError(f"sigmoid_start={sigmoid_start} must exceed sigmoid_end={sigmoid_end} "
                            "(alpha must decrease with t)")
        if not sigmoid_power > 0:
            raise UserError(f"sigmoid_power={sigmoid_power} must be positive")
        if not (0 < t_min < 1 and 0 < prev_ratio < 1):
            raise UserError(f"t_min={t_min} and prev_ratio={prev_ratio} must both lie in (0, 1)")
        if not holder_gamma > 1:
            raise UserError(f"holder_gamma={holder_gamma} must be > 1 (Hölder exponent)")
        self.eta, self.shift, self.scale = float(eta), float(shift), float(scale)
        self.sigmoid_start, self.sigmoid_end = float(sigmoid_start), float(sigmoid_end)
        self.sigmoid_power = float(sigmoid_power)
        self.loss_type = canonical_loss_type(loss_type or ("hkd" if sdd else "klub"))
        weights = kl_weights if kl_weights is not None else default_kl_weights(self.variant, self.loss_type)
        if len(weights) != 2:
            raise UserError(f"kl_weights={kl_weights!r}: give two numbers, (conditional, marginal)")
        self.kl_weights = (float(weights[0]), float(weights[1]))
        self.hpd_weight, self.hpd_offset = float(hpd_weight), float(hpd_offset)
        self.holder_gamma = float(holder_gamma)
        self.smooth_lambda = float(smooth_lambda if smooth_lambda is not None else (2e-6 if sdd else 0.0))
        self.penalty = _choose("penalty", penalty or ("mc" if sdd else "off"), PENALTIES)
        if self.penalty == "mc" and int(penalty_samples) < 1:
            raise UserError(f"penalty_samples={penalty_samples} must be >= 1 (or set penalty='expected')")
        self.penalty_samples = int(penalty_samples)
        self.penalty_delta, self.penalty_temperature = float(penalty_delta), float(penalty_temperature)
        self.t_min, self.prev_ratio = float(t_min), float(prev_ratio)
        self.prior = _choose("prior", prior or ("constant" if sdd else "mean"), PRIORS)
        self.sampler_steps = self._check_steps(sampler_steps)
        self.sampler_grid = _choose("sampler_grid", sampler_grid, GRIDS)
        # Prior mean image in mapped units (§6 "Initialisation"); the constant until fit_data runs.
        self.register_buffer("prior_mean", torch.full(self.shape, self.shift + self.scale / 2))

    # ---- data range (§1) ------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> ``u/255 * scale + shift`` in ``[shift, shift + scale]``."""
        return images.to(torch.float32) / 255 * self.scale + self.shift

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Mapped values -> uint8 by EDM's rounding of ``(x - shift)/scale`` mapped to [-1, 1]."""
        y = (x.to(torch.float32) - self.shift) / self.scale
        return (y * 255 + 0.5).clip(0, 255).to(torch.uint8)

    def fit_data(self, dataset: Any) -> None:
        """Store the dataset mean image (mapped units) as the prior mean for ``prior="mean"`` (§6)."""
        mean_image = getattr(dataset, "mean_image", None)
        if callable(mean_image):
            mean = np.asarray(mean_image(), dtype=np.float64)
        else:
            total, count = None, 0
            for i in range(len(dataset)):
                item = dataset[i]
                img = np.asarray(item[0] if isinstance(item, (tuple, list)) else item, dtype=np.float64)
                total = img if total is None else total + img
                count += 1
            if count == 0:
                raise UserError("the training dataset is empty; cannot compute its mean image")
            mean = total / count
        if tuple(mean.shape) != self.shape:
            raise UserError(f"dataset mean image has shape {tuple(mean.shape)} but the model expects "
                            f"{self.shape}; check --resolution and the channel count")
        mapped = torch.as_tensor(mean / 255 * self.scale + self.shift, dtype=torch.float32)
        self.prior_mean.copy_(mapped.to(self.prior_mean.device))

    # ---- preconditioning (§4) -------------------------------------------------------------------
    def denoise(
        self, ell: torch.Tensor, logit_alpha_t: torch.Tensor, class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x0_hat`` (float64 where available) from the noisy logit ``ell`` at ``logit alpha_t`` ``[N]``.

        ``x_in = (ell - mu)/std`` (analytic, §4.1), ``c_noise = -logit(alpha)/8``,
        ``logit x0_hat = x_in + F(x_in, c_noise)``, ``x0_hat = sigmoid(.) * scale + shift`` (§4.2).
        """
        mu, std = logit_moments(logit_alpha_t, self.eta, self.shift, self.scale)
        x_in = ((ell - mu.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)).to(torch.float32)
        c_noise = (-logit_alpha_t / 8).to(torch.float32)
        out = self.net(x_in, c_noise, class_labels=class_labels, augment_labels=augment_labels)
        logit_x = (x_in + out.to(torch.float32)).to(ell.dtype).clamp(-_LOGIT_LIMIT, _LOGIT_LIMIT)
        return torch.sigmoid(logit_x) * self.scale + self.shift

    # ---- objective (§3, §5) ---------------------------------------------------------------------
    def loss(
        self, x0: torch.Tensor, class_labels: torch.Tensor | None, rng: StackedRandomGenerator,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-example loss ``[N]``: one ``t ~ U[t_min, 1]`` per image (§3), then :meth:`loss_at`."""
        dtype = calc_dtype(x0.device)
        t = 1 + rng.rand([x0.shape[0]], dtype=dtype) * (self.t_min - 1)
        return self.loss_at(x0, t, rng, class_labels, augment_labels)

    def loss_at(
        self, x0: torch.Tensor, t: torch.Tensor, rng: StackedRandomGenerator,
        class_labels: torch.Tensor | None = None, augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-example loss ``[N]`` at times ``t`` ``[N]``, previous step ``s = prev_ratio * t`` (§3, §5)."""
        dtype = calc_dtype(x0.device)
        x = x0.to(dtype)
        t = t.to(device=x.device, dtype=dtype)
        lt = logit_alpha(t, self.sigmoid_start, self.sigmoid_end, self.sigmoid_power)
        ls = logit_alpha(self.prev_ratio * t, self.sigmoid_start, self.sigmoid_end, self.sigmoid_power)
        alpha_t, alpha_s = torch.sigmoid(lt).view(-1, 1, 1, 1), torch.sigmoid(ls).view(-1, 1, 1, 1)
        delta = alpha_gap(ls, lt).view(-1, 1, 1, 1)
        ell = log_gamma(rng, self.eta * alpha_t * x) - log_gamma(rng, self.eta * (1 - alpha_t * x))
        if self.smooth_lambda:
            ell = ell / smoothness_factor(ell, self.smooth_lambda)
        x0_hat = self.denoise(ell, lt, class_labels, augment_labels)
        if self.variant == "sdd":
            x = x.clamp(self.shift, self.shift + self.scale)
            x0_hat = x0_hat.clamp(self.shift, self.shift + self.scale)
        penalty = self.penalty_integral(rng, x, x0_hat.detach(), delta)
        per_elem = elementwise_loss(
            x, x0_hat, alpha_t, alpha_s, delta, self.eta, self.loss_type, self.kl_weights,
            self.hpd_weight, self.holder_gamma, self.hpd_offset, penalty)
        return per_elem.sum(dim=tuple(range(1, per_elem.ndim))).to(torch.float32)

    def penalty_integral(
        self, rng: StackedRandomGenerator, x0: torch.Tensor, x0_hat: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor | None:
        """SDD's gradient-free offset ``P`` per example, ``[N,1,1,1]`` (§5.4 item 3), or None if off.

        ``P = mean_pixels(pen(eta delta x0) - pen(eta delta x0_hat))``; one value per example rather
        than per minibatch, so an example's loss does not depend on its batch-mates.
        """
        if self.penalty == "off" or x0.shape[1] < 2:
            return None
        a_data, a_model = self.eta * delta * x0, self.eta * delta * x0_hat
        if self.penalty == "expected":
            diff = penalty_expected(a_data) - penalty_expected(a_model)
        else:
            kw = dict(samples=self.penalty_samples, delta=self.penalty_delta,
                      temperature=self.penalty_temperature)
            diff = penalty_mc(rng, a_data, **kw) - penalty_mc(rng, a_model, **kw)
        return diff.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    # ---- sampler (§6) ---------------------------------------------------------------------------
    @staticmethod
    def _check_steps(steps: Any) -> int:
        try:
            value = int(steps)
        except (TypeError, ValueError):
            value = 0
        if value < 1 or value != steps:
            raise UserError(f"steps={steps!r} must be a positive integer")
        return value

    def sample(
        self, rng: StackedRandomGenerator, class_labels: torch.Tensor | None = None,
        sampler: str | None = None, steps: int | None = None, grid: str | None = None,
        prior: str | None = None, output: str = "x0_hat", **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Log-space ancestral sampler (§6); ``len(rng)`` images in mapped units.

        ``output``: ``"x0_hat"`` (primary: the last denoiser estimate), ``"z0"`` (``sigmoid(l_N)/alpha_N``)
        or ``"both"`` (a tuple). ``grid``: ``"alpha"`` (geometric in alpha), ``"t"`` or ``"auto"``.
        ``prior``: ``"mean"`` (dataset mean image stored by :meth:`fit_data`; the constant if never
        fitted) or ``"constant"`` (``shift + scale/2``).
        """
        _choose("sampler", sampler or self.default_sampler, self.samplers)
        steps = self._check_steps(self.sampler_steps if steps is None else steps)
        grid = _choose("grid", grid or self.sampler_grid, GRIDS)
        prior = _choose("prior", prior or self.prior, PRIORS)
        _choose("output", output, OUTPUTS)
        if grid == "t" and steps < 2:
            raise UserError("steps must be >= 2 with the t grid")
        # torch.no_grad() as a block, not a decorator: mutmut 3 skips decorated functions (docs/testing.md)
        with torch.no_grad():
            device = self.prior_mean.device
            dtype = calc_dtype(device)
            n = len(rng)
            logits = sampler_logit_grid(steps, self.sigmoid_start, self.sigmoid_end, self.sigmoid_power, grid,
                                        dtype=dtype, device=device)
            x_init = self.prior_mean.to(dtype) if prior == "mean" else torch.full(
                self.shape, self.shift + self.scale / 2, dtype=dtype, device=device)
            x_init = x_init.expand(n, *self.shape)
            alpha_0 = torch.sigmoid(logits[0])
            ell = log_gamma(rng, self.eta * alpha_0 * x_init) - log_gamma(rng, self.eta * (1 - alpha_0 * x_init))
            if self.smooth_lambda:
                ell = ell / smoothness_factor(ell, self.smooth_lambda)
            x0_hat = x_init
            for j in range(steps):
                x0_hat = self.denoise(ell, logits[j].expand(n), class_labels)
                delta = alpha_gap(logits[j + 1], logits[j])
                alpha_next = torch.sigmoid(logits[j + 1])
                ell_p = (log_gamma(rng, self.eta * delta * x0_hat)
                         - log_gamma(rng, self.eta * (1 - alpha_next * x0_hat)))
                ell = reverse_logit_update(ell, ell_p)
            z0 = torch.sigmoid(ell) / torch.sigmoid(logits[-1])
            x0_hat, z0 = x0_hat.to(torch.float32), z0.to(torch.float32)
            return {"x0_hat": x0_hat, "z0": z0, "both": (x0_hat, z0)}[output]

    def sampler_defaults(self) -> dict[str, Any]:
        return {"sampler": self.default_sampler, "steps": self.sampler_steps, "grid": self.sampler_grid,
                "prior": self.prior}

