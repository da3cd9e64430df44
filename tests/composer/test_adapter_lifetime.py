"""Adapter lifetime in the facade and the app's service: nothing stays registered on a pipeline between requests,
host memory is bounded by the adapter cache's byte budget, an edited file is read again, and the library catalog
is opened once per process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from composer import mixin
from composer.service import CompositionService, adapter_request
from fusion.adapter_cache import AdapterCache
from weights_index import catalog_pool

KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
COUNT = 20
WIDTH = 32  # tiny-sd's first block width


def _write(path: Path, seed: int, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        f"{KEY}.lora_A.weight": torch.randn(4, WIDTH, generator=g) * scale,
        f"{KEY}.lora_B.weight": torch.randn(WIDTH, 4, generator=g) * scale,
    }
    save_file(tensors, str(path))


@pytest.fixture
def library(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    root.mkdir()
    for i in range(COUNT):
        _write(root / f"lora{i:02d}.safetensors", i)
    return root


@pytest.fixture
def small_cache(monkeypatch: pytest.MonkeyPatch) -> AdapterCache:
    one = 4 * WIDTH * 2 * 4  # bytes of one adapter's factors (fp32)
    cache = AdapterCache(budget_bytes=5 * one)
    monkeypatch.setattr(mixin, "ADAPTER_CACHE", cache)
    return cache


def test_memory_stays_bounded_over_20_distinct_adapters(
    library: Path, small_cache: AdapterCache, tmp_path: Path
) -> None:
    service = CompositionService("tiny-sd", library, out=tmp_path / "out")
    pipes: list[Any] = []
    for i in range(COUNT):
        service.compose("a cat", [adapter_request(f"lora{i:02d}", 0.8)], steps=1)
        with service._borrow() as worker:
            pipes.append(worker.pipe)
            assert worker.pipe.adapters == {}, "nothing stays registered between requests"
        assert small_cache.stats.nbytes <= small_cache.budget_bytes
    assert small_cache.stats.entries <= 5
    assert small_cache.stats.evictions >= COUNT - 5


def test_an_edited_file_is_read_again(library: Path, small_cache: AdapterCache, tmp_path: Path) -> None:
    service = CompositionService("tiny-sd", library, out=tmp_path / "out")
    first = service.compose("a cat", [adapter_request("lora00", 1.0)], steps=1, seed=3).images[0]
    path = library / "lora00.safetensors"
    stat = path.stat()
    _write(path, 99, scale=3.0)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    service.rescan()
    second = service.compose("a cat", [adapter_request("lora00", 1.0)], steps=1, seed=3).images[0]
    assert first.tobytes() != second.tobytes(), "the edited adapter was served stale"


def test_the_library_is_opened_once_per_process(library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Path] = []
    real = catalog_pool.Library

    def counting(directory: Path, db_path: Path | None = None) -> Any:
        opened.append(Path(directory))
        return real(directory, db_path=db_path)

    monkeypatch.setattr(catalog_pool, "Library", counting)
    monkeypatch.setattr(catalog_pool, "_OPEN", {})
    service = CompositionService("tiny-sd", library, out=tmp_path / "out", workers=2)
    service.entries()
    held = [service._workers.get() for _ in range(2)]
    assert held[0].library is held[1].library is service._require_library()
    for worker in held:
        service._workers.put(worker)
    assert opened == [library]
