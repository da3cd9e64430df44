"""Floor 4: pipelines and presets, the mixin, prompt syntax, training entry points, the CLI and the facade.

Public names are imported lazily so that light entry points (``compose --help``, prompt parsing) do not pay
for importing diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_preset": "composer.presets",
    "preset_family": "composer.presets",
    "KNOWN_MODELS": "composer.presets",
    "ComposableMixin": "composer.mixin",
    "make_composable": "composer.mixin",
    "Composer": "composer.facade",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'composer' has no attribute {name!r}")
