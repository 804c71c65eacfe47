"""Config -> model: the one place where a network and a method are put together (train and generate
both call :func:`build_model`, so a run directory always rebuilds the same model)."""

from __future__ import annotations

import inspect
from typing import Any

from difflab.config import RunConfig
from difflab.errors import UserError
from difflab.methods.base import Method
from difflab.methods.registry import build_method, method_class
from difflab.nets import build_network


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
    context = method_class(name).net_context_channels(img["channels"], variant=name, **mkw)
    nkw = network_kwargs(cfg)
    if context:
        nkw["context_channels"] = context
    net = build_network(cfg.network["name"], img_resolution=img["resolution"], in_channels=img["channels"],
                        out_channels=out_channels, label_dim=img.get("label_dim", 0),
                        augment_dim=img.get("augment_dim", 0), **nkw)
    return build_method(name, net, img_channels=img["channels"], img_resolution=img["resolution"],
                        label_dim=img.get("label_dim", 0), **mkw)
