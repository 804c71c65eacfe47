"""Option schemas: a dataclass whose fields carry :func:`opt` metadata (flag spellings, help, range, choices)
is the one description of a group of options. The CLI derives its flags from it (:mod:`difflab.cli.options`)
and the library validates with it, so a bad value gets the same single line (a :class:`UserError`) from the
command line, from ``-o SECTION.KEY=VALUE``, from a JSON file and from a Python call.

A new training option is one new field of :class:`difflab.config.TrainOptions`: its flag, help text, type
check, range check and ``training_options.json`` round trip follow from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

from difflab.errors import UserError

_UNSET = object()


def opt(help: str = "", flags: tuple[str, ...] = (), min: float | None = None, max: float | None = None,
        gt: float | None = None, lt: float | None = None, choices: tuple | None = None, metavar: str | None = None,
        takes_value: bool = True, check: Any = None) -> dict[str, Any]:
    """Field metadata: ``flags`` are the accepted spellings (the first one names the option in errors; the
    field name with dashes and with underscores is always accepted too); ``min``/``max`` are inclusive bounds,
    ``gt``/``lt`` exclusive ones; ``choices`` the allowed values. A bool with ``takes_value=False`` is a
    switch (``--tf32``); with ``takes_value=True`` it takes ``true``/``false`` (``--cond true``). ``check(value,
    flag)`` is a further test that raises :class:`UserError` (e.g. a seed list that parses)."""
    return {"difflab": dict(help=help, flags=flags, min=min, max=max, gt=gt, lt=lt, choices=choices, metavar=metavar,
                            takes_value=takes_value, check=check)}


@dataclass(frozen=True)
class Spec:
    """One option of a schema: its name, Python type, default and :func:`opt` metadata."""

    name: str
    kind: Any  # int, float, str, bool or tuple[...]; ``optional`` says whether None is allowed
    optional: bool
    default: Any
    help: str = ""
    flags: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    metavar: str | None = None
    takes_value: bool = True
    check: Any = None

    @property
    def flag(self) -> str:
        """The spelling errors name (the first documented flag)."""
        return self.flags[0] if self.flags else "--" + self.name

    @property
    def all_flags(self) -> tuple[str, ...]:
        """Every accepted spelling: the given flags (default ``--field-name``), each with dashes and with
        underscores (``--batch-gpu`` and ``--batch_gpu``)."""
        out = []
        for f in self.flags or ("--" + self.name,):
            out += [f, "--" + f[2:].replace("_", "-"), "--" + f[2:].replace("-", "_")]
        return tuple(dict.fromkeys(out))

    def range_text(self) -> str:
        parts = []
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        for word, bound in (("> ", self.gt), (">= ", self.min), ("< ", self.lt), ("<= ", self.max)):
            if bound is not None:
                parts.append(f"{word}{bound:g}")
        return " and ".join(parts)


def unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, True); ``tuple[float, float]`` -> (tuple[float, float], False)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        return (args[0] if len(args) == 1 else annotation), optional
    return annotation, False


@cache
def specs(cls: type) -> dict[str, Spec]:
    """The options of a schema dataclass, by field name."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kind, optional = unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else _UNSET)
        meta = dict(f.metadata.get("difflab", {}))
        if not meta.get("flags"):  # FLAG_STYLE "_": --sigma_max as EDM spells it; else --keep-checkpoints
            meta["flags"] = ("--" + (f.name if getattr(cls, "FLAG_STYLE", "-") == "_" else f.name.replace("_", "-")),)
        out[f.name] = Spec(f.name, kind, optional or default is None, default, **meta)
    return out


def _type_word(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        return f"{len(typing.get_args(kind))} numbers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))


def coerce(spec: Spec, value: Any, where: str | None = None) -> Any:
    """``value`` (a command-line string, a JSON value or a Python object) as ``spec``'s type, range-checked;
    a :class:`UserError` of one line otherwise. ``where`` names the option in the message (default
    ``FLAG VALUE``)."""
    shown = where or f"{spec.flag} {_show(value)}"
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and spec.kind is not str):
        if spec.optional:
            return None
        raise UserError(f"{shown}: needs {_type_word(spec.kind)}" + (f" ({spec.range_text()})" if spec.range_text()
                                                                      else ""))
    kind = spec.kind
    try:
        value = to_type(kind, value)
    except (TypeError, ValueError):
        rng = spec.range_text()
        raise UserError(f"{shown}: {spec.flag} takes {_type_word(kind)}" + (f" ({rng})" if rng else "")) from None
    check(spec, value, shown)
    return value


def to_type(kind: Any, value: Any) -> Any:
    """Convert to ``kind`` without silent truncation (``2.5`` is no integer, ``[1]`` no number); ValueError."""
    if typing.get_origin(kind) is tuple:
        items = value.replace(",", " ").split() if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or len(items) != len(typing.get_args(kind)):
            raise ValueError(value)
        return tuple(to_type(k, v) for k, v in zip(typing.get_args(kind), items))
    if kind is bool:
        if isinstance(value, bool):
            return value
        low = str(value).lower()
        if low in ("1", "true", "yes", "y", "on"):
            return True
        if low in ("0", "false", "no", "n", "off"):
            return False
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(value)
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    return value


def check(spec: Spec, value: Any, where: str | None = None) -> None:
    """Range and choice checks of an already typed value."""
    shown = where or f"{spec.flag} {value}"
    if spec.check is not None:
        spec.check(value, spec.flag)
    if spec.choices is not None and value not in spec.choices:
        raise UserError(f"{shown}: choose one of {', '.join(str(c) for c in spec.choices)}")
    numbers = value if isinstance(value, tuple) else (value,)
    for x in numbers:
        if isinstance(x, bool) or not isinstance(x, int | float):
            continue
        if isinstance(x, float) and not math.isfinite(x):
            raise UserError(f"{shown}: must be a finite number" + (f" ({spec.range_text()})" if spec.range_text()
                                                                    else ""))
        bad = ((spec.min is not None and x < spec.min) or (spec.max is not None and x > spec.max)
               or (spec.gt is not None and x <= spec.gt) or (spec.lt is not None and x >= spec.lt))
        if bad:
            raise UserError(f"{shown}: must be {spec.range_text()}")


def validate(obj: Any) -> Any:
    """Coerce and check every field of a schema dataclass instance in place; returns it."""
    for name, spec in specs(type(obj)).items():
        value = getattr(obj, name)
        setattr(obj, name, coerce(spec, value, f"{spec.flag} {_show(value)}"))
    return obj


def validate_dict(cls: type, values: dict[str, Any], what: str) -> dict[str, Any]:
    """Coerce and check the entries of ``values`` that ``cls`` describes (others are left to their owner)."""
    table = specs(cls)
    return {k: coerce(table[k], v, f"{what} {table[k].flag} {_show(v)}".strip()) if k in table else v
            for k, v in values.items()}


def _show(value: Any) -> str:
    """A value as the user would have typed it (``nan``, ``-1``, ``[1]``, ``true``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, default=str)


def check_value(flag: str, value: Any, kind: Any = int, **bounds: Any) -> Any:
    """A single library argument (``--batch``, ``--net-batch`` ...) with the schema's checks and messages."""
    spec = Spec(flag.lstrip("-").replace("-", "_"), kind, bounds.pop("optional", False), None, flags=(flag,),
                **bounds)
    return coerce(spec, value)
