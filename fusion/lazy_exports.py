"""Lazy package exports: a package lists its public names by the module that defines them, and each module is
imported only when one of its names is first asked for (so light entry points do not pay for torch or diffusers)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(package: str, modules: Mapping[str, Sequence[str]]) -> tuple[list[str], Callable[[str], Any]]:
    """``__all__`` and the module-level ``__getattr__`` for ``package``, from ``modules`` (a module name relative to
    ``package``, such as ``".presets"``, → the public names it defines). ``__getattr__`` imports a name's module on
    first use and raises :class:`AttributeError` for any name not listed."""
    home = {name: module for module, names in modules.items() for name in names}

    def resolve(name: str) -> Any:
        if name in home:
            return getattr(importlib.import_module(home[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return sorted(home), resolve
