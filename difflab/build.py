"""Config -> model: the one place where a network and a method are put together (train and generate
both call :func:`build_model`, so a run directory always rebuilds the same model), and :func:`load_run`,
a run directory or checkpoint -> the trained model."""

from __future__ import annotations

import collections.abc
import inspect
import typing
from pathlib import Path
from typing import Any

import torch

from difflab import runio
from difflab.config import RunConfig
from difflab.errors import UserError
from difflab.methods.base import Method
from difflab.methods.registry import build_method, method_class
from difflab.nets import NETWORKS, build_network
from difflab.options import to_type, unwrap_optional
from difflab.utils import resolve_device


def named_parameters(fn) -> set[str]:
    params = inspect.signature(fn).parameters
    return {k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def method_kwargs(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.method.items() if k != "name"}


def network_kwargs(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.network.items() if k != "name"}


def _list_item_type(kind: Any) -> Any:
    """``Sequence[int]`` / ``list[float]`` / ``tuple[int, ...]`` / ``tuple[float, float]`` -> the item type
    (int or float); None for any other annotation."""
    origin = typing.get_origin(kind)
    if origin not in (list, tuple, collections.abc.Sequence):
        return None
    items = {a for a in typing.get_args(kind) if a is not Ellipsis}
    return items.pop() if len(items) == 1 and items <= {int, float} else None


def parse_list(text: str, item: type) -> list:
    """``"1,2,4"``, ``"[1,2,4]"``, ``"(1, 2, 4)"`` or ``"1 2 4"`` -> ``[1, 2, 4]`` (ValueError otherwise): the
    list spellings every list option accepts, in Python as on the command line."""
    body = text.strip()
    if body[:1] + body[-1:] in ("[]", "()"):
        body = body[1:-1]
    return [to_type(item, part) for part in body.replace(",", " ").split()]


def check_kwargs(fn, kwargs: dict[str, Any], what: str, flags: dict[str, str] | None = None) -> dict[str, Any]:
    """Each value must fit the type of ``fn``'s parameter of that name (its annotation, else its default's type):
    ``dropout="banana"`` for a float parameter is one line naming the option. Values are not converted, except
    list options given as text (``channel_mult="1,2,4"``, ``-o network.channel_mult=1,2,4``), which become
    lists; returns the changed entries."""
    try:  # a class's parameters are annotated on its __init__
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to the defaults' types
        hints = {}
    params = inspect.signature(fn).parameters
    changed = {}
    for key, value in kwargs.items():
        p = params.get(key)
        if p is None or value is None:
            continue
        kind = hints.get(key)
        if kind is not None:
            kind, _ = unwrap_optional(kind)
        elif type(p.default) in (int, float, bool, str):
            kind = type(p.default)
        item = _list_item_type(kind)
        if item is not None:
            try:
                if isinstance(value, str):
                    changed[key] = parse_list(value, item)
                elif isinstance(value, list | tuple):
                    [to_type(item, v) for v in value]
                elif isinstance(value, int | float) and not isinstance(value, bool):  # --attn-resolutions 16
                    changed[key] = [to_type(item, value)]
                else:
                    raise ValueError(value)
            except (TypeError, ValueError):
                shown = (flags or {}).get(key, f"-o {what}.{key}={value}")
                word = {int: "integers", float: "numbers"}[item]
                raise UserError(f"{shown}: {what} option {key} takes a list of {word}, e.g. {key}=1,2,4 or "
                                f"{key}=[1,2,4]") from None
            continue
        if kind not in (int, float, bool):
            continue
        try:
            to_type(kind, value)
        except (TypeError, ValueError):
            shown = (flags or {}).get(key, f"-o {what}.{key}={value}")
            word = {int: "an integer", float: "a number", bool: "true or false"}[kind]
            raise UserError(f"{shown}: {what} option {key} takes {word}") from None
    return changed


def check_method_kwargs(name: str, kwargs: dict[str, Any], flags: dict[str, str] | None = None) -> None:
    """Reject method options the method does not take (methods accept ``**unused`` for forward
    compatibility of old runs, so typos are caught here, where the user typed them) or of the wrong type."""
    init = method_class(name).__init__
    named = named_parameters(init)
    unknown = sorted(set(kwargs) - named)
    if unknown:
        valid = sorted(named - {"self", "net", "img_channels", "img_resolution", "label_dim", "variant"})
        raise UserError(f"method {name!r} has no option(s) {unknown}; valid options: {', '.join(valid)}")
    return check_kwargs(init, kwargs, "method", flags)


def check_config(cfg: RunConfig, flags: dict[str, str] | None = None) -> None:
    """The method and network sections name a known method/network and fit their signatures (before a run
    starts, so a bad value writes nothing); list options given as text are stored as lists."""
    cfg.method.update(check_method_kwargs(cfg.method["name"], method_kwargs(cfg), flags))
    spec = NETWORKS.get(cfg.network["name"])
    if spec is not None:
        cfg.network.update(check_kwargs(spec.factory, network_kwargs(cfg), "network", flags))


def record_padding(cfg: RunConfig) -> None:
    """With ``data.pad_to`` (``--pad-to``), record ``data.crop_to``, the image side before padding, which
    generation crops back to (docs/howto/own-data.md). Opens the data only when neither ``crop_to`` nor
    ``resolution`` says it; a no-op without ``pad_to``."""
    if cfg.data.get("pad_to") is None or cfg.data.get("crop_to") is not None:
        return
    if cfg.data.get("resolution") is not None:
        side = int(cfg.data["resolution"])
        if side > cfg.data["pad_to"]:
            raise UserError(f"--pad-to {cfg.data['pad_to']}: smaller than --resolution {side}")
    else:
        from difflab.data import open_dataset

        ds = open_dataset(**cfg.data)
        side = ds.crop_to or ds.resolution
    cfg.data["crop_to"] = side


def resolve_image(cfg: RunConfig):
    """Open ``cfg.data`` and fill ``cfg.image`` as the training loop does (channels, resolution, label_dim,
    augment_dim), with its checks; returns the dataset. The training loop and ``difflab train --dry-run``."""
    from difflab.data import open_dataset
    from difflab.data.datasets import check_resolution

    dataset = open_dataset(**cfg.data)
    check_resolution(dataset.resolution, "--resolution")
    if dataset.image_shape[1] != dataset.image_shape[2]:
        raise UserError(f"{cfg.data.get('source')}: images must be square; pass --resolution")
    use_labels = bool(cfg.data.get("use_labels", False))
    if use_labels and not dataset.has_labels:
        raise UserError(f"--cond: dataset {cfg.data.get('source')} has no labels; drop --cond or add dataset.json")
    augment_dim = 0
    if cfg.train.augment_p > 0:
        from difflab.data.augment import AUGMENT_DIM

        augment_dim = AUGMENT_DIM
    cfg.image = {"channels": dataset.num_channels, "resolution": dataset.resolution,
                 "label_dim": dataset.label_dim if use_labels else 0, "augment_dim": augment_dim}
    if dataset.crop_to is not None:
        cfg.data["crop_to"] = dataset.crop_to
    return dataset


def output_resolution(cfg: RunConfig) -> int:
    """The side of generated images: the network's, or the ``data.crop_to`` a ``--pad-to`` run crops back to."""
    return int(cfg.data.get("crop_to") or cfg.image["resolution"])


def build_model(cfg: RunConfig) -> Method:
    """Build the method around its backbone from ``cfg.method``, ``cfg.network`` and ``cfg.image``; with
    ``--pad-to``, ``model.crop_to`` is the side its samples are cropped back to (:func:`record_padding`)."""
    if not cfg.image:
        raise UserError("the run config has no image shape; it is written by `difflab train`")
    record_padding(cfg)
    name = cfg.method["name"]
    mkw = method_kwargs(cfg)
    check_config(cfg)
    img = cfg.image
    out_channels = method_class(name).net_out_channels(img["channels"], variant=name, **mkw)
    context = method_class(name).net_context_channels(img["channels"], variant=name, **mkw)
    nkw = network_kwargs(cfg)
    if context:
        nkw["context_channels"] = context
    net = build_network(cfg.network["name"], img_resolution=img["resolution"], in_channels=img["channels"],
                        out_channels=out_channels, label_dim=img.get("label_dim", 0),
                        augment_dim=img.get("augment_dim", 0), **nkw)
    model = build_method(name, net, img_channels=img["channels"], img_resolution=img["resolution"],
                         label_dim=img.get("label_dim", 0), **mkw)
    if output_resolution(cfg) != img["resolution"]:
        model.crop_to = output_resolution(cfg)
    return model


def load_run(network: str | Path, device: str | torch.device | None = None, which: str = "ema"
             ) -> tuple[Method, RunConfig, dict[str, Any]]:
    """A run directory (latest checkpoint) or a checkpoint file -> (model in eval mode, config, metadata)."""
    json_path = runio.resolve_checkpoint(network)
    cfg = RunConfig.load(json_path.parent / "training_options.json")
    model = build_model(cfg)
    meta, tensors = runio.read_checkpoint(json_path)
    prefix = which if any(k.startswith(which + ".") for k in tensors) else "model"
    runio.check_finite(tensors, str(json_path), prefix + ".")
    runio.load_module(model, tensors, prefix, str(json_path))
    if hasattr(model, "fitted_grids"):  # Gaussian runs: the grids difflab fit-grid stored beside the checkpoints
        from difflab.methods.gaussian.grid_fit import read_grids

        model.fitted_grids = read_grids(json_path.parent)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return model.to(dev).eval().requires_grad_(False), cfg, meta
