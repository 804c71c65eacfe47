"""The CLI's option plumbing, in one place: flags derived from schema dataclasses (:mod:`difflab.options`), the
one ``KEY=VALUE`` override parser, routing of ``--some-option VALUE`` to the method or network that takes it,
and an argparse parser whose every error is one line.

Why a small helper and not tyro or jsonargparse: the flags must keep the spellings users of EDM, SDD and DDPM
already type (``--duration`` for ``duration_kimg``, ``--batch-gpu``, ``--npy_resolution``), unknown
``--key value`` pairs must pass through to the method or network named in the run, and errors must be our one
line; both libraries own the parser and its messages, and either would be a new core dependency. The schema
lives on the dataclasses, so a new option is one field.
"""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any

from difflab.config import parse_value
from difflab.errors import UserError
from difflab.options import Spec, coerce, specs


class OneLineParser(argparse.ArgumentParser):
    """argparse with errors as ``difflab: error: MESSAGE`` (one line, exit status 2) instead of usage + error."""

    def error(self, message: str):
        print(f"difflab: error: {message.splitlines()[0]} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _help(spec: Spec) -> str:
    text = spec.help
    rng = spec.range_text()
    if rng and not spec.choices:
        text = f"{text} ({rng})" if text else rng
    return text or None


class _TupleAction(argparse.Action):
    def __init__(self, *args, spec: Spec, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec = spec

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, coerce(self.spec, " ".join(values)))


def add_schema_arguments(group, cls: type, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> None:
    """One flag per field of schema ``cls`` (see :func:`difflab.options.opt`): its spellings, help and range;
    the value is converted and checked when parsed; unset flags stay None (the preset or run decides)."""
    for name, spec in specs(cls).items():
        if name in skip or (only is not None and name not in only):
            continue
        kw: dict[str, Any] = dict(dest=name, default=None, help=_help(spec))
        if spec.kind is bool and not spec.takes_value:
            kw["action"] = "store_true"
        elif typing.get_origin(spec.kind) is tuple:  # --npy-range LO HI or --npy-range=LO,HI
            kw.update(nargs="+", action=_TupleAction, spec=spec, metavar=spec.metavar or name.upper())
        else:
            kw["type"] = lambda text, spec=spec: coerce(spec, text)
            kw["metavar"] = spec.metavar or ("{" + ",".join(str(c) for c in spec.choices) + "}" if spec.choices
                                             else name.upper())
        group.add_argument(*spec.all_flags, **kw)


def at_least(lo: int, flag: str):
    """An argparse ``type``: an integer >= ``lo`` (one line naming ``flag`` otherwise)."""
    from difflab.options import check_value

    return lambda text: check_value(flag, text, int, min=lo)


def parse_assignments(items: list[str], flag: str, example: str) -> list[tuple[str, Any]]:
    """``["steps=18", "train.lr=2e-4"]`` -> ``[("steps", 18), ("train.lr", 0.0002)]``: the one parser of
    ``-o/--set`` and ``--opt``. Values are JSON when they parse (numbers, true/false, lists), else strings;
    the owner of each key checks it."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} {item!r}: use KEY=VALUE, e.g. {flag} {example}")
        out.append((key.strip().replace("-", "_"), parse_value(value)))
    return out


def snake(key: str) -> str:
    """``sigmoid-start`` / ``lossType`` / ``Shift`` (the SDD and EDM spellings) -> ``sigmoid_start`` etc."""
    out = []
    for i, ch in enumerate(key.replace("-", "_")):
        if ch.isupper() and i > 0 and key[i - 1].islower():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def split_extra(extra: list[str]) -> list[tuple[str, str]]:
    """``["--eta", "10000", "--dropout=0.1"]`` -> ``[("eta", "10000"), ("dropout", "0.1")]``."""
    pairs, i = [], 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--"):
            raise UserError(f"unexpected argument {tok!r}")
        if "=" in tok:
            key, value = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise UserError(f"option {tok} needs a value")
            key, value = tok[2:], extra[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs
