"""One exception type for bad user input (DESIGN.md "Errors").

Raise :class:`UserError` with one line that names the file or option and the fix. The CLI prints
``difflab: error: <message>`` and exits with status 2; library callers can catch it.
"""


class UserError(Exception):
    """Bad input from the user: a file, an option or a combination that cannot work."""
