"""One exception type for bad user input, and the console's verbosity (DESIGN.md "Errors").

Raise :class:`UserError` with one line that names the file or option and the fix. The CLI prints
``difflab: error: <message>`` and exits with status 2; library callers can catch it. :func:`warn` is the
one-line notice for a fault that was repaired and did not stop the command; :func:`echo` prints progress
lines (training ticks, "Resuming from ...") at a level, filtered by ``difflab --log-level`` (or the
``DIFFLAB_LOG_LEVEL`` environment variable). Files (``log.txt``) always get every line.
"""

import os
import sys

LOG_LEVELS = ("debug", "info", "warning", "error")
_level = [os.environ.get("DIFFLAB_LOG_LEVEL", "info").lower()]


class UserError(Exception):
    """Bad input from the user: a file, an option or a combination that cannot work."""


class Stopped(Exception):
    """Training stopped by SIGTERM or SIGINT after writing its checkpoint (docs/reliability.md); the message is
    the line that says how to resume. The CLI exits with :attr:`exit_code` (128 + the signal: 143, 130)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


def set_log_level(level: str) -> None:
    """``debug`` | ``info`` (default) | ``warning`` (no progress lines) | ``error`` (errors only)."""
    level = str(level).lower()
    if level not in LOG_LEVELS:
        raise UserError(f"--log-level {level!r}: choose one of {', '.join(LOG_LEVELS)}")
    _level[0] = level


def shows(level: str) -> bool:
    """Whether a line of ``level`` reaches the console at the current verbosity."""
    current = _level[0] if _level[0] in LOG_LEVELS else "info"
    return LOG_LEVELS.index(level) >= LOG_LEVELS.index(current)


def echo(message: str, level: str = "info") -> None:
    """A console line on stdout, if the verbosity shows ``level``."""
    if shows(level):
        print(message, flush=True)


def warn(message: str) -> None:
    """One line ``difflab: warning: <message>`` on stderr: something was wrong and has been repaired
    (e.g. a damaged cache entry rebuilt); the command goes on."""
    if shows("warning"):
        print(f"difflab: warning: {message}", file=sys.stderr, flush=True)
