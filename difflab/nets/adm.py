"""DhariwalUNet: the ADM backbone of "Diffusion Models Beat GANs" in EDM's unified form
(specs/gaussian_and_dddm.md §5.5; EDM uses it for ImageNet-64).

Differences from :class:`~difflab.nets.songunet.SongUNet`: adaptive group-norm conditioning
(``GN(h) (1 + scale) + shift``), 64 channels per attention head, attention in every decoder block
at the listed resolutions, skip scale 1, weightless (box) resampling on the skip path, Kaiming-uniform
init scaled by ``sqrt(1/3)`` and residual-branch/output convolutions initialised at exactly zero,
positional embedding ``[cos, sin]`` without endpoint, and the class embedding added after the
mapping network (weights ~ N(0, 1), one-hot not rescaled).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difflab.nets.context import SpatialTransformer, check_context
from difflab.nets.layers import (
    Conv2d,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    build_unet_levels,
    check_unet_config,
    conditioning_inputs,
)


class DhariwalUNet(nn.Module):
    """ADM U-Net. Call ``net(x, noise_labels, class_labels=None, augment_labels=None, context=None)``
    (see :func:`difflab.nets.layers.conditioning_inputs`); returns ``[N, out_channels, H, W]``.

    Embedding: ``e = SiLU(W1 SiLU(W0 (pos(noise) + W_aug aug)) + W_label one_hot)``.
    ``context`` is ignored unless ``context_channels > 0``: then every block with attention (at
    ``attn_resolutions`` and the first middle block) loses its self-attention and is followed by a
    cross-attention :class:`~difflab.nets.context.SpatialTransformer` with ``context_heads`` heads and inner
    dim ``model_channels * channel_mult_emb`` (DDDM, specs/gaussian_and_dddm.md §6.3).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        context_channels: int = 0,
        context_heads: int = 4,
    ):
        super().__init__()
        check_unet_config(img_resolution, channel_mult, num_blocks, label_dropout)
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        self.context_channels = context_channels

        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0.0, init_bias=0.0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
                            init=init, init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, **init_zero)
                            if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        first_channels = model_channels * channel_mult[0]
        self.enc_in = Conv2d(in_channels, first_channels, 3, **init)
        self.enc, self.dec = build_unet_levels(
            img_resolution, first_channels, model_channels, channel_mult, num_blocks, attn_resolutions,
            decoder_attn_last_only=False, block_kwargs=block_kwargs,
            attention_factory=(lambda ch: SpatialTransformer(ch, context_channels, context_heads, emb_channels))
            if context_channels else None,
        )
        self.out_norm = GroupNorm(first_channels)
        self.out_conv = Conv2d(first_channels, out_channels, 3, **init_zero)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        noise, one_hot, augment = conditioning_inputs(
            x, noise_labels, class_labels, augment_labels, self.label_dim, self.augment_dim,
            self.label_dropout, self.training,
        )
        emb = self.map_noise(noise)
        if self.map_augment is not None:
            emb = emb + self.map_augment(augment)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(one_hot)
        emb = F.silu(emb)

        if self.context_channels:
            context = check_context(context, x, self.context_channels)
        else:
            context = None
        x = self.enc_in(x)
        skips = [x]
        for stage in self.enc:
            if stage.down is not None:
                x = stage.down(x, emb)
                skips.append(x)
            x = stage(x, emb, skips, context)
        for stage in self.dec:
            x = stage(x, emb, skips, context)
        return self.out_conv(F.silu(self.out_norm(x)))
