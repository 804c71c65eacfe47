"""Config -> model: the one place where a network and a method are put together (train and generate
both call :func:`build_model`, so a run directory always rebuilds the same model), and :func:`load_run`,
a run directory or checkpoint -> the trained model."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from difflab import runio
from difflab.config import RunConfig
from difflab.errors import UserError
from difflab.methods.base import Method
from difflab.methods.registry import build_method, method_class
from difflab.nets import build_network
from difflab.utils import resolve_device


def method_kwargs(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.method.items() if k != "name"}


def network_kwargs(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.network.items() if k != "name"}


def check_method_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Reject method options the method does not take (methods accept ``**unused`` for forward
    compatibility of old runs, so typos are caught here, where the user typed them)."""
    params = inspect.signature(method_class(name).__init__).parameters
    named = {k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(kwargs) - named)
    if unknown:
        valid = sorted(named - {"self", "net", "img_channels", "img_resolution", "label_dim", "variant"})
        raise UserError(f"method {name!r} has no option(s) {unknown}; valid options: {', '.join(valid)}")


def build_model(cfg: RunConfig) -> Method:
    """Build the method around its backbone from ``cfg.method``, ``cfg.network`` and ``cfg.image``."""
    if not cfg.image:
        raise UserError("the run config has no image shape; it is written by `difflab train`")
    name = cfg.method["name"]
    mkw = method_kwargs(cfg)
    check_method_kwargs(name, mkw)
    img = cfg.image
    out_channels = method_class(name).net_out_channels(img["channels"], variant=name, **mkw)
    net = build_network(cfg.network["name"], img_resolution=img["resolution"], in_channels=img["channels"],
                        out_channels=out_channels, label_dim=img.get("label_dim", 0),
                        augment_dim=img.get("augment_dim", 0), **network_kwargs(cfg))
    return build_method(name, net, img_channels=img["channels"], img_resolution=img["resolution"],
                        label_dim=img.get("label_dim", 0), **mkw)


def load_run(network: str | Path, device: str | torch.device | None = None, which: str = "ema"
             ) -> tuple[Method, RunConfig, dict[str, Any]]:
    """A run directory (latest checkpoint) or a checkpoint file -> (model in eval mode, config, metadata)."""
    json_path = runio.resolve_checkpoint(network)
    cfg = RunConfig.load(json_path.parent / "training_options.json")
    model = build_model(cfg)
    meta, tensors = runio.read_checkpoint(json_path)
    prefix = which if any(k.startswith(which + ".") for k in tensors) else "model"
    runio.load_module(model, tensors, prefix, str(json_path))
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return model.to(dev).eval().requires_grad_(False), cfg, meta
