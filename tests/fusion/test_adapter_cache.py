"""The host-memory adapter cache: hits, LRU eviction under a byte budget, stale-file detection."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fusion.adapter_cache import AdapterCache, file_key
from fusion.adapters import Adapter, Dense


def _adapter(name: str, numel: int) -> Adapter:
    return Adapter(name, "sd1", {"layer": Dense(torch.zeros(numel))})


def test_lru_eviction_under_budget() -> None:
    cache = AdapterCache(budget_bytes=3 * 400)
    loads: list[str] = []

    def loader(name: str):  # type: ignore[no-untyped-def]
        return lambda: (loads.append(name), _adapter(name, 100))[1]

    for name in ["a", "b", "c"]:
        cache.get(name, loader(name))
    assert cache.get("a", loader("a")).name == "a"
    cache.get("d", loader("d"))
    assert "b" not in cache, "b was least recently used"
    assert "a" in cache
    assert "c" in cache
    assert loads == ["a", "b", "c", "d"]
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.evictions, stats.entries, stats.nbytes) == (1, 4, 1, 3, 1200)
    cache.get("huge", lambda: _adapter("huge", 10_000))
    assert "huge" not in cache, "an adapter bigger than the budget is returned but not kept"


def test_file_key_changes_when_the_file_changes(tmp_path: Path) -> None:
    file = tmp_path / "x.safetensors"
    file.write_bytes(b"abc")
    first = file_key(file)
    os.utime(file, ns=(1, 1))
    assert file_key(file) != first
    assert file_key(tmp_path / "." / "x.safetensors") == file_key(file)
