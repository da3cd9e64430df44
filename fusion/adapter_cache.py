"""Host-memory adapter cache: least-recently-used eviction under a byte budget.

Reading an adapter file costs far more than keeping its tensors in RAM, and a server switching between a few hundred
adapters re-reads the same files all day (S-LoRA keeps every adapter in host memory for this reason). Entries are
keyed by what identifies a file's *content* — :func:`file_key` gives (resolved path, size, mtime) — plus whatever
changes how it was read (family, options), so an edited file is never served stale. The cache never opens a file
itself: callers pass the loader.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

from fusion.adapters import Adapter
from fusion.errors import AdapterFormatError

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 4 * 1024**3
"""Default host-memory budget: 4 GiB (~100 typical SDXL rank-32 LoRAs)."""


def file_key(path: str | Path) -> tuple[str, int, int]:
    """(resolved path, size in bytes, mtime in ns) — changes whenever the file is replaced or edited."""
    resolved = os.path.realpath(path)  # never fails, even on a symlink loop
    try:
        info = os.stat(resolved)
    except OSError as exc:
        raise AdapterFormatError(f"cannot read file ({exc.strerror or exc})", path=path) from exc
    return resolved, info.st_size, info.st_mtime_ns


@dataclass(frozen=True)
class CacheStats:
    """Counters for reporting: hits, misses, evictions, entries held and their bytes."""

    hits: int
    misses: int
    evictions: int
    entries: int
    nbytes: int


class AdapterCache:
    """LRU map key → :class:`Adapter`, evicting least-recently-used entries while over ``budget_bytes``.

    An adapter larger than the whole budget is returned but not kept. Safe to share between threads.
    """

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be ≥ 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Hashable, Adapter] = OrderedDict()
        self._nbytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], Adapter]) -> Adapter:
        """The cached adapter for ``key``, or ``load()``'s result (cached if it fits the budget)."""
        with self._lock:
            adapter = self._entries.get(key)
            if adapter is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                return adapter
            self._misses += 1
        adapter = load()
        self.put(key, adapter)
        return adapter

    def put(self, key: Hashable, adapter: Adapter) -> None:
        """Insert (or refresh) an entry, then evict least-recently-used ones until the budget holds."""
        size = adapter.nbytes
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._nbytes -= old.nbytes
            if size > self.budget_bytes:
                return
            self._entries[key] = adapter
            self._nbytes += size
            while self._nbytes > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._nbytes -= evicted.nbytes
                self._evictions += 1
                logger.debug("adapter cache over its budget: evicted %r (%d bytes)", evicted.name, evicted.nbytes)

    def discard(self, key: Hashable) -> None:
        """Drop one entry if present."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._nbytes -= old.nbytes

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def stats(self) -> CacheStats:
        """Current counters."""
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, len(self._entries), self._nbytes)
