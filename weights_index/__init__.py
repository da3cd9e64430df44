"""Floor 2: adapter files on disk → canonical adapters; metadata; SQLite catalog; FAISS vector store.

Public names are imported lazily: scanning a catalog reads headers only and imports no torch.
"""

from __future__ import annotations

from fusion.lazy_exports import lazy_getattr

_EXPORTS = {
    "AdapterHeader": "weights_index.reader",
    "Library": "weights_index.catalog",
    "probe": "weights_index.reader",
    "read_adapter": "weights_index.reader",
    "save_shira": "weights_index.formats.shira",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
