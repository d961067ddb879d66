"""The one user-facing error type: a clear, one-line message that names the culprit and the fix."""

from __future__ import annotations


class QuantkitError(Exception):
    """Bad input or an environment problem the user can fix.

    The message is one line: what is wrong (naming the file, tensor or sample) and what to do.
    Messages name API parameters (``bins``), not command-line flags; ``option`` says which
    parameter is at fault (or, as a tuple, the parameters the fix may use), and the CLI prints
    the matching flags (``--num-bins``) beside it.
    The CLI prints the message without a traceback and exits with ``exit_code``.
    """

    exit_code = 2

    def __init__(self, message: str, *, option: str | tuple[str, ...] | None = None) -> None:
        super().__init__(message)
        self.option = option
