"""Method name -> Method class (DESIGN.md layout). Classes are imported lazily so that a method's
optional dependencies never slow down or break the others."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from difflab.errors import UserError
from difflab.methods.base import Method

# name -> "module:Class"; the class receives the name as its ``precond``/variant where relevant.
METHODS: dict[str, str] = {
    "edm": "difflab.methods.gaussian.edm:EDMMethod",
    "vp": "difflab.methods.gaussian.edm:EDMMethod",
    "ve": "difflab.methods.gaussian.edm:EDMMethod",
    "iddpm": "difflab.methods.gaussian.edm:EDMMethod",
    "betadiff": "difflab.methods.beta:BetaMethod",
    "sdd": "difflab.methods.beta:BetaMethod",
    "ddpm": "difflab.methods.gaussian.ddpm:DDPMMethod",
    "sde-ve": "difflab.methods.gaussian.score_sde:ScoreSDEMethod",
    "sde-vp": "difflab.methods.gaussian.score_sde:ScoreSDEMethod",
    "sde-subvp": "difflab.methods.gaussian.score_sde:ScoreSDEMethod",
    "dddm": "difflab.methods.dddm:DDDMMethod",
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(
    name: str, net: nn.Module, img_channels: int, img_resolution: int, label_dim: int = 0, **kwargs: Any
) -> Method:
    """Instantiate method ``name`` around an already built backbone ``net``."""
    cls = method_class(name)
    return cls(net, img_channels=img_channels, img_resolution=img_resolution, label_dim=label_dim,
               variant=name, **kwargs)
