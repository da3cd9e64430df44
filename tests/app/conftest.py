"""Fixtures for the app tests: the demo library (built once per session), the app served on a free port, and the
HTTP clients that talk to it.

The app is served over plain HTTP on the loopback address, so no certificate is ever checked; an httpx client made
with certificate checks on still loads the machine's certificate store (about 30 ms of CPU), and gradio_client makes
a new httpx client for every request and every file it downloads.

The app tests import the app's tab modules inside the tests, not at the top of their files: importing a tab imports
gradio (3-4 s of CPU), and xdist imports every test file in every worker while collecting, also in a worker that
runs no app test.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import httpx
    from gradio_client import Client

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


@pytest.fixture(scope="session")
def http_client() -> Iterator[httpx.Client]:
    """One httpx client for the plain HTTP requests of the app tests."""
    import httpx

    with httpx.Client() as client:
        yield client


@pytest.fixture
def api_client() -> Callable[..., Client]:
    """A maker of ``gradio_client.Client`` for an app served on loopback (``api_client(url, download_files=...)``),
    with certificate checks off (plain HTTP: there is no certificate to check)."""
    from gradio_client import Client

    def make(url: str, **options: Any) -> Client:
        return Client(url, verbose=False, ssl_verify=False, **options)

    return make
