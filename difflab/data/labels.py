"""Class labels for file-based sources (docs/data.md "Labels").

Rules, in order, for ``label_rule="auto"``:

1. ``dataset.json`` at the source root (EDM): ``{"labels": [[relpath, int], ...]}`` labels every
   file; ``{"labels": null}`` means unlabelled. Every file must be listed and every listed file must
   exist, otherwise a UserError names the first offender.
2. Top-level folders: when every file lies inside a top-level folder and there are at least two of
   them, the sorted folder names are the classes (``cat/1.png`` -> index of ``cat``). Numbered
   shard layouts -- EDM's dataset tool (``00000/img00000000.png``) and ``generate --subdirs``
   (``001000/001234.png``) -- are recognised and never taken as classes.
3. File-name prefix (DDDM / improved-diffusion): the part of the base name before the first ``_``
   (``mylabel_001.png`` -> ``mylabel``); used when every base name has an ``_`` and there are at
   least two distinct prefixes. Sorted prefixes are the classes.
4. Otherwise the source is unlabelled (label -1).

``label_rule`` may force one rule: ``"json"``, ``"folders"``, ``"prefix"`` or ``"none"``.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any

import numpy as np

from difflab.errors import UserError

LABEL_RULES = ("auto", "json", "folders", "prefix", "none")
_EDM_LAYOUT = re.compile(r"^(\d{5})/img(\d{8})\.[A-Za-z]+$")
_SEED_LAYOUT = re.compile(r"^(\d{6})/(\d{6,})\.[A-Za-z]+$")
_MISSING = object()


def parse_dataset_json(text: bytes | str, where: str) -> Any:
    """Return the ``labels`` entry of a dataset.json (a dict relpath -> int, or None), plus the
    optional ``label_names`` list written by ``difflab dataset convert``."""
    try:
        meta = json.loads(text)
        labels = meta["labels"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f'{where}: not a valid dataset.json ({e!r}); expected {{"labels": [[path, int], ...]}}'
        ) from None
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if labels is None:
        return None, names
    table: dict[str, int] = {}
    for entry in labels:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise UserError(f"{where}: label entry {entry!r} is not [path, int]")
        value = entry[1]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"{where}: label of {entry[0]!r} is {value!r}; difflab needs a class index >= 0")
        table[entry[0].replace("\\", "/")] = value
    return table, names


def _is_edm_layout(relpaths: list[str]) -> bool:
    """EDM's dataset-tool layout ``00000/img00000123.png`` or generate's ``--subdirs`` layout
    ``001000/001234.png``: numbered shards, not classes."""
    for p in relpaths:
        m = _EDM_LAYOUT.match(p)
        if m and m.group(2).startswith(m.group(1)):
            continue
        m = _SEED_LAYOUT.match(p)
        if m and int(m.group(2)) - int(m.group(2)) % 1000 == int(m.group(1)):
            continue
        return False
    return True


def _by_names(keys: list[str]) -> tuple[np.ndarray, list[str]]:
    names = sorted(set(keys))
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[k] for k in keys], dtype=np.int64), names


def assign_labels(
    relpaths: list[str], dataset_json: Any = _MISSING, rule: str = "auto", where: str = "source"
) -> tuple[np.ndarray, list[str] | None, str]:
    """Labels for ``relpaths`` (posix, relative to the source root).

    ``dataset_json`` is the parsed result of :func:`parse_dataset_json` or absent. Returns
    ``(labels int64 [N] with -1 = none, label_names or None, rule used)``.
    """
    if rule not in LABEL_RULES:
        raise UserError(f"--labels {rule!r} is unknown; use one of {', '.join(LABEL_RULES)}")
    n = len(relpaths)
    none = np.full(n, -1, dtype=np.int64)
    if rule == "none":
        return none, None, "none"

    if rule in ("auto", "json"):
        if dataset_json is not _MISSING:
            table, names = dataset_json
            if table is None:
                return none, None, "json"
            missing = [p for p in relpaths if p not in table]
            if missing:
                raise UserError(
                    f"{where}/dataset.json lists {len(table)} labels but has none for {missing[0]!r} "
                    f"({len(missing)} of {n} files unlabelled); fix dataset.json or pass --labels none"
                )
            extra = set(table) - set(relpaths)
            if extra:
                raise UserError(
                    f"{where}/dataset.json has {len(table)} labels for {n} files; {sorted(extra)[0]!r} "
                    f"is not in the source ({len(extra)} such entries); fix dataset.json"
                )
            labels = np.array([table[p] for p in relpaths], dtype=np.int64)
            return labels, (list(names) if names else None), "json"
        if rule == "json":
            raise UserError(f"{where}: --labels json but the source has no dataset.json")

    if rule in ("auto", "folders"):
        tops = [p.split("/", 1)[0] if "/" in p else None for p in relpaths]
        usable = None not in tops and len(set(tops)) >= 2 and not _is_edm_layout(relpaths)
        if usable:
            labels, names = _by_names(tops)
            return labels, names, "folders"
        if rule == "folders":
            raise UserError(f"{where}: --labels folders needs every file inside one of >= 2 top-level folders")

    if rule in ("auto", "prefix"):
        bases = [posixpath.basename(p) for p in relpaths]
        usable = bool(bases) and all("_" in b for b in bases)
        prefixes = [b.split("_", 1)[0] for b in bases] if usable else []
        if usable and len(set(prefixes)) >= 2:
            labels, names = _by_names(prefixes)
            return labels, names, "prefix"
        if rule == "prefix":
            raise UserError(f"{where}: --labels prefix needs file names like label_XXX.png with >= 2 labels")
    return none, None, "none"
