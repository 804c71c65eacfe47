"""SongUNet: the DDPM++ and NCSN++ backbones of score SDE, in EDM's unified form
(specs/gaussian_and_dddm.md §5.5 for the EDM settings, §4.4 for the score-SDE configs).

DDPM++ = positional noise embedding, ``encoder_type="standard"``, ``resample_filter=[1,1]``;
NCSN++ = Fourier noise embedding (scale 16, ``channel_mult_noise=2``), ``encoder_type="residual"``
(progressive input), ``resample_filter=[1,3,3,1]``. Both: GroupNorm, SiLU, BigGAN-style residual
blocks with resampling inside, skip scale ``sqrt(1/2)``, one attention head, Xavier-uniform init,
residual-branch and output convolutions initialised at ``1e-5`` of that.

The presets ``ncsnpp-sde[-deep]`` / ``ddpmpp-sde[-deep]`` are score SDE's own CIFAR-10 configs, which this
class expresses exactly; docs/networks.md "score-SDE NCSN++ / DDPM++" compares them element by element.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import UserError
from difflab.nets.layers import (
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    build_unet_levels,
    check_unet_config,
    conditioning_inputs,
)

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


def _choice(option: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise UserError(f"{option}={value!r} is not valid; choose one of {', '.join(valid)}")


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net. Call ``net(x, noise_labels, class_labels=None, augment_labels=None,
    context=None)`` (see :func:`difflab.nets.layers.conditioning_inputs`); returns
    ``[N, out_channels, H, W]``.

    Embedding: ``e = embed(noise) + W_label (sqrt(label_dim) one_hot) + W_aug aug``, then two
    Linear+SiLU layers to ``model_channels * channel_mult_emb`` channels, fed to every block.
    ``encoder_type``: "standard" (plain), "skip" (the downsampled input image is added to each level
    through a 1x1 conv), "residual" (a progressive-input branch, strided 3x3 conv, averaged into each
    level with ``1/sqrt 2``). ``decoder_type``: "standard" (one output head at full resolution) or
    "skip" (an output head per level, upsampled and summed). ``context`` is ignored.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
        fourier_scale: float = 16.0,
    ):
        super().__init__()
        _choice("embedding_type", embedding_type, EMBEDDING_TYPES)
        _choice("encoder_type", encoder_type, ENCODER_TYPES)
        _choice("decoder_type", decoder_type, DECODER_TYPES)
        check_unet_config(img_resolution, channel_mult, num_blocks, label_dropout)
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        self.encoder_type = encoder_type
        self.decoder_type = decoder_type

        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Mapping network: noise level (+ class, + augmentation) -> embedding.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True, sin_first=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels, scale=fourier_scale, sin_first=True)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # U-Net body; the first conv maps the image to model_channels (not times channel_mult[0]).
        self.enc_in = Conv2d(in_channels, model_channels, 3, **init)
        self.enc, self.dec = build_unet_levels(
            img_resolution, model_channels, model_channels, channel_mult, num_blocks, attn_resolutions,
            decoder_attn_last_only=True, block_kwargs=block_kwargs,
        )

        # Encoder side paths from the input image, one per level below the top.
        self.enc_aux = nn.ModuleList()
        caux = in_channels
        for level in range(1, len(channel_mult)):
            # x after level l's down block still has the channels of level l-1.
            cout = model_channels * channel_mult[level - 1]
            if encoder_type == "skip":
                self.enc_aux.append(nn.ModuleDict(dict(
                    down=Conv2d(caux, caux, 0, down=True, resample_filter=resample_filter),
                    skip=Conv2d(caux, cout, 1, **init),
                )))
            elif encoder_type == "residual":
                self.enc_aux.append(Conv2d(caux, cout, 3, down=True, resample_filter=resample_filter,
                                           fused_resample=True, **init))
                caux = cout

        # Decoder output heads: at full resolution ("standard") or at every level ("skip").
        self.dec_aux = nn.ModuleList()
        levels = len(channel_mult)
        for level in reversed(range(levels)):
            if decoder_type == "skip" or level == 0:
                cout = model_channels * channel_mult[level]
                self.dec_aux.append(nn.ModuleDict(dict(
                    norm=GroupNorm(cout, eps=1e-6),
                    conv=Conv2d(cout, out_channels, 3, **init_zero),
                )))
        self.aux_up = None
        if decoder_type == "skip" and levels > 1:
            self.aux_up = Conv2d(out_channels, out_channels, 0, up=True, resample_filter=resample_filter)

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
        if self.map_label is not None:
            emb = emb + self.map_label(one_hot * math.sqrt(self.label_dim))
        if self.map_augment is not None:
            emb = emb + self.map_augment(augment)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        # Encoder.
        aux = x
        x = self.enc_in(x)
        skips = [x]
        for level, stage in enumerate(self.enc):
            if stage.down is not None:
                x = stage.down(x, emb)
                if self.encoder_type == "skip":
                    side = self.enc_aux[level - 1]
                    aux = side["down"](aux)
                    x = x + side["skip"](aux)
                elif self.encoder_type == "residual":
                    x = aux = (x + self.enc_aux[level - 1](aux)) / math.sqrt(2)
                skips.append(x)
            x = stage(x, emb, skips)

        # Decoder.
        out = None
        heads = iter(self.dec_aux)
        levels = len(self.dec)
        for i, stage in enumerate(self.dec):
            level = levels - 1 - i
            x = stage(x, emb, skips)
            if self.decoder_type == "skip" or level == 0:
                head = next(heads)
                y = head["conv"](F.silu(head["norm"](x)))
                out = y if out is None else y + self.aux_up(out)
        return out
