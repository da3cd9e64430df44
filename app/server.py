"""Serving the app: bind 127.0.0.1 by default, and let Gradio serve only the library and the output folder.

Gradio serves ``/gradio_api/file=PATH`` for files inside ``allowed_paths`` and inside its own upload/cache folders
(resolving symlinks before the check, so ``..`` and links that leave a folder are refused with 403), except under
``blocked_paths``, which win over both. By default its cache is the machine-wide ``$TMPDIR/gradio`` and
``./.gradio``; here both are moved inside the output folder, so the only folders reachable over HTTP are the library
and the output folder, and the catalog folder inside the library (``.lora-composer/``: the database and extracted
thumbnails) is blocked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import gradio as gr

from app.ui import build_ui
from composer.service import ComposerError, CompositionService


@dataclass
class RunningApp:
    """A started app: its URL (``http://host:port/``), the Gradio Blocks and the service behind it."""

    url: str
    blocks: gr.Blocks
    service: CompositionService

    def close(self) -> None:
        """Stop serving."""
        self.blocks.close()


def served_folders(service: CompositionService) -> list[str]:
    """The folders whose files the app may serve: the library (if any) and the output folder."""
    folders = [str(service.out)]
    if service.library_root is not None:
        folders.insert(0, str(service.library_root))
    return folders


def blocked_folders(service: CompositionService) -> list[str]:
    """Folders never served even inside a served one: the catalog's folder (database, thumbnails)."""
    return [] if service.library_root is None else [str(service.catalog_folder)]


def _private_gradio_cache(service: CompositionService) -> None:
    """Point Gradio's upload and example caches inside the output folder (read when the UI is built)."""
    cache = service.out / ".gradio"
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(cache / "uploads")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(cache / "examples")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def start(
    service: CompositionService, *, host: str = "127.0.0.1", port: int | None = None, quiet: bool = True
) -> RunningApp:
    """Build the UI and serve it in background threads; returns once it answers. ``port=None`` picks a free one."""
    _private_gradio_cache(service)
    service.out.mkdir(parents=True, exist_ok=True)
    blocks = build_ui(service)
    blocks.queue(default_concurrency_limit=service.workers)
    options: dict[str, Any] = {"server_name": host, "prevent_thread_lock": True, "quiet": quiet}
    if port is not None:
        options["server_port"] = port
    try:
        _, url, _ = blocks.launch(
            allowed_paths=served_folders(service),
            blocked_paths=blocked_folders(service),
            ssr_mode=False,
            mcp_server=False,
            **options,
        )
    except OSError as exc:
        raise ComposerError(
            f"cannot serve on {host}:{port}: {exc}", hint="another program holds the port: pass --port N, or --port 0"
        ) from exc
    return RunningApp(url=url, blocks=blocks, service=service)


def serve(service: CompositionService, *, host: str = "127.0.0.1", port: int | None = None) -> None:
    """Serve until interrupted (the `python -m app` entry point)."""
    running = start(service, host=host, port=port, quiet=False)
    try:
        running.blocks.block_thread()
    finally:
        running.close()
