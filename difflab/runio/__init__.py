"""Run IO, the one layer that writes files and reads run directories back (DESIGN.md "Run directory"):
:mod:`~difflab.runio.files` (atomic writes, stale temp files, OS errors as one line, output-path checks) and
:mod:`~difflab.runio.checkpoints` (safetensors + JSON checkpoints, ``stats.jsonl``). Everything is importable
from ``difflab.runio`` itself.
"""

from difflab.runio.checkpoints import (
    CHECKPOINT_COUNTERS,
    CKPT_RE,
    check_finite,
    checkpoint_stem,
    is_complete,
    list_checkpoints,
    load_module,
    load_optimizer,
    load_training_state,
    new_checkpoint_stem,
    prune_checkpoints,
    read_checkpoint,
    read_stats,
    resolve_checkpoint,
    save_checkpoint,
    tensor_counters,
)
from difflab.runio.files import (
    append_text,
    archive_run,
    atomic_dir,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    check_file_arg,
    check_folder_arg,
    file_in_the_way,
    mkdir,
    npz_bytes,
    os_error_line,
    os_errors,
    remove_stale_temps,
)

__all__ = ["CHECKPOINT_COUNTERS", "CKPT_RE", "append_text", "archive_run", "atomic_dir", "atomic_write",
           "atomic_write_bytes", "atomic_write_text", "check_file_arg", "check_folder_arg", "checkpoint_stem",
           "file_in_the_way", "list_checkpoints", "load_module", "load_optimizer", "load_training_state", "mkdir",
           "npz_bytes", "os_error_line", "os_errors", "prune_checkpoints", "read_checkpoint", "read_stats",
           "remove_stale_temps", "resolve_checkpoint", "save_checkpoint",
           "check_finite", "is_complete", "new_checkpoint_stem", "tensor_counters"]
