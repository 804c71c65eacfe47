"""The DDPM U-Net of Ho et al. 2020 (specs/gaussian_and_dddm.md §2.4): residual blocks with a timestep
embedding, self-attention at chosen resolutions, GroupNorm + SiLU, skip connections across levels.

Defaults are the CIFAR-10 configuration (ch 128, mult (1,2,2,2), 2 res blocks, attention at 16x16,
dropout 0.1): about 35.7M parameters at 32x32. Call signature (DESIGN.md):
``net(x, noise_labels, class_labels=None, augment_labels=None, context=None)``; class labels are indices
with -1 = null label (zero one-hot), so label dropout trains the unconditional model used by
classifier-free guidance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difflab.nets.context import SpatialTransformer


def timestep_embedding(noise_labels: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[sin(t f_k), cos(t f_k)]`` with ``f_k = max_period^(-k/(dim/2 - 1))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=noise_labels.device) / max(half - 1, 1))
    args = noise_labels.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return F.pad(emb, (0, dim % 2))


def check_labels(class_labels: torch.Tensor, label_dim: int) -> torch.Tensor:
    labels = class_labels.to(torch.long)
    if labels.ndim != 1 or (labels >= label_dim).any() or (labels < -1).any():
        raise ValueError(f"class_labels must be indices in [-1, {label_dim - 1}] of shape [N]")
    return labels


def one_hot_labels(class_labels: torch.Tensor, label_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Index labels ``[N]`` -> one-hot ``[N, label_dim]``; -1 (null label) -> all zeros."""
    labels = check_labels(class_labels, label_dim)
    y = F.one_hot(labels.clamp(min=0), label_dim).to(dtype)
    return y * (labels >= 0).to(dtype)[:, None]


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(num_groups, in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(min(num_groups, out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch: int, num_groups: int, num_heads: int = 1):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"attention channels {ch} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(min(num_groups, ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        N, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(N, 3, self.num_heads, C // self.num_heads, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(h.transpose(-1, -2).reshape(N, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if with_conv else nn.AvgPool2d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.op(x)


class DDPMUNet(nn.Module):
    """Ho et al.'s U-Net with every size configurable (§2.4).

    Args: ``model_channels`` (base channels), ``channel_mult`` (per level), ``num_res_blocks`` (per level),
    ``attn_resolutions`` (feature-map sizes with self-attention), ``dropout``, ``num_groups`` (GroupNorm),
    ``label_dim`` (classes; 0 = unconditional), ``label_dropout`` (train-time probability of replacing a
    label by the null label, for classifier-free guidance), ``augment_dim`` (augmentation-label size).
    Odd feature sizes (28 -> 14 -> 7 -> 4) are handled by upsampling to the skip's size (``difflab train``
    itself needs a power-of-two image side: 28 px data trains with ``--pad-to 32``).
    ``context_channels > 0`` makes every attention block a cross-attention :class:`SpatialTransformer`
    (DDDM, specs/gaussian_and_dddm.md §6.3) with ``context_heads`` heads and inner dim ``time_emb_dim``
    (4 x ``model_channels``, as the release), attending to the ``context`` of each call.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 num_groups: int = 32, num_heads: int = 1, label_dropout: float = 0.0,
                 time_emb_dim: int | None = None, resample_with_conv: bool = True, context_channels: int = 0,
                 context_heads: int = 4):
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.augment_dim, self.label_dropout = label_dim, augment_dim, label_dropout
        self.model_channels = model_channels
        emb_dim = time_emb_dim or 4 * model_channels
        self.context_channels = context_channels

        def attention(ch: int) -> nn.Module:
            if context_channels:
                return SpatialTransformer(ch, context_channels, context_heads, emb_dim, num_groups)
            return AttnBlock(ch, num_groups, num_heads)
        self.time_mlp = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.label_proj = nn.Linear(label_dim, emb_dim, bias=False) if label_dim else None
        self.augment_proj = nn.Linear(augment_dim, emb_dim, bias=False) if augment_dim else None

        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs = [model_channels]
        ch, res = model_channels, img_resolution
        level_res = []  # feature-map size of each level; the decoder mirrors it (28 -> 14 -> 7 -> 4 and back)
        for level, mult in enumerate(channel_mult):
            level_res.append(res)
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, model_channels * mult, emb_dim, dropout, num_groups)]
                ch = model_channels * mult
                if res in attn_resolutions:
                    blocks.append(attention(ch))
                self.down.append(nn.ModuleList(blocks))
                skip_chs.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch, resample_with_conv)]))
                skip_chs.append(ch)
                res = (res + 1) // 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout, num_groups), attention(ch),
                                  ResBlock(ch, ch, emb_dim, dropout, num_groups)])
        self.up = nn.ModuleList()
        self.upsample_after = []  # up-block indices followed by a 2x upsampling
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = level_res[level]
            for _ in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skip_chs.pop(), model_channels * mult, emb_dim, dropout, num_groups)]
                ch = model_channels * mult
                if res in attn_resolutions:
                    blocks.append(attention(ch))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.upsample_after.append(len(self.up) - 1)
        self.upsample_convs = nn.ModuleList(
            [nn.Conv2d(ch_, ch_, 3, padding=1) if resample_with_conv else nn.Identity()
             for ch_ in [model_channels * m for m in reversed(channel_mult[1:])]])
        self.norm_out = nn.GroupNorm(min(num_groups, ch), ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def embedding(self, noise_labels: torch.Tensor, n: int, class_labels: torch.Tensor | None,
                  augment_labels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        noise_labels = torch.as_tensor(noise_labels).reshape(-1)
        if noise_labels.numel() == 1:
            noise_labels = noise_labels.expand(n)
        emb = self.time_mlp(timestep_embedding(noise_labels, self.model_channels).to(dtype))
        if self.label_proj is not None and class_labels is not None:
            labels = check_labels(class_labels.to(emb.device), self.label_dim)
            if self.training and self.label_dropout > 0:
                drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
                labels = torch.where(drop, torch.full_like(labels, -1), labels)
            emb = emb + self.label_proj(one_hot_labels(labels, self.label_dim, dtype))
        if self.augment_proj is not None and augment_labels is not None:
            emb = emb + self.augment_proj(augment_labels.to(dtype))
        return emb

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, context: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``context`` feeds the cross-attention blocks; it is ignored when ``context_channels`` is 0."""
        emb = self.embedding(noise_labels, x.shape[0], class_labels, augment_labels, x.dtype)

        def run(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
            return block(h, context) if isinstance(block, SpatialTransformer) else block(h, emb)

        h = self.conv_in(x)
        skips = [h]
        for blocks in self.down:
            for block in blocks:
                h = run(block, h)
            skips.append(h)
        for block in self.mid:
            h = run(block, h)
        ups = iter(self.upsample_convs)
        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = run(block, h)
            if i in self.upsample_after:
                h = next(ups)(F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
