"""The one user-facing error type: a clear, one-line message that names the culprit and the fix."""

from __future__ import annotations


class QuantkitError(Exception):
    """Bad input or an environment problem the user can fix.

    The message is one line: what is wrong (naming the file, tensor or sample) and what to do.
    The CLI prints it without a traceback and exits with ``exit_code``.
    """

    exit_code = 2
