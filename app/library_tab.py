"""The Library tab: a preview grid, a table of every adapter, search, rescan, and one adapter's metadata and trigger
words. Previews come from :meth:`CompositionService.entries`, which keeps only files inside the library."""

from __future__ import annotations

from typing import Any

import gradio as gr

from composer.service import ComposerError, CompositionService, LibraryItem

TABLE_HEADERS = ["name", "title", "family", "format", "rank", "category", "trigger words", "status"]


def table_rows(items: list[LibraryItem]) -> list[list[Any]]:
    """One table row per adapter."""
    return [
        [
            item.name,
            item.title,
            item.family,
            item.format or "",
            item.rank,
            item.category or "",
            ", ".join(item.trigger_words),
            "ok" if item.error is None else f"error: {item.error}",
        ]
        for item in items
    ]


def preview_grid(items: list[LibraryItem]) -> list[tuple[str, str]]:
    """Gallery items (preview path, caption) for the adapters that have a preview."""
    return [(str(item.preview), item.name) for item in items if item.preview is not None]


def build(service: CompositionService) -> None:
    """Lay out the Library tab and wire search, rescan and selection."""
    if service.library_root is None:
        gr.Markdown("No library is open: start the app with `--library DIR` to browse your adapters.")
        return
    with gr.Row():
        query = gr.Textbox(label="Search", placeholder="words from names, trigger words, tags…", scale=4)
        search_button = gr.Button("Search", scale=1)
        rescan_button = gr.Button("Rescan folder", scale=1)
    status = gr.Markdown()
    items = service.entries()
    names = gr.State([item.name for item in items])
    grid_names = gr.State([item.name for item in items if item.preview is not None])
    grid = gr.Gallery(preview_grid(items), label="Previews", columns=6, height=260, allow_preview=False)
    table = gr.Dataframe(table_rows(items), headers=TABLE_HEADERS, interactive=False, wrap=True, label="Adapters")
    with gr.Row():
        triggers = gr.Textbox(label="Trigger words", interactive=False, scale=1)
        details = gr.JSON(label="Metadata", scale=2)

    def refresh(text: str) -> tuple[Any, ...]:
        found = service.entries(text)
        return (
            preview_grid(found),
            table_rows(found),
            [i.name for i in found],
            [i.name for i in found if i.preview is not None],
            f"{len(found)} adapter(s)" + (f" matching {text!r}" if text.strip() else ""),
        )

    def rescan(text: str) -> tuple[Any, ...]:
        try:
            report = service.rescan()
        except ComposerError as exc:
            raise gr.Error(str(exc)) from exc
        shown = refresh(text)
        changes = (
            f"rescanned in {report['seconds']:.2f} s: {len(report['added'])} added, {len(report['updated'])} "
            f"updated, {len(report['removed'])} removed, {len(report['broken'])} unreadable"
        )
        return (*shown[:4], changes)

    def describe(name: str) -> tuple[str, dict[str, Any]]:
        document = service.details(name)
        return ", ".join(document.get("trigger_words", [])), document

    def pick_row(shown: list[str], event: gr.SelectData) -> tuple[str, dict[str, Any]]:
        return describe(shown[event.index[0]])

    def pick_preview(shown: list[str], event: gr.SelectData) -> tuple[str, dict[str, Any]]:
        return describe(shown[event.index])

    outputs = [grid, table, names, grid_names, status]
    query.submit(refresh, query, outputs, api_visibility="private")
    search_button.click(refresh, query, outputs, api_visibility="private")
    rescan_button.click(rescan, query, outputs, api_visibility="private")
    table.select(pick_row, names, [triggers, details], api_visibility="private")
    grid.select(pick_preview, grid_names, [triggers, details], api_visibility="private")
