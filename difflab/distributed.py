"""The one distributed layer (DESIGN.md "Distributed"): process-group setup for ``torchrun`` (NCCL on CUDA,
gloo otherwise), rank/world helpers, the collectives training, generation, FID and NLL use, rank-0 console
output (:func:`print0`, :func:`progress`) and :func:`peer_errors`, which turns a dead peer's backend error
into one line per rank.

Without torchrun's environment everything degrades to a single process.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
from collections.abc import Iterator

import torch
import torch.distributed as dist

from difflab.errors import UserError


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device: torch.device | str | None = None) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL when this rank runs on CUDA, gloo
    otherwise. Returns this rank's device (``device``, or the best available; ``cuda`` becomes
    ``cuda:LOCAL_RANK`` under torchrun)."""
    from difflab.utils import resolve_device

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if dev.type == "cuda" and multi:
        dev = torch.device("cuda", local_rank() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if multi and dist.is_available() and not dist.is_initialized():
        with peer_errors():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        atexit.register(shutdown)
    return dev


def shutdown() -> None:
    """Destroy the process group (registered at exit by :func:`init`). Without it gloo's worker threads can
    outlive the interpreter and abort the process at exit ("terminate called without an active exception")."""
    if is_dist():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank_world() -> tuple[int, int]:
    return rank(), world_size()


def collective_device() -> torch.device:
    """Where tensors must live for a collective: NCCL moves CUDA tensors only, gloo takes CPU ones."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from every rank along dim 0 (rank order)."""
    if not is_dist():
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def broadcast_object(obj):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def print0(*args, **kwargs) -> None:
    if rank() == 0:
        print(*args, **kwargs, flush=True)


class _Silent:
    """What :func:`progress` returns where no bar is shown."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int | None, desc: str, unit: str = "img", enabled: bool = True, initial: int = 0):
    """A tqdm bar on rank 0 when ``enabled`` (``--no-progress`` turns it off), a silent stand-in elsewhere;
    both have ``update``, ``set_postfix`` and ``close``."""
    if not enabled or rank() != 0:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)


# Fragments of the errors gloo and NCCL raise when another rank's process is gone.
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
              "socket timeout", "timed out", "nccl error", "ncclremoteerror", "ncclsystemerror", "gloo")


def peer_failure_line(e: BaseException) -> str | None:
    """One line for a backend error that means another rank stopped; None for any other error (and outside
    torchrun)."""
    if not (is_dist() or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return None
    backend_errors = tuple(t for t in (getattr(dist, "DistError", None),) if t is not None)
    text = str(e).strip()
    if not (isinstance(e, backend_errors) or (isinstance(e, RuntimeError | OSError)
                                              and any(s in text.lower() for s in _PEER_LOST))):
        return None
    where = f"rank {rank()} of {world_size()}" if is_dist() else f"rank {os.environ.get('RANK', '0')}"
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]).split(". ")[0][:120] if text else type(e).__name__
    return (f"{where}: another rank stopped or cannot be reached ({detail}); its own error line says why; "
            "fix that and run again (a training run resumes from its last checkpoint)")


@contextlib.contextmanager
def peer_errors() -> Iterator[None]:
    """Turn a dead peer's gloo/NCCL error into a :class:`UserError` of one line (also a decorator)."""
    try:
        yield
    except UserError:
        raise
    except (RuntimeError, OSError) as e:
        line = peer_failure_line(e)
        if line is None:
            raise
        raise UserError(line) from None
