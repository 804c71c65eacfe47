"""The one ``difflab`` command. Thin: it parses arguments and calls library functions.

Each subcommand lives in the module that owns its work and exposes ``add_parser(subparsers)``,
which registers the subcommand and sets ``func`` to a callable taking the parsed ``args``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from difflab.errors import UserError

# module -> exposes add_parser(subparsers); order is the order shown in --help
SUBCOMMAND_MODULES = [
    "difflab.cli.train",
    "difflab.cli.generate",
    "difflab.cli.fid",
    "difflab.cli.nll",
    "difflab.cli.dataset",
    "difflab.cli.info",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difflab", description="Train, sample and evaluate diffusion models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # subcommand not built yet
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    if extra and not getattr(args, "parse_known", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "parse_known", False):
            args.func(args, extra)
        else:
            args.func(args)
    except UserError as e:
        # A UserError re-raised from a DataLoader worker carries the worker's traceback: keep its last line.
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        msg = msg.removeprefix("difflab.errors.UserError: ")
        print(f"difflab: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("difflab: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
