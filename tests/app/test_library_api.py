"""The service behind the Library and Analyze tabs: entries, search, details, rescan and retrieval scores."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from composer.service import CompositionService


@pytest.fixture
def service(demo_library: Path, tmp_path: Path) -> CompositionService:
    library = tmp_path / "library"
    shutil.copytree(demo_library, library, symlinks=True)
    return CompositionService("tiny-sd", library, out=tmp_path / "out")


def test_entries_table_and_previews(service: CompositionService) -> None:
    from app.library_tab import preview_grid, table_rows

    items = service.entries()
    assert [i.name for i in items][:2] == ["corgi_astronaut", "film_grain"]
    rows = table_rows(items)
    corgi = rows[0]
    assert corgi[0] == "corgi_astronaut"
    assert "crgastro" in corgi[6]
    assert corgi[7] == "ok"
    grid = preview_grid(items)
    assert "corgi_astronaut" in [caption for _, caption in grid]
    assert all(Path(p).is_file() for p, _ in grid)


def test_search_details_and_rescan(service: CompositionService) -> None:
    assert service.entries("teapot")[0].name == "golden_teapot"
    details = service.details("watercolor")
    assert "wtrclr" in details["trigger_words"]
    assert details["preview"].endswith("watercolor.preview.png")
    (service.library_root / "style" / "watercolor.safetensors").unlink()
    report = service.rescan()
    assert report["removed"] == ["style/watercolor.safetensors"]
    assert "watercolor" not in [i.name for i in service.entries()]


def test_retrieval_scores_for_a_prompt(service: CompositionService) -> None:
    from app.analyze_tab import score_rows

    hits = service.rank("gldteapot on a table", k=3)
    assert hits[0]["name"] == "golden_teapot"
    row = score_rows(hits)[0]
    assert row[0] == "golden_teapot"
    assert row[2] == 1
    assert "trigger word in prompt" in row[-1]
