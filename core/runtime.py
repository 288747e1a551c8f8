"""What every part of the project shares at run time: the device, the user-facing errors, and
the one-sentence error handling of the command-line tools."""

import argparse
import platform
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from simple_parsing import ArgumentParser, DashVariant
from simple_parsing.help_formatter import TEMPORARY_TOKEN, SimpleHelpFormatter

C = TypeVar("C")
R = TypeVar("R")


class ModelNotAvailableError(RuntimeError):
    """A model could not be loaded (offline, wrong id, missing files)."""


class CorruptFileError(ValueError):
    """A file exists but cannot be read as what it should be (truncated, altered)."""


USER_ERRORS = (ValueError, KeyError, OSError, ModelNotAvailableError)
"""Errors whose message tells a person what to do (the load errors are ValueErrors)."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()}, {counted(torch.get_num_threads(), 'thread')})"


def counted(number: int, noun: str) -> str:
    """ "1 seed", "2 seeds": a count in the words of a message."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def one_line_errors(work: Callable[[], int]) -> int:
    """Run `work`; a user error becomes one `error: ...` line on stderr and exit code 2."""
    try:
        return work()
    except USER_ERRORS as error:
        message = error.args[0] if error.args else repr(error)
        print(f"error: {message}", file=sys.stderr)
        return 2


def parse_config(
    config_type: type[C], argv: Sequence[str] | None, prog: str, description: str | None
) -> C:
    """Parse `argv` into `config_type`: one option per field, its help the field's docstring."""
    parser = ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=_HelpFormatter,
        add_option_string_dash_variants=DashVariant.DASH,
        add_config_path_arg=False,
    )
    parser.add_arguments(config_type, dest="config")
    return parser.parse_args(argv).config


def command(
    config_type: type[C],
    run: Callable[[C], R],
    prog: str,
    description: str | None,
    exit_code: Callable[[R], int] = lambda _: 0,
) -> Callable[[Sequence[str] | None], int]:
    """A command's `main(argv)`: parse the config, run it, turn a user error into one line.

    A config's `__post_init__` may raise ValueError for settings that contradict each other;
    that too is one line.
    """

    def main(argv: Sequence[str] | None = None) -> int:
        return one_line_errors(
            lambda: exit_code(run(parse_config(config_type, argv, prog, description)))
        )

    return main


class _HelpFormatter(SimpleHelpFormatter):
    """States each default once: not when it is None or False (a flag), nor when the help
    names one already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").replace(TEMPORARY_TOKEN, "")
        unstated = action.default in (None, argparse.SUPPRESS) or action.default is False
        if unstated or "default" in text:
            return text
        return f"{text} (default: {action.default})"
