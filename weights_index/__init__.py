"""Floor 2: adapter files on disk → canonical adapters; metadata; SQLite catalog; FAISS vector store.

Public names are imported lazily: scanning a catalog reads headers only and imports no torch.
"""

from __future__ import annotations

from fusion.lazy_exports import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        ".reader": ("AdapterHeader", "probe", "read_adapter"),
        ".catalog": ("Library",),
        ".catalog_pool": ("open_library",),
        ".formats.shira": ("save_shira",),
    },
)
