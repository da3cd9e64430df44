"""Composition methods by name: ``method="merge" | "switch" | "composite" | ...`` → a Strategy class.

Each strategy lives in its own module and registers itself with :func:`register`; :func:`get_strategy` imports the
module named in :data:`BUILTIN` on first use, so a method's module loads only when asked for. Importing this
package imports no torch (the CLI lists :data:`BUILTIN` as its ``--method`` choices).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fusion.errors import CompositionError

if TYPE_CHECKING:
    from fusion.strategies.base import Strategy

_BASE_EXPORTS = ("Engine", "StepContext", "Strategy", "WeightSpec")

BUILTIN: dict[str, str] = {
    "merge": "fusion.strategies.merge",
    "switch": "fusion.strategies.switch",
    "composite": "fusion.strategies.composite",
    "cmlora": "fusion.strategies.cmlora",
    "gated": "fusion.strategies.gated",
    "klora": "fusion.strategies.klora",
    "ties": "fusion.strategies.ties",
}
"""Method name → module that defines (and registers) it."""

_REGISTRY: dict[str, type[Strategy]] = {}


def register(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: make a Strategy available as ``method=name``."""

    def decorate(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_strategy(name: str) -> type[Strategy]:
    """The Strategy class registered as ``name`` (importing its built-in module on first use)."""
    if name not in _REGISTRY and name in BUILTIN:
        try:
            importlib.import_module(BUILTIN[name])
        except ModuleNotFoundError as error:
            if error.name != BUILTIN[name]:
                raise
    if name not in _REGISTRY:
        raise CompositionError(
            f"unknown composition method {name!r}", hint=f"choose one of {sorted(set(BUILTIN) | set(_REGISTRY))}"
        )
    return _REGISTRY[name]


def __getattr__(name: str) -> Any:
    if name in _BASE_EXPORTS:
        return getattr(importlib.import_module("fusion.strategies.base"), name)
    raise AttributeError(f"module 'fusion.strategies' has no attribute {name!r}")


__all__ = ["BUILTIN", "Engine", "StepContext", "Strategy", "WeightSpec", "get_strategy", "register"]
