"""One exception type for bad user input (DESIGN.md "Errors").

Raise :class:`UserError` with one line that names the file or option and the fix. The CLI prints
``difflab: error: <message>`` and exits with status 2; library callers can catch it. :func:`warn` is the
one-line notice for a fault that was repaired and did not stop the command.
"""


class UserError(Exception):
    """Bad input from the user: a file, an option or a combination that cannot work."""


def warn(message: str) -> None:
    """One line ``difflab: warning: <message>`` on stderr: something was wrong and has been repaired
    (e.g. a damaged cache entry rebuilt); the command goes on."""
    import sys

    print(f"difflab: warning: {message}", file=sys.stderr, flush=True)
