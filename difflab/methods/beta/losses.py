"""Beta-diffusion and SDD training objectives, per element (specs/beta_sdd.md §5.2-§5.4)."""

from __future__ import annotations

import torch

from difflab.errors import UserError
from difflab.methods.beta.divergences import holder_pseudo_divergence, kl_beta

# Canonical loss names; the reference spellings (KLUB_AS, SNR_Weighted_ELBO, ...) map here case-blind.
LOSS_TYPES: tuple[str, ...] = (
    "klub", "elbo", "hkd", "snr_weighted_elbo", "klub_conditional", "klub_marginal",
    "klub_conditional_as", "klub_marginal_as", "l2", "l1",
)
_ALIASES = {"klub_as": "elbo"}

# (conditional, marginal) KL weights: Beta diffusion's 0.99/0.01; SDD's KLUB uses 0.96/0.04 and HKD
# 0.97/0.03 (§5.3, §5.4 item 5). The ELBO keeps 0.99/0.01 in both.
_KL_WEIGHTS = {
    ("betadiff", "klub"): (0.99, 0.01), ("sdd", "klub"): (0.96, 0.04),
    ("betadiff", "elbo"): (0.99, 0.01), ("sdd", "elbo"): (0.99, 0.01),
    ("betadiff", "hkd"): (0.97, 0.03), ("sdd", "hkd"): (0.97, 0.03),
}


def canonical_loss_type(loss_type: str) -> str:
    """Normalise a loss name (case-blind, reference aliases) or raise a one-line UserError."""
    name = _ALIASES.get(str(loss_type).lower(), str(loss_type).lower())
    if name not in LOSS_TYPES:
        raise UserError(f"loss_type {loss_type!r} is unknown; choose one of: {', '.join(LOSS_TYPES)}")
    return name


def default_kl_weights(variant: str, loss_type: str) -> tuple[float, float]:
    """The paper's (conditional, marginal) KL weights for a variant and loss (1, 1 for single terms)."""
    return _KL_WEIGHTS.get((variant, loss_type), (1.0, 1.0))


def beta_params(
    x: torch.Tensor, alpha_t: torch.Tensor, alpha_s: torch.Tensor, delta: torch.Tensor, eta: float
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Conditional ``(eta delta x, eta (1 - alpha_s x))`` and marginal
    ``(eta alpha_t x, eta (1 - alpha_t x))`` Beta parameters (§5.2)."""
    return (eta * delta * x, eta * (1 - alpha_s * x)), (eta * alpha_t * x, eta * (1 - alpha_t * x))


def elementwise_loss(
    x0: torch.Tensor, x0_hat: torch.Tensor, alpha_t: torch.Tensor, alpha_s: torch.Tensor,
    delta: torch.Tensor, eta: float, loss_type: str, kl_weights: tuple[float, float],
    hpd_weight: float = 0.7, holder_gamma: float = 1.8, hpd_offset: float = 0.5,
    penalty: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-element loss, same shape as ``x0`` (§5.3-§5.4); no reduction.

    ``x0``/``x0_hat`` are in mapped units, ``alpha_t``, ``alpha_s``, ``delta = alpha_s - alpha_t``
    broadcast against them. KLUB terms put the model first (``KL(p_theta || q)``), the ``_as``/ELBO
    terms the data first. With ``penalty`` (SDD's P, broadcastable), every divergence term becomes
    ``max(0, term - max(0, P))``. HKD's HPD term has one value per pixel and is broadcast over the
    channels, so it counts C times in the sum, as in the reference.
    """
    if loss_type == "l2":
        return (x0 - x0_hat).square()
    if loss_type == "l1":
        return (x0 - x0_hat).abs()
    (ac_h, bc_h), (am_h, bm_h) = beta_params(x0_hat, alpha_t, alpha_s, delta, eta)
    (ac_d, bc_d), (am_d, bm_d) = beta_params(x0, alpha_t, alpha_s, delta, eta)
    p = None if penalty is None else penalty.clamp(min=0)

    def offset(term: torch.Tensor) -> torch.Tensor:
        return term if p is None else (term - p).clamp(min=0)

    swapped = loss_type in ("elbo", "snr_weighted_elbo", "klub_conditional_as", "klub_marginal_as")
    need_cond = loss_type not in ("snr_weighted_elbo", "klub_marginal", "klub_marginal_as")
    need_marg = loss_type not in ("klub_conditional", "klub_conditional_as")
    w_cond, w_marg = kl_weights
    total = torch.zeros_like(x0_hat)
    if need_cond:
        cond = kl_beta(ac_d, bc_d, ac_h, bc_h) if swapped else kl_beta(ac_h, bc_h, ac_d, bc_d)
        total = total + w_cond * offset(cond)
    if need_marg:
        marg = kl_beta(am_d, bm_d, am_h, bm_h) if swapped else kl_beta(am_h, bm_h, am_d, bm_d)
        total = total + w_marg * offset(marg)
    if loss_type == "hkd":
        hpd = holder_pseudo_divergence(ac_d, ac_h, holder_gamma, hpd_offset).clamp(min=0)
        total = total + hpd_weight * offset(hpd)
    return total
