"""Floor 2: adapter files on disk → canonical adapters; metadata; SQLite catalog; FAISS vector store.

Public names are imported lazily: scanning a catalog reads headers only and imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdapterHeader": "weights_index.reader",
    "Library": "weights_index.catalog",
    "probe": "weights_index.reader",
    "read_adapter": "weights_index.reader",
    "save_shira": "weights_index.formats.shira",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'weights_index' has no attribute {name!r}")
