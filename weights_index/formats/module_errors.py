"""Errors raised while one module of an adapter file is built, said again with the module and the file named."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fusion.errors import ShapeMismatchError


@contextmanager
def naming_module(module: str, path: Path, kind: str = "module") -> Iterator[None]:
    """Inside the block, a :class:`ShapeMismatchError` (from building one module's update) is raised again naming
    the module, as ``kind`` (e.g. ``"SHiRA module"``), and the file."""
    try:
        yield
    except ShapeMismatchError as exc:
        raise ShapeMismatchError(f"{kind} {module!r}: {exc.reason}", path=path) from exc
