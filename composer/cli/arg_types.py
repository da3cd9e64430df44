"""Argument types for the `compose` command line: each checks one kind of input when it is parsed, so bad input
stops with argparse's usage line and exit code 2 before any model loads or file is written.

Output locations are checked for what can be known up front: a folder option must not name an existing file
(``/dev/null`` included), a file option must not name a folder, and the nearest existing parent of either must be
a writable folder.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

MAX_SEED = 2**32 - 1
"""Seeds are 32-bit, as A1111 and most UIs write them (and every generator accepts them)."""


def seed(text: str) -> int:
    """A seed in [0, :data:`MAX_SEED`]."""
    value = _integer(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..{MAX_SEED}")
    return value


def positive_int(text: str) -> int:
    """An integer ≥ 1 (counts and step numbers: 0 and negatives are refused, never read as a default)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def output_dir(text: str) -> Path:
    """A folder to write into: existing, or creatable under a writable folder; never an existing file."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    _check_writable_parent(path, text)
    return path


def output_file(text: str) -> Path:
    """A file to write: not an existing folder, and its folder existing or creatable under a writable folder."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a regular file")
    _check_writable_parent(path.parent, text)
    return path


def _check_writable_parent(path: Path, text: str) -> None:
    """The nearest existing ancestor of ``path`` (itself included) must be a folder we may write into."""
    current = path.absolute()
    while not current.exists():
        current = current.parent
    if not current.is_dir():
        raise argparse.ArgumentTypeError(f"{text} lies under {current}, which is not a folder")
    if not os.access(current, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: the folder {current} is not writable")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
