"""The method contract (DESIGN.md "The one idea that keeps it small").

A method is a parameterisation (how a backbone becomes a denoiser), an objective (how a training
example becomes a loss) and samplers (how noise becomes an image). A :class:`Method` is an
``nn.Module`` that owns the backbone, so EMA, checkpoints and DDP treat "the model" as one module.

The training loop and the generator only ever call the methods below; they know nothing else about
which method they serve.

Training state (DESIGN.md "Method state"): a method that keeps state across steps (a per-example
estimate bank, a loss history) declares it in :meth:`Method.init_training_state`. The loop owns those
tensors — they are not module buffers, so they are never in ``model.*``/``ema.*``, never copied into the
EMA and never broadcast by DDP — and saves them once per checkpoint as ``state.*``. Each loss reads them
(as of the end of the previous step) from :attr:`Batch.state` and asks for changes with
:meth:`Batch.record`; after the optimizer step the loop gathers every rank's records, orders them by
sample position and calls :meth:`Method.update_training_state`, so every rank holds the state one
process would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from difflab.rng import StackedRandomGenerator


@dataclass
class Batch:
    """One micro-batch as the training loop hands it to :meth:`Method.batch_loss`.

    ``index`` is each example's dataset index ``[N]`` (int64) and ``epoch`` the data epoch of its
    sample position ``[N]`` (int64; position // training-set size); both are None outside the loop.
    ``state`` is the method's training state as of the end of the previous optimizer step (read only;
    None when the loss runs without the loop, e.g. for a validation loss).
    """

    x0: torch.Tensor
    class_labels: torch.Tensor | None = None
    rng: StackedRandomGenerator | None = None
    augment_labels: torch.Tensor | None = None
    index: torch.Tensor | None = None
    epoch: torch.Tensor | None = None
    step: int = 0
    state: Mapping[str, torch.Tensor] | None = None
    updates: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def record(self, name: str, **rows: torch.Tensor) -> None:
        """Ask for the update ``name`` after this step: every tensor in ``rows`` has one row per example.
        The loop gathers the rows of every rank and micro-batch, adds ``index`` (dataset index) and
        ``position`` (sample position), orders them by position and passes them to
        :meth:`Method.update_training_state`. Only the loop applies them; outside it they are dropped."""
        n = self.x0.shape[0]
        for key, value in rows.items():
            if value.shape[:1] != (n,):
                rows_of = value.shape[0] if value.ndim else "no"
                raise ValueError(f"record({name!r}): {key} has {rows_of} rows, the batch has {n}")
        self.updates[name] = {k: v.detach() for k, v in rows.items()}


class Method(nn.Module):
    """Base class. Subclasses set ``name``, ``samplers`` and implement ``loss`` and ``sample``.

    Images enter as uint8 ``[N,C,H,W]`` and are mapped by :meth:`encode` to the method's own range
    (Gaussian methods: [-1, 1]); :meth:`decode` maps samples back to uint8.
    """

    name: ClassVar[str] = "base"
    samplers: ClassVar[tuple[str, ...]] = ()
    default_sampler: ClassVar[str] = ""

    def __init__(self, net: nn.Module, img_channels: int, img_resolution: int, label_dim: int = 0):
        super().__init__()
        self.net = net
        self.img_channels = img_channels
        self.img_resolution = img_resolution
        self.label_dim = label_dim

    @classmethod
    def net_out_channels(cls, img_channels: int, **method_kwargs: Any) -> int:
        """Output channels the backbone needs (e.g. 2C for a learned variance)."""
        return img_channels

    @classmethod
    def net_context_channels(cls, img_channels: int, **method_kwargs: Any) -> int:
        """Channels of the ``context`` the backbone is called with (0: none; DDDM: its estimate)."""
        return 0

    def fit_data(self, dataset: Any) -> None:
        """Called once before training with the training dataset (e.g. to store a prior mean image
        as a buffer, so it travels with the checkpoint). Default: nothing."""

    # ---- data range -------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N,C,H,W] -> float32 in [-1, 1] (override for other ranges)."""
        return images.to(torch.float32) / 127.5 - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model-range float -> uint8, EDM's ``clip(x * 127.5 + 128)`` rounding."""
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)

    # ---- training state (module docstring) ---------------------------------------------------
    # Checkpoint keys older difflab versions kept as module buffers -> the state they became.
    legacy_state_keys: ClassVar[dict[str, str]] = {}

    def init_training_state(self, num_examples: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The initial training state for a dataset of ``num_examples`` images (rows are dataset indices);
        random values come from ``generator``. Default: no state."""
        return {}

    def update_training_state(self, state: dict[str, torch.Tensor],
                              updates: dict[str, dict[str, torch.Tensor]]) -> None:
        """Apply one optimizer step's gathered :meth:`Batch.record` rows to ``state`` in place (called by the
        loop on every rank with the same rows, in sample-position order)."""

    # ---- objective --------------------------------------------------------------------------
    def batch_loss(self, batch: Batch) -> torch.Tensor:
        """Per-example loss ``[N]`` of a :class:`Batch`. The default calls :meth:`loss`, so a method that needs
        no index, epoch or state only writes ``loss``; one that does overrides this."""
        return self.loss(batch.x0, batch.class_labels, batch.rng, batch.augment_labels)

    def loss(
        self,
        x0: torch.Tensor,
        class_labels: torch.Tensor | None,
        rng: StackedRandomGenerator,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-example training loss, shape ``[N]`` (sum over the example's elements, EDM-style).

        Every random draw for example k must come from ``rng`` (row k), never the global RNG, so
        that distributed and resumed training draw the same noise as a single uninterrupted run.
        """
        raise NotImplementedError

    def forward(self, batch: Batch) -> torch.Tensor:
        """The module's forward is its loss, so DDP wraps the whole method: ``model(batch)``."""
        return self.batch_loss(batch)

    # ---- samplers ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        rng: StackedRandomGenerator,
        class_labels: torch.Tensor | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Generate ``len(rng)`` samples in the model range; all randomness from ``rng``."""
        raise NotImplementedError

    def sampler_defaults(self) -> dict[str, Any]:
        """Sampler settings stored in the run (generate uses them unless overridden)."""
        return {"sampler": self.default_sampler}

    @contextlib.contextmanager
    def batch_invariant(self, chunk: int) -> Iterator[None]:
        """Evaluate the backbone in fixed chunks of ``chunk`` rows (the last padded by repetition).

        Kernels pick algorithms by batch size, so the same input can round differently at batch 1 and
        batch 64. With a fixed chunk shape a sample's output depends on its own row only, which makes
        generated images bitwise independent of ``--batch`` (DESIGN.md "Seeds").
        """
        inner = self.net
        self.net = ChunkedNet(inner, chunk)
        try:
            yield
        finally:
            self.net = inner

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.img_channels, self.img_resolution, self.img_resolution)


class ChunkedNet(nn.Module):
    """Calls ``net`` on fixed-size row chunks; see :meth:`Method.batch_invariant`."""

    def __init__(self, net: nn.Module, chunk: int):
        super().__init__()
        self.net, self.chunk = net, int(chunk)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        n, k = x.shape[0], self.chunk
        noise_labels = torch.as_tensor(noise_labels, device=x.device).reshape(-1).expand(n)
        rows = [x, noise_labels, class_labels, augment_labels, context]
        outs = []
        for start in range(0, n, k):
            idx = torch.arange(start, start + k, device=x.device).clamp(max=n - 1)
            args = [None if r is None else r[idx] for r in rows]
            outs.append(self.net(args[0], args[1], class_labels=args[2], augment_labels=args[3],
                                 context=args[4])[: min(k, n - start)])
        return torch.cat(outs)
