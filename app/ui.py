"""The app's page: one tab per job, each built by its own module from the shared composition service."""

from __future__ import annotations

import gradio as gr

from app import analyze_tab, compose_tab, library_tab, restore_tab
from composer.service import CompositionService

TITLE = "LoRA Composer"


def build_ui(service: CompositionService) -> gr.Blocks:
    """The Blocks app: Compose, Library, Restore and Analyze tabs over ``service``."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as blocks:
        gr.Markdown(f"# {TITLE}\nModel `{service.model}` · library `{service.library_root or 'none'}`")
        with gr.Tab("Compose", id="compose"):
            compose_tab.build(service)
        with gr.Tab("Library", id="library"):
            library_tab.build(service)
        with gr.Tab("Restore", id="restore"):
            restore_tab.build(service)
        with gr.Tab("Analyze", id="analyze"):
            analyze_tab.build(service)
    return blocks
