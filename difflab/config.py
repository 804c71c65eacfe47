"""Run configuration: presets, command-line overrides and the ``training_options.json`` round trip.

A run is described by five sections (the preset JSON format, DESIGN.md "Run directory"):

* ``data``    -- keyword arguments of :func:`difflab.data.open_dataset` (``source``, ``resolution``, ...)
* ``method``  -- ``{"name": ..., **kwargs}`` for :func:`difflab.methods.registry.build_method`
* ``network`` -- ``{"name": ..., **kwargs}`` for :func:`difflab.nets.build_network`
* ``train``   -- :class:`TrainOptions` (the one training loop's knobs)
* ``sampler`` -- defaults for ``generate`` (``sampler``, ``steps`` and sampler keyword arguments)

Everything needed to rebuild the network, the method and the sampler lives in the run directory,
so ``generate``, ``fid`` and ``nll`` never need a training flag repeated.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from difflab.data.labels import LABEL_RULES
from difflab.data.sources import NPY_LAYOUTS
from difflab.errors import UserError
from difflab.options import Spec, coerce, opt, specs, validate, validate_dict
from difflab.rng import parse_seeds


def _check_wandb_project(value: str, flag: str) -> None:
    """W&B refuses empty project names and ones with ``/ \\ # ? % :``; say so before training starts."""
    if not value.strip() or any(c in value for c in "/\\#?%:"):
        raise UserError(f"{flag} {value!r}: give a non-blank W&B project name without / \\ # ? % :")


@dataclass
class TrainOptions:
    """Options of the shared training loop (difflab/training/loop.py). Each field is also a ``difflab train``
    flag (the first spelling in ``flags``, the field name with dashes or underscores) and is validated by
    :func:`difflab.options.validate` wherever it comes from (flag, ``-o train.KEY=VALUE``, preset, JSON, Python)."""

    batch: int = field(default=64, metadata=opt("global batch, summed over ranks and accumulation rounds",
                                                        flags=("--batch", "--batch-size"), min=1))
    batch_gpu: int | None = field(default=None, metadata=opt("per-device batch; gradient accumulation follows",
                                                             flags=("--batch-gpu",), min=1))
    duration_kimg: float = field(default=100.0, metadata=opt("training length in kimg (thousands of images)",
                                                             flags=("--duration",), gt=0, metavar="KIMG"))
    optimizer: str = field(default="adam", metadata=opt(choices=("adam", "adamw")))
    lr: float = field(default=1e-3, metadata=opt("learning rate", flags=("--lr", "--learning-rate"), gt=0))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=opt(
        "Adam betas", flags=("--adam-betas",), min=0, lt=1, metavar="B1,B2"))
    eps: float = field(default=1e-8, metadata=opt("Adam epsilon", flags=("--adam-eps",), gt=0))
    weight_decay: float = field(default=0.0, metadata=opt(min=0))
    lr_rampup_kimg: float = field(default=0.0, metadata=opt("linear LR warm-up, kimg", flags=("--lr-rampup",), min=0,
                                                            metavar="KIMG"))
    lr_schedule: str = field(default="constant", metadata=opt("cosine decays to 0 at --duration",
                                                              choices=("constant", "cosine")))
    grad_clip: float | None = field(default=None, metadata=opt("max global gradient norm", gt=0))
    ema_halflife_kimg: float | None = field(default=0.5, metadata=opt("EMA half-life in kimg (EDM)", flags=("--ema",),
                                                                      min=0, metavar="KIMG"))
    ema_rampup_ratio: float | None = field(default=0.05, metadata=opt("EMA half-life ramp-up ratio",
                                                                      flags=("--ema-rampup",), gt=0))
    ema_decay: float | None = field(default=None, metadata=opt(
        "plain EMA decay (e.g. 0.9999) instead of a half-life", min=0, max=1))
    ema_start_step: int = field(default=0, metadata=opt("plain decay: first step of averaging",
                                                        flags=("--ema-start",), min=0))
    ema_every: int = field(default=1, metadata=opt("plain decay: update interval in steps",
                                                 flags=("--ema-every", "--ema-update-rate"), min=1))
    augment_p: float = field(default=0.0, metadata=opt("non-leaky augmentation probability (0 = off)",
                                                       flags=("--augment",), min=0, max=1))
    precision: str = field(default="fp32", metadata=opt("autocast precision", choices=("fp32", "bf16", "fp16")))
    tf32: bool = field(default=False, metadata=opt(
        "allow TF32 matmuls/convolutions on Ampere+ GPUs (faster, ~1e-3 relative error; off: fp32 means fp32)",
        takes_value=False))
    compile: bool = field(default=False, metadata=opt(
        "torch.compile the backbone for training (opt-in: same results to float tolerance; the first steps are "
        "slower while it compiles; needs a C++ compiler on CPU)", takes_value=False))
    channels_last: bool = field(default=False, metadata=opt(
        "train the backbone in the channels-last memory layout (opt-in: same results to float tolerance; faster "
        "convolutions on CPU and on GPUs with tensor cores; checkpoints are stored in the usual layout)",
        takes_value=False))
    tick_kimg: float = field(default=5.0, metadata=opt("kimg between log lines", flags=("--tick",), gt=0,
                                                       metavar="KIMG"))
    snapshot_ticks: int = field(default=10, metadata=opt("ticks between checkpoints + sample grids",
                                                         flags=("--snap",), min=1))
    snap_minutes: float | None = field(default=None, metadata=opt(
        "also write a checkpoint at least every M minutes of wall time (long ticks, preemptible jobs)", gt=0,
        metavar="M"))
    keep_checkpoints: int = field(default=0, metadata=opt("keep only the newest N checkpoints (0 keeps all)", min=0))
    seed: int = field(default=0, metadata=opt("run seed (weights, data order, noise)", min=0))
    grid_seeds: str = field(default="0-63", metadata=opt("seeds of the sample grid written at each snapshot",
                                                         check=lambda v, flag: parse_seeds(v, flag)))
    workers: int = field(default=2, metadata=opt("data-loading worker processes", min=0))
    early_stop_delta: float | None = field(default=None, metadata=opt(
        "stop when the mean |change| of the last --early-stop-window tick losses is below this",
        flags=("--early-stop-delta", "--early-stop-loss-change"), gt=0))
    early_stop_window: int = field(default=10, metadata=opt(min=1))
    holdout: int = field(default=0, metadata=opt("images held out for a validation loss and checkpoint-best", min=0))
    fid_every: int = field(default=0, metadata=opt("small FID every N snapshots (0 = never)", min=0))
    fid_num: int = field(default=1000, metadata=opt("images of the in-training FID", min=2))
    fid_ref: str | None = field(default=None, metadata=opt("reference .npz (default: from the training data)"))
    stop_after_steps: int | None = field(default=None, metadata=opt(
        "end the process at this step (job time limits); resume continues", min=1))
    wandb: str | None = field(default=None, metadata=opt(
        "also log scalars, sample grids and FID to this Weights & Biases project (rank 0; the wandb extra; "
        "WANDB_MODE=offline works without network)", flags=("--wandb", "--project_name"), metavar="PROJECT",
        check=_check_wandb_project))

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown training option(s) {unknown}; valid ones: {', '.join(sorted(names))}")
        return cls(**d)


@dataclass
class DataOptions:
    """Schema of the ``data`` section (keyword arguments of :func:`difflab.data.open_dataset`); the
    ``difflab train`` data flags are derived from it."""

    source: str = field(default="digits", metadata=opt(
        "image folder, zip, .npy/.npz (folder), digits, MNIST idx, CIFAR-10 tarball", flags=("--data", "--data-dir")))
    resolution: int | None = field(default=None, metadata=opt(
        "resize to this square size (a power of two)", flags=("--resolution", "--npy_resolution", "--image-size"),
        min=1))
    channels: int | None = field(default=None, metadata=opt("convert to 1 or 3 channels", choices=(1, 3)))
    use_labels: bool = field(default=False, metadata=opt("class-conditional (labels from the dataset)",
                                                         flags=("--cond", "--use-labels"), metavar="BOOL"))
    xflip: bool = field(default=False, metadata=opt("add mirrored images", metavar="BOOL"))
    npy_axis: int = field(default=0, metadata=opt("slicing axis of 3-D volumes", flags=("--npy-axis",
                                                                                       "--npy_slice_axis")))
    npy_key: str | None = field(default=None, metadata=opt("array name inside .npz files"))
    npy_range: tuple[float, float] | None = field(default=None, metadata=opt(
        "intensity window mapped to 0..255, e.g. a CT window -1000,1000 (default: min/max of each array)",
        metavar="LO,HI", check=lambda v, flag: _increasing(v, flag)))
    npy_layout: str = field(default="auto", metadata=opt("how arrays split into images", choices=NPY_LAYOUTS))
    npy_label_key: str | None = field(default=None, metadata=opt("label array in .npz files"))
    nan_to: float | None = field(default=None, metadata=opt(
        "replace NaN/inf in float data by NUMBER (default: refuse such data)", metavar="NUMBER"))
    label_rule: str = field(default="auto", metadata=opt("where class labels come from", flags=("--labels",),
                                                         choices=LABEL_RULES))
    max_size: int | None = field(default=None, metadata=opt("use a reproducible random subset of this many images",
                                                            min=1))
    pad_to: int | None = field(default=None, metadata=opt(
        "zero-pad the images (centred) to N x N, e.g. 28 px to 32; generation crops back", min=1, metavar="N"))
    crop_to: int | None = field(default=None, metadata=opt(
        "recorded by difflab with --pad-to: the side before padding, which generation crops back to", min=1))


def _increasing(window: tuple[float, float], flag: str) -> None:
    if not window[0] < window[1]:
        raise UserError(f"{flag} {window[0]:g},{window[1]:g}: need LO < HI")


IMAGE_KEYS = {"channels": Spec("channels", int, False, None, choices=(1, 3)),
              "resolution": Spec("resolution", int, False, None, min=1),
              "label_dim": Spec("label_dim", int, False, None, min=0),
              "augment_dim": Spec("augment_dim", int, False, None, min=0)}


@dataclass
class RunConfig:
    data: dict[str, Any] = field(default_factory=lambda: {"source": "digits"})
    method: dict[str, Any] = field(default_factory=lambda: {"name": "edm"})
    network: dict[str, Any] = field(default_factory=lambda: {"name": "ddpmpp"})
    train: TrainOptions = field(default_factory=TrainOptions)
    sampler: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    preset: str | None = None
    # Filled in by the training loop from the dataset: channels, resolution, label_dim, augment_dim.
    image: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = validate_dict(DataOptions, self.data, "data")
        for key, value in self.image.items():
            if key in IMAGE_KEYS:
                coerce(IMAGE_KEYS[key], value, f"image.{key} {value!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"]["betas"] = list(self.train.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = copy.deepcopy(d)
        known = {"data", "method", "network", "train", "sampler", "description", "preset", "image"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown config section(s) {unknown}; valid sections: {sorted(known)}")
        for sec in ("method", "network"):
            if "name" not in d.get(sec, {"name": 1}):
                raise UserError(f"config section {sec!r} needs a 'name'")
        return cls(
            data=d.get("data", {"source": "digits"}),
            method=d.get("method", {"name": "edm"}),
            network=d.get("network", {"name": "ddpmpp"}),
            train=TrainOptions.from_dict(d.get("train", {})),
            sampler=d.get("sampler", {}),
            description=d.get("description", ""),
            preset=d.get("preset"),
            image=d.get("image", {}),
        )

    def save(self, path: str | Path) -> None:
        from difflab.runio import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        except FileNotFoundError:
            raise UserError(f"{path}: not found; pass a run directory written by `difflab train`") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


# ---- presets ----------------------------------------------------------------------------------

def list_presets() -> list[str]:
    root = resources.files("difflab") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> RunConfig:
    """A preset by name (``difflab/presets/NAME.json``) or a path to a JSON file of the same format."""
    path = Path(name)
    if name.endswith(".json") and path.exists():
        text = path.read_text()
    else:
        res = resources.files("difflab") / "presets" / f"{name}.json"
        if not res.is_file():
            raise UserError(f"--preset {name!r} is unknown; available presets: {', '.join(list_presets())} "
                            "(or pass a path to a .json file)")
        text = res.read_text()
    try:
        cfg = RunConfig.from_dict(json.loads(text))
    except json.JSONDecodeError as e:
        raise UserError(f"preset {name}: not valid JSON ({e.msg} at line {e.lineno})") from None
    cfg.preset = path.stem if name.endswith(".json") else name
    return cfg


def parse_value(text: str) -> Any:
    """Command-line value -> JSON value when it parses (numbers, true/false, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        return text


# Data settings that describe a recipe, not a particular dataset: kept when ``--data`` names other data.
RECIPE_DATA_KEYS = ("use_labels", "xflip")


def set_data(cfg: RunConfig, data: dict[str, Any]) -> dict[str, Any]:
    """Update ``cfg.data`` with ``data`` (docs/training.md "What a preset keeps"). When ``data`` names another
    ``source`` than the preset's, the preset's data section is dropped first, except the recipe settings
    :data:`RECIPE_DATA_KEYS`: its ``resolution``, ``channels``, ``pad_to``, NPY and label options describe the
    preset's data, and the user's data decides its own size (a preset's 8 px must not shrink 28 px images).
    Returns the dropped settings that ``data`` does not set again."""
    source, dropped = data.get("source"), {}
    if source is not None and str(source) != str(cfg.data.get("source")):
        dropped = {k: v for k, v in cfg.data.items() if k not in RECIPE_DATA_KEYS and k != "source" and k not in data}
        cfg.data = {k: v for k, v in cfg.data.items() if k in RECIPE_DATA_KEYS}
    cfg.data.update(data)
    cfg.data = validate_dict(DataOptions, cfg.data, "data")
    return dropped


def apply_override(cfg: RunConfig, key: str, value: Any, where: str | None = None) -> None:
    """Set ``section.key=value`` (``train.lr=2e-4``, ``method.eta=10000``, ``network.dropout=0.1``); training and
    data values are type- and range-checked by their schema (``where`` names the override in errors)."""
    where = where or f"-o {key}={value}"
    if "." not in key:
        raise UserError(f"{where}: use SECTION.KEY=VALUE, e.g. -o train.lr=2e-4")
    section, name = key.split(".", 1)
    if section == "train":
        table = specs(TrainOptions)
        if name not in table:
            raise UserError(f"{where}: unknown training option {name!r}; valid ones: {', '.join(sorted(table))}")
        setattr(cfg.train, name, coerce(table[name], value, where))
    elif section == "data":
        table = specs(DataOptions)
        cfg.data[name] = coerce(table[name], value, where) if name in table else value
    elif section in ("method", "network", "sampler"):
        getattr(cfg, section)[name] = value
    else:
        raise UserError(f"{where}: the section must be one of data, method, network, train, sampler")
