"""The Analyze tab: how every retrieval signal scores the library's adapters for a prompt.

Each analysis is one section built by its own function, so further views (spectra, gate heatmaps) are added as
sections beside the retrieval scores.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from composer.service import ComposerError, CompositionService

SIGNALS = ("trigger", "metadata", "learned", "zero_shot")
SCORE_HEADERS = ["adapter", "fused score", *(f"{s} rank" for s in SIGNALS), "why"]


def score_rows(hits: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per ranked adapter: fused score, each signal's rank (blank when it did not rank it), reasons."""
    rows = []
    for hit in hits:
        ranks = [hit["signals"].get(s, {}).get("rank") for s in SIGNALS]
        rows.append([hit["name"], round(hit["score"], 4), *ranks, "; ".join(hit["reasons"])])
    return rows


def retrieval_section(service: CompositionService) -> None:
    """Prompt → the ranked adapters with every signal's verdict."""
    gr.Markdown("### Retrieval scores")
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", scale=4, elem_id="analyze-prompt")
        top = gr.Slider(1, 50, value=10, step=1, label="Top k", scale=1)
        button = gr.Button("Score", scale=1, elem_id="analyze")
    table = gr.Dataframe(headers=SCORE_HEADERS, interactive=False, wrap=True, elem_id="scores")

    def score(text: str, k: float) -> list[list[Any]]:
        try:
            return score_rows(service.rank(text, k=int(k)))
        except ComposerError as exc:
            raise gr.Error(str(exc)) from exc

    button.click(score, [prompt, top], table, api_name="scores")
    prompt.submit(score, [prompt, top], table, api_visibility="private")


def build(service: CompositionService) -> None:
    """Lay out the Analyze tab."""
    if service.library_root is None:
        gr.Markdown("No library is open: start the app with `--library DIR` to analyze retrieval.")
        return
    retrieval_section(service)
