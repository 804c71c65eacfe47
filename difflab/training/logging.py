"""Run logging: ``log.txt`` (human), ``stats.jsonl`` (one JSON record per tick), TensorBoard scalars when the
``tensorboard`` extra is installed, and Weights & Biases (scalars, sample grids, FID) with ``--wandb PROJECT``
(the ``wandb`` extra; docs/training.md "Weights & Biases"). Only rank 0 writes."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from difflab.errors import UserError
from difflab.errors import echo as console
from difflab.runio import append_text, atomic_write_text, mkdir

WANDB_ID_FILE = "wandb-run-id.txt"  # a resumed run continues the same W&B run


def import_wandb():
    """The ``wandb`` module, or one line saying how to get it."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install 'difflab[wandb]' (or drop --wandb)") from None
    return wandb


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a stats record that the dashboards plot (``kimg`` and ``step`` are the x axes)."""
    return {k: v for k, v in record.items() if k not in ("kimg", "step") and isinstance(v, (int, float))
            and not isinstance(v, bool)}


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, wandb_project: str | None = None,
                 config: dict[str, Any] | None = None):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self._tb = self._wandb = None
        if wandb_project:
            wandb = import_wandb()  # on every rank, so that all of them stop alike when it is missing
        if enabled:
            mkdir(self.run_dir)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception:  # tensorboard is an optional extra
                self._tb = None
            if wandb_project:
                self._wandb = self._start_wandb(wandb, wandb_project, config or {})

    def _start_wandb(self, wandb, project: str, config: dict[str, Any]):
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        # files go to $WANDB_DIR when set, else into the run directory (RUN/wandb/)
        try:
            run = wandb.init(project=project, name=self.run_dir.name, id=run_id, resume="allow", config=config,
                             dir=os.environ.get("WANDB_DIR") or str(self.run_dir))
        except Exception as e:  # no login, no network, a refused project: W&B's own exception types vary
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"--wandb {project}: W&B did not start ({why}); run `wandb login`, or set "
                            "WANDB_MODE=offline to log locally and `wandb sync` later") from None
        if not id_file.is_file():
            atomic_write_text(id_file, run_id + "\n")
        run.define_metric("kimg")
        return run

    def log(self, msg: str, echo: bool = True) -> None:
        if not self.enabled:
            return
        if echo:
            console(msg)
        append_text(self.run_dir / "log.txt", f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    def stats(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        append_text(self.run_dir / "stats.jsonl", json.dumps(record) + "\n")
        values = scalars(record)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, global_step=step)
        if self._wandb is not None:
            self._wandb.log({**values, **({"kimg": record["kimg"]} if "kimg" in record else {})}, step=step)

    def image(self, path: Path, step: int, key: str = "samples") -> None:
        """A PNG already written (the snapshot's sample grid) to the dashboards."""
        if not self.enabled or (self._tb is None and self._wandb is None) or not Path(path).is_file():
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
        if self._tb is not None:
            self._tb.add_image(key, array, global_step=step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(array, caption=Path(path).name)}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
