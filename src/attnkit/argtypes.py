"""Validating ``type=`` callables for command-line options (``argparse`` and
:class:`attnkit.results.Option`), so that a bad value is refused while the arguments are parsed,
before any work, with a one-line message.

Each validator takes the option's text and returns the converted value (paths stay ``str``, as
the experiments and their JSON records expect), or raises ``argparse.ArgumentTypeError``
(argparse prints ``argument --flag: <message>``). Stdlib only.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "positive_int",
    "nonnegative_int",
    "nonnegative_float",
    "existing_file",
    "existing_dir",
    "existing_path",
    "new_or_existing_dir",
    "one_of",
]


def _int(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1."""
    return _int(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """An int >= 0."""
    return _int(text, 0, "an integer >= 0")


def nonnegative_float(text: str) -> float:
    """A finite float >= 0."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def existing_file(text: str) -> str:
    """A path to an existing file (not a directory)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory, expected a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return text


def existing_dir(text: str) -> str:
    """A path to an existing directory."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such directory: {path}")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is not a directory")
    return text


def existing_path(text: str) -> str:
    """A path to an existing file or directory."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {path}")
    return text


def new_or_existing_dir(text: str) -> str:
    """A directory to write into: an existing directory, or a new path whose nearest existing
    ancestor is a directory (so it can be created)."""
    path = Path(text)
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{path} exists and is not a directory")
        return text
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {path}: {parent} is not a directory")
    return text


def one_of(*choices: str, lower: bool = False) -> Callable[[str], str]:
    """A validator accepting exactly one of ``choices`` (after ``str.lower`` when ``lower``)."""
    if not choices:
        raise ValueError("one_of needs at least one choice")

    def check(text: str) -> str:
        value = text.lower() if lower else text
        if value not in choices:
            raise argparse.ArgumentTypeError(
                f"expected one of {', '.join(choices)}, got {text!r}"
            )
        return value

    check.__name__ = "|".join(choices)  # argparse's metavar and "invalid ... value" name
    return check
