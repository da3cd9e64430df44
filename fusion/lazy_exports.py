"""Lazy package exports: a package names its public objects and the modules holding them, and each module is
imported only when one of its names is first asked for (so light entry points do not pay for torch or diffusers)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """The module-level ``__getattr__`` for ``package``: it resolves each name of ``exports`` (name → module) by
    importing that module on first use, and raises :class:`AttributeError` for any other name."""

    def resolve(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return resolve
