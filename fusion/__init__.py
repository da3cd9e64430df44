"""Floor 1: the adapter math inside a denoiser — canonical adapter kinds, composed layers, weight tables, strategies.

Public names are imported lazily so that light entry points (``compose --help``, ``compose index``) that only need
:mod:`fusion.errors` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FAMILIES": "fusion.adapters",
    "Adapter": "fusion.adapters",
    "AdapterKind": "fusion.adapters",
    "Dense": "fusion.adapters",
    "LowRank": "fusion.adapters",
    "Sparse": "fusion.adapters",
    "ComposerError": "fusion.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fusion' has no attribute {name!r}")
