"""Conditioning a backbone on an image-shaped ``context`` (specs/gaussian_and_dddm.md §6.3; DDDM's estimate).

Two ways, chosen by the network option ``context_mode``:

* ``cross_attention``: :class:`SpatialTransformer` blocks at the backbone's attention resolutions (the
  ADM and DDPM U-Nets build them when ``context_channels > 0``), attending to the context projected by a
  1x1 convolution to one token per context pixel;
* ``concat``: :class:`ConcatContext` wraps ANY backbone, whose first layer is built ``context_channels``
  wider, and feeds it ``cat(x, context)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import UserError

CONTEXT_MODES = ("cross_attention", "concat")


def check_context(context: torch.Tensor | None, x: torch.Tensor, channels: int) -> torch.Tensor:
    """The context of a network built with ``context_channels = channels``: ``[N, channels, h, w]``."""
    if context is None:
        raise UserError(f"this network was built with context_channels={channels} and needs a context "
                        "(e.g. DDDM's estimate); pass context=...")
    if context.ndim != 4 or context.shape[0] != x.shape[0] or context.shape[1] != channels:
        raise UserError(f"context must have shape [{x.shape[0]}, {channels}, H, W], got {list(context.shape)}")
    return context.to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention of query tokens ``[N, L, D]`` to key/value tokens ``[N, S, D]`` (self-attention when
    they are the same): bias-free q, k, v projections, output projection with bias."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"cross-attention: inner dim {dim} does not split into {num_heads} heads")
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        h = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, -1, h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.to_q(x)), heads(self.to_k(tokens)), heads(self.to_v(tokens)))
        return self.to_out(out.transpose(1, 2).reshape(n, length, d))


class SpatialTransformer(nn.Module):
    """DDDM's attention block (§6.3): ``GroupNorm -> 1x1 proj_in -> transformer block -> zero-init 1x1 proj_out``
    plus the input. The transformer block (pre-LayerNorm, each part residual) is self-attention over the
    pixels, cross-attention to the context tokens and a gated-GELU MLP (``a * gelu(g)``, 4x wide).

    The context ``[N, context_channels, h, w]`` becomes ``h * w`` tokens through a 1x1 convolution to
    ``inner_dim`` — one token per context pixel at the context's own resolution (the release feeds the
    full-resolution estimate to every block: at 32x32 that is 1024 keys for each query).
    With ``proj_out`` zero the block is the identity at initialisation.
    """

    def __init__(self, channels: int, context_channels: int, num_heads: int, inner_dim: int,
                 num_groups: int = 32):
        super().__init__()
        groups = min(num_groups, channels)
        while channels % groups:
            groups -= 1
        self.context_channels = context_channels
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner_dim, 1)
        self.proj_context = nn.Conv2d(context_channels, inner_dim, 1)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(inner_dim) for _ in range(3))
        self.attn1 = Attention(inner_dim, num_heads)
        self.attn2 = Attention(inner_dim, num_heads)
        self.ff_in = nn.Linear(inner_dim, 2 * 4 * inner_dim)
        self.ff_out = nn.Linear(4 * inner_dim, inner_dim)
        self.proj_out = nn.Conv2d(inner_dim, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        context = check_context(context, x, self.context_channels)
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # [N, HW, D]
        tokens = self.proj_context(context).flatten(2).transpose(1, 2)  # [N, hw, D]
        y = self.norm1(h)
        h = h + self.attn1(y, y)
        h = h + self.attn2(self.norm2(h), tokens)
        a, gate = self.ff_in(self.norm3(h)).chunk(2, dim=-1)
        h = h + self.ff_out(a * F.gelu(gate))
        return x + self.proj_out(h.transpose(1, 2).reshape(n, -1, height, width))


class ConcatContext(nn.Module):
    """Any backbone conditioned by channel concatenation: ``net(cat(x, context), ...)``, ``net`` built with
    ``in_channels + context_channels`` inputs (``context_mode="concat"``; the cheap alternative to
    cross-attention, one wider first convolution)."""

    def __init__(self, net: nn.Module, context_channels: int):
        super().__init__()
        self.net = net
        self.context_channels = context_channels

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        context = check_context(context, x, self.context_channels)
        if context.shape[2:] != x.shape[2:]:
            raise UserError(f"context_mode concat needs the context at the image size {list(x.shape[2:])}, "
                            f"got {list(context.shape[2:])}")
        return self.net(torch.cat([x, context], dim=1), noise_labels, class_labels, augment_labels)
