"""Checkpoints as safetensors + JSON, written atomically, loaded without unpickling (DESIGN.md).

``checkpoint-{kimg:06d}.safetensors`` holds every tensor (``model.*``, ``ema.*``, ``optim.*`` and, once, the
method's training state ``state.*``) and, in its metadata, the step counters ``step`` and ``nimg``;
``checkpoint-{kimg:06d}.json`` holds the same counters and the optimizer's non-tensor state. The JSON is
written last, so a checkpoint counts as complete only when its JSON exists and both files name the same step
(docs/reliability.md "Checkpoints"). A complete checkpoint is never overwritten: a second snapshot within the
same kimg goes to ``checkpoint-{kimg:06d}-{step:09d}`` (:func:`new_checkpoint_stem`); the one fixed name,
``checkpoint-best``, loses its JSON before its tensors are replaced.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from difflab.errors import UserError
from difflab.runio.files import atomic_write_bytes, atomic_write_text, os_errors

CKPT_RE = re.compile(r"checkpoint-(\d{6,})(?:-(\d+))?(?:-(\d+))?\.json$")  # kimg, step, n
CHECKPOINT_COUNTERS = ("step", "nimg", "kimg")  # the JSON fields resume and `difflab info` read
TENSOR_COUNTERS = ("step", "nimg")  # also in the safetensors metadata: the pair must agree


def checkpoint_stem(run_dir: str | Path, kimg: int) -> Path:
    return Path(run_dir) / f"checkpoint-{kimg:06d}"


def new_checkpoint_stem(run_dir: str | Path, kimg: int, step: int) -> Path:
    """Where the snapshot of ``step`` goes: ``checkpoint-{kimg:06d}``, unless that already holds a complete
    checkpoint (snapshots < 1 kimg apart), then ``checkpoint-{kimg:06d}-{step:09d}`` (``-N`` appended if that
    too is complete). An incomplete pair there (a killed write) is replaced."""
    stem = checkpoint_stem(run_dir, kimg)
    n = 0
    while is_complete(stem.with_suffix(".json")):
        n += 1
        stem = Path(run_dir) / (f"checkpoint-{kimg:06d}-{step:09d}" + (f"-{n - 1}" if n > 1 else ""))
    return stem


def tensor_counters(path: Path) -> dict[str, int] | None:
    """The ``step``/``nimg`` of a ``.safetensors`` file's metadata (None: no such metadata or an unreadable
    header; older checkpoints have none). Reads only the header."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100_000_000:
                return None
            header = json.loads(f.read(n))
        meta = header.get("__metadata__") or {}
        return {k: int(meta[k]) for k in TENSOR_COUNTERS} if all(k in meta for k in TENSOR_COUNTERS) else None
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _json_counters(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _mismatch(json_meta: dict[str, Any] | None, counters: dict[str, int] | None) -> str | None:
    """How the two halves of a pair disagree (None: they agree, or one side cannot tell: a damaged JSON is
    reported by :func:`read_checkpoint`)."""
    if json_meta is None or counters is None:
        return None
    for key in TENSOR_COUNTERS:
        value = json_meta.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value != counters[key]:
            return f"its .safetensors is of {key} {counters[key]}, its .json of {key} {json_meta.get(key)!r}"
    return None


def is_complete(json_path: Path) -> bool:
    """Both files present and, where both carry them, the same step counters (a pair mixed from two
    snapshots by a kill between the renames counts as incomplete)."""
    st = json_path.with_suffix(".safetensors")
    if not (json_path.exists() and st.exists()):
        return False
    return _mismatch(_json_counters(json_path), tensor_counters(st)) is None


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _state_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(stem: Path, model: torch.nn.Module, ema: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer | None, meta: dict[str, Any],
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``stem.safetensors`` (with ``meta``'s step and nimg in its metadata) then ``stem.json``; returns
    the JSON path. An existing ``stem.json`` is removed first, so no instant pairs new tensors with an old JSON.
    ``state`` is the method's training state (difflab.methods.base), stored once as ``state.*``."""
    tensors = _state_tensors("model", model)
    if ema is not None:
        tensors.update(_state_tensors("ema", ema))
    for k, v in (state or {}).items():
        tensors[f"state.{k}"] = v.detach().cpu().contiguous()
    optim_meta = None
    if optimizer is not None:
        t, optim_meta = _optimizer_tensors(optimizer)
        tensors.update(t)
    counters = {k: str(int(meta[k])) for k in TENSOR_COUNTERS}
    with os_errors(stem.with_suffix(".json")):
        stem.with_suffix(".json").unlink(missing_ok=True)
    atomic_write_bytes(stem.with_suffix(".safetensors"),
                       save(tensors, metadata={**counters, "format": "difflab-checkpoint-1"}))
    meta = dict(meta, optimizer=optim_meta, format="difflab-checkpoint-1")
    atomic_write_text(stem.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return stem.with_suffix(".json")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (:func:`is_complete`) of a run, oldest first (by kimg, then step)."""
    run_dir = Path(run_dir)
    found = []
    for p in run_dir.glob("checkpoint-*.json"):
        m = CKPT_RE.fullmatch(p.name)
        if m and is_complete(p):
            step = (_json_counters(p) or {}).get("step")
            step = step if isinstance(step, int) else int(m.group(2) or -1)
            found.append((int(m.group(1)), step, int(m.group(3) or -1), p))
    return [f[-1] for f in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir (-> its latest checkpoint) or a checkpoint file (.json or .safetensors) -> the JSON path."""
    path = Path(path)
    if path.is_dir():
        ckpts = list_checkpoints(path)
        if not ckpts:
            raise UserError(f"{path}: no checkpoint in this run directory yet; train longer or pass a checkpoint")
        return ckpts[-1]
    if path.suffix in (".json", ".safetensors") and path.with_suffix(".json").exists() \
            and path.with_suffix(".safetensors").exists():
        return path.with_suffix(".json")
    if not path.exists():
        raise UserError(f"{path}: no such run directory or checkpoint; pass a run dir written by `difflab train`")
    raise UserError(f"{path}: not a difflab checkpoint (expected checkpoint-NNNNNN[-STEP].json beside its "
                    ".safetensors)")


def read_checkpoint(json_path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        meta = json.loads(Path(json_path).read_text())
        tensors = load_file(str(Path(json_path).with_suffix(".safetensors")))
    except Exception as e:  # safetensors raises its own error type for torn or foreign files
        detail = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(f"{json_path}: unreadable checkpoint ({detail}); delete it to use an earlier one") from None
    if not isinstance(meta, dict) or meta.get("format") != "difflab-checkpoint-1":
        raise UserError(f"{json_path}: not a difflab checkpoint (no format tag); delete it to use an earlier one")
    for key in CHECKPOINT_COUNTERS:
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise UserError(f"{json_path}: checkpoint field {key!r} is {'missing' if value is None else repr(value)} "
                            "(need a number >= 0); the file is damaged: delete it to use an earlier checkpoint")
    bad = _mismatch(meta, tensor_counters(Path(json_path).with_suffix(".safetensors")))
    if bad:
        raise UserError(f"{json_path}: {bad}: the pair comes from two snapshots; delete both files to use an "
                        "earlier checkpoint")
    return meta, tensors


def check_finite(tensors: dict[str, torch.Tensor], where: str, prefix: str = "") -> None:
    """Refuse weights with NaN or infinite values (a diverged run) in one line."""
    bad = total = 0
    for k, v in tensors.items():
        if k.startswith(prefix) and v.is_floating_point():
            bad += int((~torch.isfinite(v)).sum())
            total += v.numel()
    if bad:
        raise UserError(f"{where}: {bad} of {total} {prefix.rstrip('.') or 'checkpoint'} values are NaN or "
                        "infinite (the run diverged); use an earlier checkpoint or train again with a lower --lr")


def load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, where: str) -> None:
    """Load ``prefix.*`` tensors into ``module`` with a one-line error when the architecture differs."""
    legacy = getattr(module, "legacy_state_keys", {})  # older checkpoints kept training state as buffers
    sd = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    sd = {k: v for k, v in sd.items() if k not in legacy}
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    bad = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or extra or bad:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {extra[:2]}" if extra
                  else f"shape of {bad[0]} is {tuple(sd[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}")
        raise UserError(f"{where}: checkpoint does not match this network's architecture ({detail}); "
                        "use the training_options.json of the run that wrote it")
    module.load_state_dict(sd)


def load_training_state(state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str,
                        legacy: dict[str, str] | None = None) -> None:
    """Copy the checkpoint's ``state.*`` into ``state`` (in place), refusing a missing name or another shape or
    dtype with one line. ``legacy`` maps a ``model.*`` key of older checkpoints to the state name it became."""
    old = {name: f"model.{key}" for key, name in (legacy or {}).items()}
    extra = sorted(k[6:] for k in tensors if k.startswith("state.") and k[6:] not in state)
    if extra:
        raise UserError(f"{where}: checkpoint has training state {extra[:2]} this method does not keep; "
                        "use the training_options.json of the run that wrote it")
    for name, dest in state.items():
        src = tensors.get(f"state.{name}", tensors.get(old.get(name, "")))
        if src is None:
            raise UserError(f"{where}: checkpoint has no training state {name!r}; use the training_options.json "
                            "of the run that wrote it")
        if src.shape != dest.shape or src.dtype != dest.dtype:
            raise UserError(f"{where}: training state {name!r} is {src.dtype} {tuple(src.shape)}, expected "
                            f"{dest.dtype} {tuple(dest.shape)} (another dataset size or option?)")
        dest.copy_(src)


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    om = meta["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    for k, v in om["scalars"].items():
        pid, key = k.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": om["param_groups"]})


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for p in list_checkpoints(run_dir)[:-keep]:
        p.unlink(missing_ok=True)
        p.with_suffix(".safetensors").unlink(missing_ok=True)


def read_stats(run_dir: str | Path) -> list[dict[str, Any]]:
    """The ``stats.jsonl`` records of a run."""
    path = Path(run_dir) / "stats.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
