"""The examples run offline, as scripts, and do what they print."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from make_library import build_library  # noqa: E402  (examples/ is not a package)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("examples") / "library"
    build_library(root)
    return root


def _run(script: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script), *argv])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")


def test_mixin_example_composes_and_restores(library: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    _run("mixin_sd.py", ["--library", str(library), "--out", str(tmp_path)], monkeypatch)
    out = capsys.readouterr().out
    assert "adapters: ['corgi', 'watercolor']" in out
    assert "base weights restored bit-exactly: True" in out
    with Image.open(tmp_path / "mixin_sd.png") as image:
        assert image.size == (64, 64)


def test_auto_compose_example_picks_by_trigger_words(library: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    prompt = "crgastro walking through a neon city"
    _run("auto_compose.py", [prompt, "--library", str(library), "--out", str(tmp_path)], monkeypatch)
    out = capsys.readouterr().out
    assert "- corgi_astronaut @ 0.8" in out
    assert "- neon_city @ 0.8" in out
    assert "trigger word in prompt" in out
    with Image.open(tmp_path / "0-0.png") as image:
        assert "Composition: merge" in image.text["parameters"]
