"""Run logging: ``log.txt`` (human), ``stats.jsonl`` (one JSON record per tick) and TensorBoard scalars
when the ``tensorboard`` extra is installed. Only rank 0 writes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from difflab.errors import echo as console
from difflab.runio import append_text, mkdir


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self._tb = None
        if enabled:
            mkdir(self.run_dir)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception:  # tensorboard is an optional extra
                self._tb = None

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
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("kimg", "step") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, global_step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
