"""Over HTTP the app serves files inside the library and the output folder only: `..`, absolute paths elsewhere,
symlinks leaving the library and Gradio's machine-wide cache are all refused."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from conftest import OUTSIDE_TEXT


@pytest.fixture
def get_file(running_app, http_client: httpx.Client) -> Callable[..., httpx.Response]:
    """GET a path from the served app's file route (``encode=True`` percent-encodes it first)."""

    def get(path: str, *, encode: bool = False) -> httpx.Response:
        target = quote(path, safe="") if encode else path
        return http_client.get(f"{running_app.url}gradio_api/file={target}", timeout=10)

    return get


def test_binds_loopback_only(running_app) -> None:
    assert running_app.url.startswith("http://127.0.0.1:")


def test_serves_a_preview_inside_the_library(get_file, demo_library: Path) -> None:
    preview = demo_library / "character" / "corgi_astronaut.preview.png"
    response = get_file(str(preview))
    assert response.status_code == 200
    assert response.content == preview.read_bytes()


@pytest.mark.parametrize("encode", [False, True])
def test_refuses_dot_dot_out_of_the_library(get_file, demo_library: Path, encode: bool) -> None:
    escape = f"{demo_library}/character/../../outside/secret.png"
    response = get_file(escape, encode=encode)
    assert response.status_code == 403
    assert OUTSIDE_TEXT not in response.text


def test_refuses_absolute_paths_elsewhere(get_file, demo_library: Path) -> None:
    secret = demo_library.parent / "outside" / "secret.png"
    assert secret.read_text() == OUTSIDE_TEXT
    for path in (str(secret), "/etc/passwd", "/proc/self/environ"):
        response = get_file(path)
        assert response.status_code == 403, path
        assert OUTSIDE_TEXT not in response.text


def test_refuses_symlink_leaving_the_library(get_file, demo_library: Path) -> None:
    link = demo_library / "character" / "escape.png"
    assert link.is_symlink()
    response = get_file(str(link))
    assert response.status_code == 403
    assert OUTSIDE_TEXT not in response.text


def test_refuses_gradio_machine_wide_cache(get_file) -> None:
    shared = Path(tempfile.gettempdir()) / "gradio" / "lora-composer-probe.txt"
    shared.parent.mkdir(exist_ok=True)
    shared.write_text("another app's upload")
    try:
        assert get_file(str(shared)).status_code == 403
    finally:
        shared.unlink()


def test_symlinked_preview_is_not_offered(running_app) -> None:
    service = running_app.service
    assert service.inside_library("character/escape.png") is None
    assert service.inside_library("character/corgi_astronaut.preview.png") is not None
    assert service.inside_library("../outside/secret.png") is None
    assert all(item.preview is None or item.preview.is_relative_to(service.library_root) for item in service.entries())


def test_busy_port_is_a_typed_error(running_app) -> None:
    from urllib.parse import urlparse

    from app.server import start
    from composer.service import ComposerError

    port = urlparse(running_app.url).port
    with pytest.raises(ComposerError, match="--port"):
        start(running_app.service, port=port)


def test_never_serves_the_catalog_folder(get_file, demo_library: Path) -> None:
    catalog = demo_library / ".lora-composer" / "catalog.sqlite"
    assert catalog.is_file()
    for path in (str(catalog), str(catalog.parent), f"{demo_library}/character/../.lora-composer/catalog.sqlite"):
        response = get_file(path)
        assert response.status_code == 403, path
        assert b"SQLite" not in response.content
