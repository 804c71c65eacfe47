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

from difflab.errors import UserError


@dataclass
class TrainOptions:
    """Options of the shared training loop (difflab/training/loop.py)."""

    batch: int = 64  # global batch, summed over ranks and accumulation rounds
    batch_gpu: int | None = None  # per-device chunk; gradient accumulation follows
    duration_kimg: float = 100.0  # training length in thousands of images
    optimizer: str = "adam"  # adam | adamw
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_rampup_kimg: float = 0.0  # linear warm-up
    lr_schedule: str = "constant"  # constant | cosine (cosine decays to 0 at duration_kimg)
    grad_clip: float | None = None  # max global grad norm
    ema_halflife_kimg: float | None = 0.5  # EDM EMA by half-life ...
    ema_rampup_ratio: float | None = 0.05  # ... with ramp-up
    ema_decay: float | None = None  # or DDPM-style plain decay (overrides half-life)
    ema_start_step: int = 0  # plain decay: copy weights until this step
    ema_every: int = 1  # plain decay: update every N steps
    augment_p: float = 0.0  # non-leaky augmentation probability (0 = off)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    tf32: bool = False  # allow TF32 matmuls/convolutions on Ampere+ GPUs (faster, ~1e-3 relative error)
    tick_kimg: float = 5.0
    snapshot_ticks: int = 10
    keep_checkpoints: int = 0  # 0 keeps all
    seed: int = 0
    grid_seeds: str = "0-63"  # seeds of the sample grid written at each snapshot
    workers: int = 2
    early_stop_delta: float | None = None  # stop when mean |change| of the last window tick losses < delta
    early_stop_window: int = 10
    holdout: int = 0  # images held out for a validation loss and a "best" checkpoint
    fid_every: int = 0  # compute a small FID every N snapshots (0 = never)
    fid_num: int = 1000
    fid_ref: str | None = None  # reference .npz (default: computed from the training data)
    stop_after_steps: int | None = None  # end the process early (job time limits); resume continues

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown training option(s) {unknown}; valid ones: {', '.join(sorted(names))}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


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


def apply_override(cfg: RunConfig, key: str, value: Any) -> None:
    """Set ``section.key=value`` (``train.lr=2e-4``, ``method.eta=10000``, ``network.dropout=0.1``)."""
    if "." not in key:
        raise UserError(f"override {key!r} must look like section.key=value, e.g. train.lr=2e-4")
    section, name = key.split(".", 1)
    if section == "train":
        if name not in {f.name for f in dataclasses.fields(TrainOptions)}:
            raise UserError(f"unknown training option {name!r} in override {key}")
        setattr(cfg.train, name, tuple(value) if name == "betas" else value)
    elif section in ("data", "method", "network", "sampler"):
        getattr(cfg, section)[name] = value
    else:
        raise UserError(f"override {key!r}: section must be one of data, method, network, train, sampler")
