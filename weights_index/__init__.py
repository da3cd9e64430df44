"""Floor 2: adapter files on disk → canonical adapters; metadata; SQLite catalog; FAISS vector store."""

from weights_index.catalog import Library
from weights_index.formats.shira import save_shira
from weights_index.reader import AdapterHeader, probe, read_adapter

__all__ = ["AdapterHeader", "Library", "probe", "read_adapter", "save_shira"]
