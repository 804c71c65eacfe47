"""The one ``difflab`` command: train, generate, fit-grid, fid, nll, report, dataset, info (also ``python -m difflab``).

Thin: each command is a module here (``difflab.cli.train`` ...) exposing ``add_parser(subparsers)``, which
registers the subcommand and sets ``func`` to a callable taking the parsed ``args``; the work is done by
library functions that tests and Python users call too. Every error is one line on stderr,
``difflab: error: MESSAGE``, with exit status 2: bad values (parse time), a :class:`UserError` from the
library, an OS error while writing (disk full, read-only) and a dead peer under torchrun.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from difflab.cli.options import OneLineParser
from difflab.errors import Stopped, UserError, set_log_level

# module -> exposes add_parser(subparsers); order is the order shown in --help
SUBCOMMAND_MODULES = [
    "difflab.cli.train",
    "difflab.cli.generate",
    "difflab.cli.fit_grid",
    "difflab.cli.fid",
    "difflab.cli.nll",
    "difflab.cli.report",
    "difflab.cli.dataset",
    "difflab.cli.info",
]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="difflab", description="Train, sample and evaluate diffusion models.")
    parser.add_argument("--log-level", "--user_logging_level", dest="log_level", default=None,
                        choices=("debug", "info", "warning", "error"),
                        help="console verbosity: warning hides progress lines, error shows errors only "
                             "(log.txt keeps everything; default info, or $DIFFLAB_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def error_line(e: BaseException) -> str:
    """The one line a failed command prints (without the ``difflab: error:`` prefix)."""
    # A UserError re-raised from a DataLoader worker carries the worker's traceback: keep its last line.
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
    return msg.removeprefix("difflab.errors.UserError: ")


def main(argv: list[str] | None = None) -> None:
    from difflab.distributed import peer_failure_line
    from difflab.runio import os_error_line

    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.log_level:
            set_log_level(args.log_level)
        if not getattr(args, "func", None):
            parser.print_help()
            sys.exit(2)
        if extra and not getattr(args, "parse_known", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if getattr(args, "parse_known", False):
            args.func(args, extra)
        else:
            args.func(args)
    except Stopped as e:  # the loop has written its checkpoint and logged how to resume
        sys.exit(e.exit_code)
    except UserError as e:
        _fail(error_line(e))
    except OSError as e:
        _fail(peer_failure_line(e) or os_error_line(e))
    except RuntimeError as e:
        line = peer_failure_line(e)
        if line is None:
            raise
        _fail(line)
    except KeyboardInterrupt:
        print("difflab: interrupted", file=sys.stderr)
        sys.exit(130)


def _fail(line: str) -> None:
    print(f"difflab: error: {line}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
