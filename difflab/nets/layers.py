"""Shared building blocks of the U-Net backbones (specs/gaussian_and_dddm.md §5.5, §4.4).

The layers are the union of what DDPM++, NCSN++ and ADM need:

* :class:`Linear` and :class:`Conv2d` with an explicit initialisation rule (``init_mode`` scaled by
  ``init_weight`` / ``init_bias``), so each architecture states its init as data;
* up/down-sampling by a separable FIR filter (``[1,1]`` = box, ``[1,3,3,1]`` = the NCSN++ filter);
* :class:`GroupNorm`, :class:`UNetBlock` (residual block, optional self-attention, additive or
  adaptive scale-shift conditioning on the embedding);
* :class:`PositionalEmbedding` and :class:`FourierEmbedding` for the noise level;
* :func:`conditioning_inputs`, the one place that turns the call arguments (noise labels, class
  indices, augmentation labels) into checked tensors.

Mixed precision is left to ``torch.autocast``: the layers use their parameters as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import UserError

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Draw an initial tensor from the global torch RNG.

    Uniform modes draw from U(-a, a) with ``a = sqrt(6/(fan_in+fan_out))`` (Xavier) or
    ``sqrt(3/fan_in)`` (Kaiming); normal modes use std ``sqrt(2/(fan_in+fan_out))`` or
    ``sqrt(1/fan_in)``. Kaiming here has unit gain (variance 1/fan_in), as in EDM.
    """
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise UserError(f"unknown init_mode {mode!r}; choose one of {', '.join(INIT_MODES)}")


class Linear(nn.Module):
    """Fully connected layer ``y = x W^T + b`` with an EDM-style init rule."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def resample_kernel(resample_filter: Sequence[float]) -> torch.Tensor:
    """The normalised 2-D filter ``f f^T / (sum f)^2`` as a ``[1, 1, k, k]`` tensor."""
    f = torch.as_tensor(resample_filter, dtype=torch.float32)
    if f.ndim != 1 or f.numel() < 2 or f.numel() % 2:
        raise UserError(f"resample_filter {list(resample_filter)} must be a 1-D list of even length >= 2")
    return (torch.outer(f, f) / f.sum().square())[None, None]


def is_box_filter(resample_filter: Sequence[float]) -> bool:
    """True for a two-tap filter with equal taps (``[1,1]``), which the fast paths below handle."""
    return len(resample_filter) == 2 and resample_filter[0] == resample_filter[1]


def downsample2d(x: torch.Tensor, kernel: torch.Tensor, pad: bool = True, box: bool = False) -> torch.Tensor:
    """Filter with ``kernel`` and keep every second pixel (H, W -> H/2, W/2).

    With ``pad`` the input is zero-padded by ``(k-2)/2`` so the output is exactly half the size.
    ``box`` declares that ``kernel`` is the ``[1,1]`` filter: that is average pooling, which is what
    we then run (same result, faster).
    """
    c = x.shape[1]
    if box:
        return F.avg_pool2d(x, 2)
    w = kernel.to(x.dtype).expand(c, 1, -1, -1)
    return F.conv2d(x, w, stride=2, padding=(kernel.shape[-1] - 2) // 2 if pad else 0, groups=c)


def upsample2d(x: torch.Tensor, kernel: torch.Tensor, box: bool = False) -> torch.Tensor:
    """Zero-insertion upsampling followed by ``4 * kernel`` (H, W -> 2H, 2W).

    ``box`` declares the ``[1,1]`` filter: that is nearest-neighbour upsampling, which we then run.
    """
    c = x.shape[1]
    if box:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    w = (kernel * 4).to(x.dtype).expand(c, 1, -1, -1)
    return F.conv_transpose2d(x, w, stride=2, padding=(kernel.shape[-1] - 2) // 2, groups=c)


class Conv2d(nn.Module):
    """2-D convolution (``kernel`` x ``kernel``, "same" padding) with optional 2x up/down-sampling.

    ``kernel=0`` gives a weightless resampler. Resampling runs before the convolution; with
    ``fused_resample`` a downsampling layer instead runs the convolution first, at full resolution
    with extra padding, and then the unpadded strided filter (NCSN++'s progressive-input path).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        if fused_resample and up:
            raise ValueError("fused_resample is implemented for downsampling only")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample and kernel > 0
        self.box = is_box_filter(list(resample_filter))
        area = kernel * kernel
        fans = dict(mode=init_mode, fan_in=in_channels * area, fan_out=out_channels * area)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(weight_init(shape, **fans) * init_weight) if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        # Persistent, so a network built on the meta device gets it back from a state dict.
        self.register_buffer("resample_filter", resample_kernel(resample_filter) if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b, f = self.weight, self.bias, self.resample_filter
        pad = w.shape[-1] // 2 if w is not None else 0
        if self.fused_resample and self.down:
            # conv over a border of (k_f - 2)/2 extra pixels, then the unpadded strided filter; the
            # bias commutes with the filter because the filter sums to one.
            x = F.conv2d(x, w, b, padding=pad + (f.shape[-1] - 2) // 2)
            return downsample2d(x, f, pad=False, box=self.box)
        if self.up:
            x = upsample2d(x, f, box=self.box)
        if self.down:
            x = downsample2d(x, f, box=self.box)
        if w is not None:
            x = F.conv2d(x, w, b, padding=pad)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with ``min(num_groups, C // min_channels_per_group)`` groups.

    If that count does not divide ``C`` the largest smaller divisor is used (EDM would fail there).
    """

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        while num_channels % groups:
            groups -= 1
        self.num_groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class UNetBlock(nn.Module):
    """Residual block ``GN -> SiLU -> conv3x3 -> (+emb) -> GN -> SiLU -> dropout -> conv3x3``, plus skip,
    times ``skip_scale``; then optional self-attention, also residual and scaled (§5.5).

    The embedding enters through ``affine``: additively after ``conv0`` (DDPM++/NCSN++), or, with
    ``adaptive_scale``, as ``GN(h) * (1 + scale) + shift`` (ADM). The skip path is a 1x1 conv when
    the channel count changes or ``resample_proj`` is set for a resampling block, a weightless
    resampler for a resampling block otherwise, and the identity else.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        resample_filter: Sequence[float] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: dict[str, Any] | None = None,
        init_zero: dict[str, Any] | None = None,
        init_attn: dict[str, Any] | None = None,
    ):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0.0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        if not attention:
            self.num_heads = 0
        elif num_heads is not None:
            self.num_heads = num_heads
        else:  # at least one head, so narrow test configurations still exercise attention
            self.num_heads = max(1, out_channels // channels_per_head)
        if self.num_heads and out_channels % self.num_heads:
            raise UserError(f"attention: {out_channels} channels do not split into {self.num_heads} heads")

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter,
                            **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # In-place updates only touch fresh conv/add outputs that autograd does not keep, which saves
        # allocations (noticeable on CPU) without changing a single value.
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x.add_(params)))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = self._scale(x.add_(self.skip(orig) if self.skip is not None else orig))
        if self.num_heads:
            x = self._scale(self.proj(self_attention(self.qkv(self.norm2(x)), self.num_heads)).add_(x))
        return x

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.skip_scale) if self.skip_scale != 1 else x


def self_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head dot-product attention over pixels: ``softmax(q^T k / sqrt(c)) v`` per head.

    ``qkv`` is ``[N, 3C, H, W]`` laid out as (q, k, v) x heads x channels-per-head; returns ``[N, C, H, W]``.
    Runs :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels where available).
    """
    n, c3, h, w = qkv.shape
    c = c3 // 3
    q, k, v = qkv.reshape(n, 3, num_heads, c // num_heads, h * w).transpose(-1, -2).unbind(1)
    a = F.scaled_dot_product_attention(q, k, v)  # [N, heads, HW, c/heads]
    return a.transpose(-1, -2).reshape(n, c, h, w)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar: frequencies ``(1/max_positions)^(i/(C/2 - endpoint))``,
    ``i = 0..C/2-1``; output ``[cos, sin]`` halves (``[sin, cos]`` with ``sin_first``, as DDPM++ uses).

    ``endpoint=True`` makes the last frequency exactly ``1/max_positions`` (DDPM++); ADM uses False.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False,
                 sin_first: bool = False):
        super().__init__()
        if num_channels % 2 or num_channels < 2 + 2 * endpoint:
            raise UserError(f"PositionalEmbedding needs an even number of channels >= 4, got {num_channels}")
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint
        self.sin_first = sin_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(self.endpoint))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x.to(torch.float32), freqs)
        return torch.cat([x.sin(), x.cos()] if self.sin_first else [x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features ``[cos(2 pi f x), sin(2 pi f x)]`` with ``f ~ N(0, scale^2)`` drawn once
    at construction (global RNG) and stored as a buffer (NCSN++, scale 16; §4.4)."""

    def __init__(self, num_channels: int, scale: float = 16.0, sin_first: bool = False):
        super().__init__()
        if num_channels % 2:
            raise UserError(f"FourierEmbedding needs an even number of channels, got {num_channels}")
        self.sin_first = sin_first
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x.to(torch.float32), 2 * math.pi * self.freqs.to(torch.float32))
        return torch.cat([x.sin(), x.cos()] if self.sin_first else [x.cos(), x.sin()], dim=1)


def conditioning_inputs(
    x: torch.Tensor,
    noise_labels: torch.Tensor | float,
    class_labels: torch.Tensor | None,
    augment_labels: torch.Tensor | None,
    label_dim: int,
    augment_dim: int,
    label_dropout: float,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Check and convert the conditioning arguments of a backbone call (the one call signature).

    Returns ``(noise [N] float32, one_hot [N, label_dim] or None, augment [N, augment_dim] or None)``.

    * ``noise_labels``: a scalar or anything with N elements.
    * ``class_labels``: a LongTensor ``[N]`` of indices, ``-1`` = null label (zero one-hot, the
      unconditional branch for classifier-free guidance), or ``None`` = all null; a float
      ``[N, label_dim]`` tensor is taken as an already one-hot (or soft) label. On an unconditional
      net (``label_dim = 0``) only null labels are accepted.
    * label dropout: in training mode each one-hot is zeroed with probability ``label_dropout``,
      drawn from the global torch RNG of ``x.device``.
    * ``augment_labels``: ``[N, augment_dim]``; ``None`` means "not augmented" (zeros); ignored when
      ``augment_dim = 0``.
    """
    n = x.shape[0]
    noise = torch.as_tensor(noise_labels, device=x.device).to(torch.float32).reshape(-1)
    if noise.numel() == 1:
        noise = noise.expand(n)
    elif noise.numel() != n:
        raise UserError(f"noise_labels has {noise.numel()} elements; the batch has {n} images")

    one_hot = None
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels, device=x.device)
        if class_labels.is_floating_point():
            if label_dim == 0:
                raise UserError("class_labels given to an unconditional network (label_dim=0); pass None")
            if tuple(class_labels.shape) != (n, label_dim):
                raise UserError(f"float class_labels must have shape [{n}, {label_dim}], "
                                f"got {list(class_labels.shape)}")
            one_hot = class_labels.to(torch.float32)
        else:
            class_labels = class_labels.reshape(-1)
            if class_labels.numel() != n:
                raise UserError(f"class_labels has {class_labels.numel()} entries; the batch has {n} images")
            lo, hi = int(class_labels.min()), int(class_labels.max())
            if label_dim == 0 and hi >= 0:
                raise UserError("class_labels given to an unconditional network (label_dim=0); "
                                "train with labels (label_dim > 0) or pass None / -1")
            if lo < -1 or hi >= label_dim:
                raise UserError(f"class label out of range [{lo}, {hi}]: valid are 0..{label_dim - 1} "
                                "and -1 for the null label")
            if label_dim:
                one_hot = F.one_hot(class_labels.clamp(min=0), label_dim).to(torch.float32)
                one_hot = one_hot * (class_labels >= 0)[:, None]
    if label_dim and one_hot is None:
        one_hot = torch.zeros(n, label_dim, device=x.device)
    if label_dim and training and label_dropout:
        one_hot = one_hot * (torch.rand(n, 1, device=x.device) >= label_dropout)

    augment = None
    if augment_dim:
        if augment_labels is None:
            augment = torch.zeros(n, augment_dim, device=x.device)
        else:
            augment = torch.as_tensor(augment_labels, device=x.device).to(torch.float32)
            if tuple(augment.shape) != (n, augment_dim):
                raise UserError(f"augment_labels must have shape [{n}, {augment_dim}], "
                                f"got {list(augment.shape)}")
    return noise, one_hot, augment


def check_unet_config(img_resolution: int, channel_mult: Sequence[int], num_blocks: int,
                      label_dropout: float) -> None:
    """Fail early, with one line, on a U-Net configuration that cannot be built."""
    levels = len(channel_mult)
    if levels < 1 or any(int(m) < 1 for m in channel_mult):
        raise UserError(f"channel_mult {list(channel_mult)} must be a non-empty list of positive integers")
    if img_resolution % (1 << (levels - 1)):
        raise UserError(f"img_resolution {img_resolution} is not divisible by 2^{levels - 1} "
                        f"(channel_mult has {levels} levels)")
    if num_blocks < 1:
        raise UserError(f"num_blocks must be >= 1, got {num_blocks}")
    if not 0 <= label_dropout <= 1:
        raise UserError(f"label_dropout must be in [0, 1], got {label_dropout}")


class ContextBlock(nn.Module):
    """A block without self-attention followed by an attention module that takes the call's ``context``
    (a cross-attention :class:`~difflab.nets.context.SpatialTransformer`, DDDM §6.3)."""

    def __init__(self, block: nn.Module, attention: nn.Module):
        super().__init__()
        self.block = block
        self.attention = attention

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.attention(self.block(x, emb), context)


def _run_block(block: nn.Module, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    return block(x, emb, context) if isinstance(block, ContextBlock) else block(x, emb)


class EncoderLevel(nn.Module):
    """One resolution of the encoder: a downsampling block ``down`` (None at the top level; the
    caller runs it, so side paths can join after it) and ``blocks``."""

    def __init__(self, down: nn.Module | None, blocks: list[nn.Module]):
        super().__init__()
        self.down = down
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor],
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``blocks``, appending each output to ``skips``."""
        for block in self.blocks:
            x = _run_block(block, x, emb, context)
            skips.append(x)
        return x


class DecoderLevel(nn.Module):
    """One resolution of the decoder: ``head`` (two middle blocks at the bottom level, one
    upsampling block elsewhere) then ``blocks``, each fed ``cat(x, skip)``."""

    def __init__(self, head: list[nn.Module], blocks: list[nn.Module]):
        super().__init__()
        self.head = nn.ModuleList(head)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor],
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``head`` then ``blocks``, each block consuming the last entry of ``skips``."""
        for block in self.head:
            x = _run_block(block, x, emb, context)
        for block in self.blocks:
            x = _run_block(block, torch.cat([x, skips.pop()], dim=1), emb, context)
        return x


def build_unet_levels(
    img_resolution: int,
    first_channels: int,
    model_channels: int,
    channel_mult: Sequence[int],
    num_blocks: int,
    attn_resolutions: Sequence[int],
    decoder_attn_last_only: bool,
    block_kwargs: dict[str, Any],
    attention_factory: Callable[[int], nn.Module] | None = None,
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The encoder/decoder skeleton shared by SongUNet and DhariwalUNet (§5.5).

    Encoder level ``l`` (resolution ``img_resolution / 2^l``): a downsampling block (``l > 0``), then
    ``num_blocks`` blocks to ``model_channels * channel_mult[l]`` channels, with attention where the
    resolution is in ``attn_resolutions``. Every encoder output (the input conv, each down block,
    each block) is kept as a skip. Decoder, from the bottom: two middle blocks (the first with
    attention) at the lowest resolution, an upsampling block elsewhere, then ``num_blocks + 1``
    blocks each consuming one skip; attention at listed resolutions, only in the last block of a
    level if ``decoder_attn_last_only`` (DDPM++/NCSN++) or in all of them (ADM).
    With ``attention_factory`` each block that would have self-attention is built without it and followed
    by ``attention_factory(channels)`` (a :class:`ContextBlock`; DDDM's cross-attention).
    """

    def unet_block(cin: int, cout: int, attention: bool = False, **kw: Any) -> nn.Module:
        if attention and attention_factory is not None:
            return ContextBlock(UNetBlock(cin, cout, **kw, **block_kwargs), attention_factory(cout))
        return UNetBlock(cin, cout, attention=attention, **kw, **block_kwargs)

    enc, skips = nn.ModuleList(), [first_channels]
    cout = first_channels
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        down = None
        if level > 0:
            down = unet_block(cout, cout, down=True)
            skips.append(cout)
        blocks = []
        for _ in range(num_blocks):
            cin, cout = cout, model_channels * mult
            blocks.append(unet_block(cin, cout, attention=res in attn_resolutions))
            skips.append(cout)
        enc.append(EncoderLevel(down, blocks))

    dec = nn.ModuleList()
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = img_resolution >> level
        if level == len(channel_mult) - 1:
            head = [unet_block(cout, cout, attention=True), unet_block(cout, cout)]
        else:
            head = [unet_block(cout, cout, up=True)]
        blocks = []
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            attn = res in attn_resolutions and (idx == num_blocks or not decoder_attn_last_only)
            blocks.append(unet_block(cin, cout, attention=attn))
        dec.append(DecoderLevel(head, blocks))
    return enc, dec
