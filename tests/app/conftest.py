"""Fixtures for the app tests: the demo library (built once per session) and the app served on a free port."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

OUTSIDE_TEXT = "secret: this file lives outside the library"


@pytest.fixture(scope="session")
def demo_library(example_library_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo library for tiny-sd, plus a secret file outside it and a symlink inside pointing at that
    file."""
    root = tmp_path_factory.mktemp("app-demo")
    library = root / "library"
    shutil.copytree(example_library_build, library)
    secret = root / "outside" / "secret.png"
    secret.parent.mkdir()
    secret.write_text(OUTSIDE_TEXT)
    (library / "character" / "escape.png").symlink_to(secret)
    return library


@pytest.fixture(scope="session")
def running_app(demo_library: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The app over the demo library with two workers, served on 127.0.0.1 at a free port."""
    from app.server import start
    from composer.service import CompositionService

    service = CompositionService("tiny-sd", demo_library, out=tmp_path_factory.mktemp("app-out"), workers=2)
    service.warm()
    running = start(service)
    yield running
    running.close()
