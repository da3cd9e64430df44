"""Floor 4: the public API at this package's root (the mixin, the facade, the service, presets, prompt syntax, image
records, export) and its rooms: :mod:`.cli` (the ``compose`` command), :mod:`.training`, :mod:`.restoration`,
:mod:`.checkpoints` (single-file base models), :mod:`.smoke_presets` (random-weight test pipelines) and
:mod:`.toyworld` (the shipped toy model and its judge).

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
