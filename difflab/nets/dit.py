"""DiT: the Diffusion Transformer of Peebles & Xie 2023, "Scalable Diffusion Models with Transformers".

The image is cut into ``patch_size x patch_size`` patches, each linearly embedded to a token of
``hidden_size`` channels (a conv with kernel = stride = patch size), plus a fixed 2-D sin-cos
positional embedding. ``depth`` DiT blocks with adaLN-Zero conditioning follow, then a final adaLN
layer and a linear map back to ``patch_size^2 * out_channels`` values per token, which
:func:`unpatchify` lays out as the image.

Conditioning vector ``c = MLP(freq(noise)) + W_y one_hot (+ W_aug aug)``: a 256-channel sinusoidal
frequency embedding of the noise label (``max_period`` 10000, as DiT; the same embedding EDM's ADM
uses, so it serves ``ln(sigma)/4`` as well as DDPM's ``t`` in 0..999) through a 2-layer SiLU MLP.
Each block regresses ``(shift, scale, gate)`` for attention and for the MLP from ``SiLU(c)``;
those regressions are zero-initialised, so every block is the identity at init (adaLN-Zero), and the
final linear is zero too, so the network outputs exactly 0 at init.

Deviations from the DiT code, inert for training from scratch: class ``-1`` (or dropped by
``label_dropout``) is a zero one-hot, hence a zero class embedding, where DiT learns an extra
"null" row; the positional embedding is a buffer, not a frozen parameter. Parameter counts are
therefore DiT's minus ``hidden_size`` (the null row) minus ``tokens * hidden_size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import UserError
from difflab.nets.layers import PositionalEmbedding, conditioning_inputs

# Paper Table 1: name -> (hidden_size, depth, num_heads) and the reported parameter count (millions,
# at 32x32x4 latents, patch 2, 1000 classes, learned sigma).
DIT_CONFIGS: dict[str, tuple[int, int, int]] = {
    "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16),
}
DIT_PAPER_PARAMS_M: dict[str, float] = {"s": 33.0, "b": 130.0, "l": 458.0, "xl": 675.0}


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[N, C, H, W] -> [N, T, p*p*C]``: token ``i*(W/p) + j`` holds patch ``(i, j)`` with its
    values ordered (row in patch, column in patch, channel), the layout :func:`unpatchify` reads."""
    n, c, h, w = x.shape
    p = patch_size
    x = x.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int, grid_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square ``grid_size x grid_size`` token grid."""
    n, p, g = tokens.shape[0], patch_size, grid_size
    x = tokens.reshape(n, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, channels, g * p, g * p)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding ``[grid_size^2, embed_dim]`` (MAE/DiT convention).

    Token ``i*grid_size + j`` (row ``i``, column ``j``): the first half of the channels is the 1-D
    embedding ``[sin(j w_k), cos(j w_k)]`` of the column, the second half that of the row, with
    ``w_k = 10000^(-k/(embed_dim/4))``, ``k = 0..embed_dim/4 - 1``.
    """
    axis = PositionalEmbedding(embed_dim // 2, max_positions=10000, endpoint=False, sin_first=True)
    pos = torch.arange(grid_size, dtype=torch.float32)
    rows, cols = pos.repeat_interleave(grid_size), pos.repeat(grid_size)
    return torch.cat([axis(cols), axis(rows)], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x (1 + scale) + shift``, per example and channel (``shift, scale``: ``[N, 1, C]``)."""
    return torch.addcmul(shift, x, 1 + scale)


def _layer_norm(hidden_size: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: ``x += gate_msa * Attn(adaLN(x))``, then
    ``x += gate_mlp * MLP(adaLN(x))``; the six modulation vectors come from ``SiLU(c)``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm1 = _layer_norm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = _layer_norm(hidden_size)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)
        self.modulation = nn.Linear(hidden_size, 6 * hidden_size)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over the tokens of ``x`` ``[N, T, C]``."""
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # [N, heads, T, c/heads]
        a = self.proj(a.transpose(1, 2).reshape(n, t, c))
        return F.dropout(a, p=self.dropout, training=self.training)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x), approximate="tanh")
        return self.fc2(F.dropout(h, p=self.dropout, training=self.training))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``c`` is the already activated conditioning ``SiLU(c)`` ``[N, C]``."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.modulation(c).unsqueeze(1).chunk(6, dim=2)
        x = x + gate_msa * self.attention(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """``Linear(adaLN(x))`` to ``patch_size^2 * out_channels`` values per token; adaLN gives
    ``(shift, scale)`` from ``SiLU(c)``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = _layer_norm(hidden_size)
        self.modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).unsqueeze(1).chunk(2, dim=2)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer. Call ``net(x, noise_labels, class_labels=None, augment_labels=None,
    context=None)`` (see :func:`difflab.nets.layers.conditioning_inputs`); returns
    ``[N, out_channels, H, W]``. ``context`` is ignored.

    Sizes: ``hidden_size`` (token width, divisible by 4 and by ``num_heads``), ``depth`` (blocks),
    ``num_heads``, ``mlp_ratio`` (MLP width / ``hidden_size``), ``patch_size`` (must divide
    ``img_resolution``; tokens = ``(img_resolution / patch_size)^2``), ``frequency_embedding_size``
    (channels of the sinusoidal noise embedding). ``dropout`` acts on the MLP hidden layer and the
    attention output (0 in the paper).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        label_dropout: float = 0.0,
        frequency_embedding_size: int = 256,
    ):
        super().__init__()
        if patch_size < 1 or img_resolution % patch_size:
            raise UserError(f"img_resolution {img_resolution} is not divisible by patch_size {patch_size}; "
                            "choose a patch_size that divides the image size")
        if hidden_size % 4:
            raise UserError(f"hidden_size {hidden_size} must be divisible by 4 (2-D sin-cos position embedding)")
        if num_heads < 1 or hidden_size % num_heads:
            raise UserError(f"hidden_size {hidden_size} does not split into num_heads {num_heads} heads")
        if depth < 1:
            raise UserError(f"depth must be >= 1, got {depth}")
        if not 0 <= label_dropout <= 1:
            raise UserError(f"label_dropout must be in [0, 1], got {label_dropout}")
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        self.patch_size = patch_size
        self.grid_size = img_resolution // patch_size

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        # Persistent, so a network built on the meta device gets it back from a state dict.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid_size)[None])
        self.map_noise = PositionalEmbedding(frequency_embedding_size, max_positions=10000, endpoint=False)
        self.map_layer0 = nn.Linear(frequency_embedding_size, hidden_size)
        self.map_layer1 = nn.Linear(hidden_size, hidden_size)
        self.map_label = nn.Linear(label_dim, hidden_size, bias=False) if label_dim else None
        self.map_augment = nn.Linear(augment_dim, hidden_size, bias=False) if augment_dim else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth)])
        self.final = FinalLayer(hidden_size, patch_size, out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's init: Xavier-uniform linears (and patch embedding, as a linear map) with zero bias,
        N(0, 0.02^2) noise-MLP and class-embedding weights, zero adaLN regressions and final linear."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in (self.map_layer0, self.map_layer1, self.map_label):
            if m is not None:
                nn.init.normal_(m.weight, std=0.02)
        for m in [b.modulation for b in self.blocks] + [self.final.modulation, self.final.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if tuple(x.shape[1:]) != expected:
            raise UserError(f"DiT input has shape {list(x.shape[1:])}, expected {list(expected)} "
                            "(img_resolution and in_channels are fixed when the network is built)")
        noise, one_hot, augment = conditioning_inputs(
            x, noise_labels, class_labels, augment_labels, self.label_dim, self.augment_dim,
            self.label_dropout, self.training,
        )
        c = self.map_layer1(F.silu(self.map_layer0(self.map_noise(noise))))
        if self.map_label is not None:
            c = c + self.map_label(one_hot)
        if self.map_augment is not None:
            c = c + self.map_augment(augment)
        c = F.silu(c)

        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            h = block(h, c)
        return unpatchify(self.final(h, c), self.patch_size, self.out_channels, self.grid_size)
