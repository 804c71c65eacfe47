"""Backbone zoo with one call signature (DESIGN.md "nets/"; specs/gaussian_and_dddm.md §5.5).

Every network is called as ``net(x, noise_labels, class_labels=None, augment_labels=None, context=None)``
and returns a tensor of shape ``[N, out_channels, H, W]``.

``NETWORKS`` maps a name to a :class:`NetworkSpec` (a factory plus its preset keyword arguments).
Other modules add their own networks with :func:`register_network`; :func:`build_network` merges a
preset with overrides and :func:`network_kwargs_defaults` gives the fully resolved keyword arguments
(to store in ``training_options.json`` so a run directory rebuilds the same network).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from difflab.errors import UserError
from difflab.nets.adm import DhariwalUNet
from difflab.nets.context import CONTEXT_MODES, ConcatContext
from difflab.nets.ddpm_unet import DDPMUNet
from difflab.nets.dit import DIT_CONFIGS, DiT
from difflab.nets.songunet import SongUNet
from difflab.nets.unetmini import UNetMini


@dataclass(frozen=True)
class NetworkSpec:
    """A registered backbone: ``factory(**preset, **overrides)`` builds it."""

    factory: Callable[..., nn.Module]
    preset: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


NETWORKS: dict[str, NetworkSpec] = {}


def register_network(name: str, factory: Callable[..., nn.Module], summary: str = "",
                     **preset: Any) -> None:
    """Add ``name`` to :data:`NETWORKS`. ``preset`` keys must be parameters of ``factory``."""
    if name in NETWORKS:
        raise ValueError(f"network {name!r} is already registered")
    unknown = sorted(set(preset) - set(_parameters(factory)))
    if unknown:
        raise ValueError(f"preset for {name!r} has keys {unknown} that {factory.__name__} does not take")
    NETWORKS[name] = NetworkSpec(factory, preset, summary)


def _parameters(factory: Callable[..., nn.Module]) -> dict[str, inspect.Parameter]:
    params = inspect.signature(factory).parameters
    return {k: p for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _spec(name: str) -> NetworkSpec:
    if name not in NETWORKS:
        raise UserError(f"unknown network {name!r}; choose one of {', '.join(sorted(NETWORKS))}")
    return NETWORKS[name]


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def network_kwargs_defaults(name: str) -> dict[str, Any]:
    """All keyword arguments ``build_network(name)`` would use: the factory's defaults overlaid with
    the preset. Parameters without a default and without a preset value are omitted."""
    spec = _spec(name)
    kwargs = {k: _jsonable(p.default) for k, p in _parameters(spec.factory).items()
              if p.default is not inspect.Parameter.empty}
    kwargs.update(copy.deepcopy(spec.preset))
    return {k: _jsonable(v) for k, v in kwargs.items()}


def build_network(name: str, context_channels: int = 0, context_mode: str = "cross_attention",
                  **kwargs: Any) -> nn.Module:
    """Build the network ``name`` from its preset, with ``kwargs`` overriding preset values.

    ``context_channels > 0`` conditions it on an image-shaped context (difflab.nets.context): with
    ``context_mode="cross_attention"`` through the network's own cross-attention blocks (networks taking a
    ``context_channels`` option: adm, ddpm_unet), with ``"concat"`` for any network by widening its input.
    Unknown names or keyword arguments raise :class:`~difflab.errors.UserError`.
    """
    spec = _spec(name)
    valid = _parameters(spec.factory)
    if context_mode not in CONTEXT_MODES:
        raise UserError(f"network.context_mode {context_mode!r}: choose one of {', '.join(CONTEXT_MODES)}")
    if context_channels and context_mode == "concat":
        inner = {**network_kwargs_defaults(name), **kwargs}
        inner["in_channels"] = int(inner.get("in_channels", 0)) + int(context_channels)
        return ConcatContext(build_network(name, **inner), int(context_channels))
    if context_channels:
        if "context_channels" not in valid:
            raise UserError(f"network {name!r} has no cross-attention; set network.context_mode=concat "
                            "(or use adm / ddpm_unet)")
        kwargs["context_channels"] = int(context_channels)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise UserError(f"network {name!r} has no option(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(valid)}")
    resolved = {**network_kwargs_defaults(name), **kwargs}
    missing = [k for k, p in valid.items() if p.default is inspect.Parameter.empty and k not in resolved]
    if missing:
        raise UserError(f"network {name!r} needs {', '.join(missing)}")
    return spec.factory(**resolved)


_CIFAR10 = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=0, augment_dim=0)

# EDM train.py: --arch=ddpmpp / ncsnpp on CIFAR-10 (channel_mult [2,2,2], dropout 0.13; §5.5, §4.4).
register_network(
    "ddpmpp", SongUNet, summary="DDPM++ (score SDE VP), SongUNet with positional embedding",
    **_CIFAR10, model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4,
    attn_resolutions=[16], dropout=0.13, label_dropout=0.0, embedding_type="positional",
    channel_mult_noise=1, encoder_type="standard", decoder_type="standard", resample_filter=[1, 1],
)
register_network(
    "ncsnpp", SongUNet, summary="NCSN++ (score SDE VE), SongUNet with Fourier embedding and FIR resampling",
    **_CIFAR10, model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4,
    attn_resolutions=[16], dropout=0.13, label_dropout=0.0, embedding_type="fourier",
    channel_mult_noise=2, encoder_type="residual", decoder_type="standard", resample_filter=[1, 3, 3, 1],
    fourier_scale=16.0,
)
# Score SDE's own CIFAR-10 continuous configs (yang-song/score_sde_pytorch configs/ve|vp|subvp/cifar10_*_continuous
# and *_deep_continuous; §4.4, docs/networks.md "score-SDE NCSN++ / DDPM++"). SongUNet expresses them exactly; the
# method supplies the rest: NCSN++ (VE) is fed ln(sigma) and its output divided by sigma (EDM's VEPrecond with
# c_noise = ln(sigma/2) on [-1,1] data is that config on [0,1] data), DDPM++ (VP/sub-VP) is fed 999 t.
_SDE = dict(**_CIFAR10, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
            attn_resolutions=[16], dropout=0.1, label_dropout=0.0, decoder_type="standard")
_NCSNPP_SDE = dict(**_SDE, embedding_type="fourier", channel_mult_noise=2, fourier_scale=16.0,
                   encoder_type="residual", resample_filter=[1, 3, 3, 1])
_DDPMPP_SDE = dict(**_SDE, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                   resample_filter=[1, 1])
register_network("ncsnpp-sde", SongUNet, summary="NCSN++ as score SDE's VE CIFAR-10 config (feed ln sigma)",
                 **_NCSNPP_SDE)
register_network("ncsnpp-sde-deep", SongUNet, summary="NCSN++ deep (8 blocks per level), score SDE VE config",
                 **{**_NCSNPP_SDE, "num_blocks": 8})
register_network("ddpmpp-sde", SongUNet, summary="DDPM++ as score SDE's VP/sub-VP CIFAR-10 config (feed 999 t)",
                 **_DDPMPP_SDE)
register_network("ddpmpp-sde-deep", SongUNet, summary="DDPM++ deep (8 blocks per level), score SDE VP/sub-VP config",
                 **{**_DDPMPP_SDE, "num_blocks": 8})
# EDM train.py: --arch=adm (the ImageNet-64 network).
register_network(
    "adm", DhariwalUNet, summary="ADM (Dhariwal & Nichol) U-Net, ImageNet-64 configuration",
    img_resolution=64, in_channels=3, out_channels=3, label_dim=0, augment_dim=0,
    model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
    attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0.0,
)

__all__ = [
    "NETWORKS",
    "DiT",
    "DhariwalUNet",
    "NetworkSpec",
    "SongUNet",
    "build_network",
    "network_kwargs_defaults",
    "register_network",
]

# Ho et al.'s DDPM U-Net, CIFAR-10 configuration (specs/gaussian_and_dddm.md §2.4; 35.7M parameters).
register_network(
    "ddpm_unet", DDPMUNet, summary="DDPM U-Net (Ho et al.), CIFAR-10 configuration",
    **_CIFAR10, model_channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=2, attn_resolutions=[16],
    dropout=0.1, num_groups=32, label_dropout=0.0,
)
# Attention-free small U-Net for MNIST-size data (§2.4 test-scale config).
register_network(
    "unetmini", UNetMini, summary="UNetMini: attention-free small U-Net for 28/32 px data",
    img_resolution=32, in_channels=1, out_channels=1, label_dim=0, augment_dim=0,
    model_channels=64, channel_mult=[1, 2, 2], num_res_blocks=2, dropout=0.0, num_groups=8, label_dropout=0.0,
)
# Peebles & Xie's DiT (difflab/nets/dit.py): "dit" is DiT-S/2 at CIFAR-10 size; "dit-s" .. "dit-xl" are
# the paper's Table 1 sizes (hidden_size, depth, num_heads), patch 2 (override patch_size for /4, /8).
register_network(
    "dit", DiT, summary="DiT-S/2 (Peebles & Xie) transformer with adaLN-Zero, 32x32 patch 2",
    **_CIFAR10, patch_size=2, hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0, dropout=0.0,
    label_dropout=0.0,
)
for _size, (_hidden, _depth, _heads) in DIT_CONFIGS.items():
    register_network(
        f"dit-{_size}", DiT, summary=f"DiT-{_size.upper()}/2 (Peebles & Xie, Table 1 size)",
        **_CIFAR10, patch_size=2, hidden_size=_hidden, depth=_depth, num_heads=_heads, mlp_ratio=4.0,
        dropout=0.0, label_dropout=0.0,
    )
