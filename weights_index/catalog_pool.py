"""Library catalogs opened once per process: every worker, facade and service of a process shares one
:class:`weights_index.catalog.Library` per folder (each operation opens its own SQLite connection, so sharing across
threads is safe), scanned when first opened rather than once per worker."""

from __future__ import annotations

import threading
from pathlib import Path

from weights_index.catalog import Library

_OPEN: dict[tuple[Path, Path | None], Library] = {}
_LOCK = threading.Lock()


def open_library(directory: str | Path, db_path: str | Path | None = None) -> Library:
    """The process's catalog of ``directory`` (opened and incrementally rescanned on the first call)."""
    key = (Path(directory).resolve(), None if db_path is None else Path(db_path).resolve())
    with _LOCK:
        library = _OPEN.get(key)
        if library is None:
            library = Library(directory, db_path=db_path)
            library.scan()
            _OPEN[key] = library
        return library
