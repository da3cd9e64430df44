"""The service only pools Composer workers: ranking reuses the worker's retriever, and restoration through the
service takes adapters from the library by name only, as composition does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from composer.prompts import LoraTag
from composer.service import CompositionService
from fusion.errors import UnsafePathError
from retrieval import retriever


def test_ranking_keeps_one_retriever_per_worker(
    demo_library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Any] = []
    original = retriever.Retriever.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(retriever.Retriever, "__init__", counting)
    service = CompositionService("tiny-sd", demo_library, out=tmp_path)
    first = service.rank("a corgi astronaut", k=3)
    assert service.rank("a corgi astronaut", k=3) == first
    service.rank("a golden teapot", k=3)
    assert len(built) == 1
    assert [hit["name"] for hit in first][:1] == ["corgi_astronaut"]


def test_restoring_through_the_service_refuses_file_paths(demo_library: Path, tmp_path: Path) -> None:
    adapter = next(demo_library.rglob("*.safetensors"))
    service = CompositionService("tiny-sd", demo_library, out=tmp_path / "out")
    image = Image.new("RGB", (32, 32), (90, 120, 200))
    for name in (str(adapter), f"../{demo_library.name}/{adapter.relative_to(demo_library).as_posix()}"):
        with pytest.raises(UnsafePathError, match="file paths are not accepted"):
            service.restore(image, [LoraTag(name, 1.0)], task="restore it", steps=2)
    assert not (tmp_path / "out").exists()
