"""Exponential moving averages of the weights: EDM's half-life form and DDPM's plain decay
(specs/gaussian_and_dddm.md §5.6 and §2.4)."""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(batch: int, nimg: int, step: int, halflife_kimg: float | None, rampup_ratio: float | None,
             decay: float | None, start_step: int = 0) -> float:
    """Averaging weight ``beta`` of the old EMA for the update after an optimizer step:
    ``ema <- beta ema + (1 - beta) weights``.

    ``nimg`` is the number of images seen BEFORE this step and ``step`` the number of steps done INCLUDING it.
    Half-life (EDM, §5.6): ``0.5 ** (batch / h)`` with ``h = min(halflife_kimg * 1000, rampup_ratio * nimg)``,
    so the first update (nimg = 0) copies the weights. Plain decay (abarankab DDPM, §2.4): ``decay`` from
    ``start_step`` on, 0 (copy the weights) before it.
    """
    if decay is not None:
        return 0.0 if step < start_step else float(decay)
    if halflife_kimg is None:
        return 0.0
    h = halflife_kimg * 1000
    if rampup_ratio is not None:
        h = min(h, nimg * rampup_ratio)
    return 0.5 ** (batch / max(h, 1e-8))


def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """``ema <- beta * ema + (1 - beta) * model``; buffers are copied."""
    with torch.no_grad():  # a block, not a decorator: mutmut 3 skips decorated functions (docs/testing.md)
        # one fused lerp over all parameters (ema + (1 - beta)(p - ema); beta = 0 copies exactly)
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - beta)
        for b_ema, b in zip(ema.buffers(), model.buffers()):
            b_ema.copy_(b)
