"""What the project's command-line tools share."""

import sys
from collections.abc import Callable

from core.presets import ModelNotAvailableError

USER_ERRORS = (ValueError, KeyError, OSError, ModelNotAvailableError)
"""Errors whose message tells a person what to do (the load errors are ValueErrors)."""


def one_line_errors(work: Callable[[], int]) -> int:
    """Run `work`; a user error becomes one `error: ...` line on stderr and exit code 2."""
    try:
        return work()
    except USER_ERRORS as error:
        message = error.args[0] if error.args else repr(error)
        print(f"error: {message}", file=sys.stderr)
        return 2
