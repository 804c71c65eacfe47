"""The Python API: train, load and sample in a handful of lines.

    import difflab
    run = difflab.train("digits-quick", outdir="runs", duration_kimg=20)
    pipe = difflab.load(run)
    images = pipe.sample(16)                      # uint8 [16, C, H, W], seeds 0..15
    difflab.fit_grid(run, "ipndm", 10)            # a 10-NFE grid fitted to this run (grids.json)
    fast = difflab.load(run).sample(16, sampler="ipndm", steps=10, grid="fitted")
    difflab.save_grid(images, "grid.png")

Bad input raises :class:`difflab.errors.UserError`; its message is the one line ``difflab`` prints for the
same mistake on the command line (``--lr nan: must be a finite number (> 0)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from difflab.config import DataOptions, RunConfig, TrainOptions, load_preset, set_data
from difflab.errors import UserError
from difflab.options import coerce, specs, validate_dict
from difflab.utils import make_grid, resolve_device, save_png


def make_config(preset: str | RunConfig | dict = "digits-quick", **overrides: Any) -> RunConfig:
    """A preset (name, JSON path, dict or RunConfig) with overrides: training-option names
    (``lr=2e-4``, ``duration_kimg=10``) set ``train``; ``data=``, ``method=``, ``network=``, ``sampler=``
    dicts update those sections."""
    if isinstance(preset, RunConfig):
        cfg = RunConfig.from_dict(preset.to_dict())
    elif isinstance(preset, dict):
        cfg = RunConfig.from_dict(preset)
    else:
        cfg = load_preset(preset)
    table = specs(TrainOptions)
    for key, value in overrides.items():
        if key in ("data", "method", "network", "sampler"):
            if not isinstance(value, dict):
                raise UserError(f"{key}={value!r}: give a dict of {key} options")
            if key == "data":
                set_data(cfg, value)  # other data: the preset's resolution etc. do not carry over
            else:
                getattr(cfg, key).update(value)
        elif key in table:
            setattr(cfg.train, key, coerce(table[key], value))
        else:
            raise UserError(f"unknown option {key!r}: use a training option ({', '.join(sorted(table))}) "
                            "or data=/method=/network=/sampler= dicts")
    cfg.data = validate_dict(DataOptions, cfg.data, "data")
    return cfg


def train(preset: str | RunConfig | dict = "digits-quick", outdir: str | Path = "runs",
          run_dir: str | Path | None = None, device: str | None = None, progress: bool = True,
          from_scratch: bool = False, **overrides: Any) -> Path:
    """Train and return the run directory (see :func:`make_config` for ``overrides``); ``from_scratch``
    starts anew in an existing ``run_dir`` (its contents move to ``run_dir/previous-*/``)."""
    from difflab.training.loop import train as _train

    return _train(make_config(preset, **overrides), run_dir=run_dir, outdir=outdir, device=device, progress=progress,
                  from_scratch=from_scratch)


class Trainer:
    """``Trainer(config).train()``: the object form of :func:`train` (for scripts that hold a config)."""

    def __init__(self, config: str | RunConfig | dict = "digits-quick", outdir: str | Path = "runs",
                 run_dir: str | Path | None = None, device: str | None = None, **overrides: Any):
        self.config = make_config(config, **overrides)
        self.outdir, self.run_dir, self.device = outdir, run_dir, device

    def train(self, progress: bool = True) -> Path:
        from difflab.training.loop import train as _train

        self.run_dir = _train(self.config, run_dir=self.run_dir, outdir=self.outdir, device=self.device,
                              progress=progress)
        return self.run_dir


class Pipeline:
    """A trained model (EMA weights) with its run's sampler defaults."""

    def __init__(self, network: str | Path, device: str | None = None, which: str = "ema"):
        from difflab.generate import load_run

        self.device = resolve_device(device)
        self.model, self.config, self.meta = load_run(network, self.device, which=which)

    def sample(self, n: int | None = None, seeds: Iterable[int] | None = None, batch: int = 64,
               class_idx: int | None = None, progress: bool = False, **sampler: Any) -> torch.Tensor:
        """uint8 images ``[n, C, H, W]`` for ``seeds`` (default ``0..n-1``); sampler settings default to the run's."""
        from difflab.generate import check_sampler_options, check_seeds, generate_batches, sampler_kwargs
        from difflab.options import check_value

        if seeds is None:
            if n is None:
                raise UserError("sample(): give n or seeds")
            seeds = range(check_value("n", n, min=1))
        seeds = check_seeds(seeds)
        batch = check_value("--batch", batch, min=1)
        kw = sampler_kwargs(self.model, self.config.sampler, check_sampler_options(
            self.model, self.config.sampler, {k: v for k, v in sampler.items() if v is not None}))
        out = [img for _, img in generate_batches(self.model, seeds, batch, kw, self.device,
                                                  class_idx=class_idx, progress=progress)]
        return torch.cat(out)


def load(network: str | Path, device: str | None = None) -> Pipeline:
    """Load a run directory (latest checkpoint) or a checkpoint file."""
    return Pipeline(network, device)


def fit_grid(network: str | Path, sampler: str, steps: int, device: str | None = None, **options: Any
             ) -> dict[str, Any]:
    """Fit ``sampler``'s ``steps``-level sigma grid to a run and store it in the run's ``grids.json`` (``difflab
    fit-grid``; options: ``pilots``, ``holdout``, ``seed``, ``rtol``, ``max_evals``, ``sigma_min``, ``sigma_max``,
    ``progress`` and the sampler's own, e.g. ``order=3``); returns the stored entry. Sample with it:
    ``load(run).sample(16, sampler=sampler, steps=steps, grid="fitted")``."""
    import hashlib

    from difflab import runio
    from difflab.build import load_run
    from difflab.methods.gaussian.grid_fit import fit_grid as _fit
    from difflab.methods.gaussian.grid_fit import store_grid

    model, _, _ = load_run(network, device)
    entry = _fit(model, sampler, steps, **options)
    ckpt = runio.resolve_checkpoint(network)
    entry["checkpoint"] = ckpt.name  # the grid serves the run's other checkpoints too
    entry["checkpoint_sha256"] = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    store_grid(ckpt.parent, entry)
    return entry


def save_grid(images: torch.Tensor, path: str | Path, cols: int | None = None) -> Path:
    """Write uint8 ``[N, C, H, W]`` images as one montage PNG."""
    save_png(path, make_grid(images, cols))
    return Path(path)
