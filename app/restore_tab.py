"""The Restore tab: an uploaded image, restoration adapters (they carry a task prompt such as "remove the rain from
the image") and optional style adapters with weights, method, steps and seed → the restored image and the prompt used.

Runs through :meth:`composer.service.CompositionService.restore`, which borrows one worker's pipeline as an editing
pipeline (Kontext on FLUX.1, img2img / InstructPix2Pix on SD), so concurrent requests stay apart.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from app.compose_tab import DEFAULT_WEIGHT, adapter_requests
from composer.service import ComposerError, CompositionService, adapter_request, available_methods

STYLE_HEADERS = ["adapter", "weight"]
RESTORATION_WEIGHT = 1.0


def style_rows(picked: list[str] | None, rows: list[list[Any]] | None) -> list[list[Any]]:
    """One weight row per picked style adapter, keeping the weights already typed."""
    existing = {str(row[0]): list(row)[: len(STYLE_HEADERS)] for row in rows or [] if row and row[0]}
    return [existing.get(name, [name, DEFAULT_WEIGHT]) for name in picked or []]


def build(service: CompositionService) -> None:
    """Lay out the Restore tab and wire its events (the Restore click is the ``/restore`` API endpoint)."""
    if service.library_root is None:
        gr.Markdown("No library is open: start the app with `--library DIR` to pick restoration adapters.")
        return
    restoration_names = service.restoration_names()
    style_names = [name for name in service.adapter_names() if name not in restoration_names]
    methods = available_methods()
    with gr.Row():
        with gr.Column(scale=3):
            source = gr.Image(type="pil", image_mode="RGB", label="Image to restore", elem_id="restore-input")
            restoration = gr.Dropdown(
                restoration_names,
                multiselect=True,
                label="Restoration adapters (task prompt in their metadata)",
                elem_id="restore-adapters",
            )
            style_picker = gr.Dropdown(style_names, multiselect=True, label="Style adapters", elem_id="restore-style")
            style = gr.Dataframe(
                headers=STYLE_HEADERS,
                datatype=["str", "number"],
                type="array",
                interactive=True,
                label="Style weights",
                elem_id="restore-style-weights",
            )
            task = gr.Textbox(label="Task prompt (blank = the adapters' own)", elem_id="restore-task")
            with gr.Row():
                method = gr.Dropdown(methods, value=methods[0], label="Method", elem_id="restore-method")
                steps = gr.Slider(0, 60, value=0, step=1, label="Steps (0 = default)", elem_id="restore-steps")
                seed = gr.Number(0, precision=0, label="Seed", elem_id="restore-seed")
            button = gr.Button("Restore", variant="primary", elem_id="restore")
        with gr.Column(scale=2):
            restored = gr.Image(label="Restored", format="png", interactive=False, elem_id="restored")
            used = gr.Textbox(label="Task prompt used", interactive=False, elem_id="restore-prompt")

    def restore(
        image: Image.Image | None,
        names: list[str] | None,
        rows: list[list[Any]] | None,
        task_text: str,
        method_name: str,
        step_count: float,
        seed_value: float,
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 (Gradio's documented idiom)
    ) -> tuple[Image.Image, str]:
        if image is None:
            raise gr.Error("upload an image to restore")
        try:
            result = service.restore(
                image,
                [adapter_request(name, RESTORATION_WEIGHT) for name in names or []],
                adapter_requests(rows),
                method=method_name,
                task=task_text,
                steps=int(step_count) or None,
                seed=int(seed_value or 0),
                progress=True,
            )
        except ComposerError as exc:
            raise gr.Error(str(exc)) from exc
        return result.images[0], result.prompt

    style_picker.change(style_rows, [style_picker, style], style, api_visibility="private")
    button.click(restore, [source, restoration, style, task, method, steps, seed], [restored, used], api_name="restore")
