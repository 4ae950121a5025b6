"""The one exception type for mistakes a user can fix.

The CLI prints a `KdcliError` as one red line (plus its hint) and exits with `exit_code`; anything else is a
bug and gets a traceback only under `--debug`.
"""

from __future__ import annotations

USAGE = 2  # bad arguments, recipe or input files: the user must change the command
FAILED = 1  # the run itself failed


class KdcliError(Exception):
    """A user-facing error: `message` says what is wrong and where, `hint` what to do about it."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = USAGE):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"
