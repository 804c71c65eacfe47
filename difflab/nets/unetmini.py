"""UNetMini: the attention-free small U-Net for MNIST-size data (28/32 px; specs/gaussian_and_dddm.md §2.4
"test-scale config"). It is the DDPM U-Net (:mod:`difflab.nets.ddpm_unet`) with no self-attention
anywhere (also none in the middle block) and small defaults, so the two share every layer.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from difflab.nets.ddpm_unet import DDPMUNet, ResBlock


class UNetMini(DDPMUNet):
    """Attention-free U-Net: ch 64, mult (1,2,2), 2 res blocks per level, GroupNorm(8), SiLU, sinusoidal
    time embedding of size ``time_emb_dim`` (default 4 x ``model_channels``). Same call signature and
    conditioning options (``label_dim``, ``label_dropout``, ``augment_dim``) as :class:`DDPMUNet`."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 64, channel_mult: Sequence[int] = (1, 2, 2),
                 num_res_blocks: int = 2, dropout: float = 0.0, num_groups: int = 8,
                 label_dropout: float = 0.0, time_emb_dim: int | None = None,
                 resample_with_conv: bool = True):
        super().__init__(img_resolution, in_channels, out_channels, label_dim=label_dim,
                         augment_dim=augment_dim, model_channels=model_channels, channel_mult=channel_mult,
                         num_res_blocks=num_res_blocks, attn_resolutions=(), dropout=dropout,
                         num_groups=num_groups, label_dropout=label_dropout, time_emb_dim=time_emb_dim,
                         resample_with_conv=resample_with_conv)
        ch = model_channels * channel_mult[-1]
        emb_dim = self.time_mlp[-1].out_features
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout, num_groups),
                                  ResBlock(ch, ch, emb_dim, dropout, num_groups)])
