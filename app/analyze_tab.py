"""The Analyze tab: how every retrieval signal scores the library's adapters for a prompt (table and bar chart), and
what a composition did: its weight table weight[adapter, group, step] and, for gated fusion, its gate heatmap.

Each analysis is one section built by its own function; the pictures come from :mod:`composer.analysis.plots`.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import gradio as gr

from composer.analysis import plots
from composer.service import AUTO, ComposerError, CompositionService, adapter_request, available_methods

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
    chart = gr.Image(label="Scores per adapter and signal", format="png", interactive=False, elem_id="score-chart")
    hits = gr.State([])

    def score(text: str, k: float) -> tuple[list[list[Any]], list[dict[str, Any]]]:
        try:
            ranked = service.rank(text, k=int(k))
        except ComposerError as exc:
            raise gr.Error(str(exc)) from exc
        return score_rows(ranked), ranked

    def draw(ranked: list[dict[str, Any]]) -> str | None:
        return None if not ranked else str(score_chart(service, ranked))

    button.click(score, [prompt, top], [table, hits], api_name="scores").then(
        draw, hits, chart, api_visibility="private"
    )
    prompt.submit(score, [prompt, top], [table, hits], api_visibility="private").then(
        draw, hits, chart, api_visibility="private"
    )


def score_chart(service: CompositionService, hits: list[dict[str, Any]]) -> Path:
    """The retrieval score chart of ``hits`` as a PNG in the service's output folder (which the app serves)."""
    names, scores, fused = plots.hit_scores(hits)
    return plots.write_score_chart(names, scores, fused, service.out / "analyze" / f"scores-{uuid.uuid4().hex}.png")


def composition_section(service: CompositionService) -> None:
    """Prompt, adapters (none picked = automatic), method → the image, its weight table and (gated) gate heatmap."""
    gr.Markdown("### Composition: weight table and gates")
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", scale=3, elem_id="plot-prompt")
        picked = gr.Dropdown(
            service.adapter_names(), multiselect=True, label="Adapters (none = auto)", scale=2, elem_id="plot-adapters"
        )
        methods = available_methods()
        method = gr.Dropdown(methods, value=methods[0], label="Method", scale=1, elem_id="plot-method")
        steps = gr.Slider(1, 30, value=4, step=1, label="Steps", scale=1)
        button = gr.Button("Compose and plot", scale=1, elem_id="plot")
    with gr.Row():
        image = gr.Image(label="Image", format="png", interactive=False, elem_id="plot-image")
        weights = gr.Image(label="Weight table", format="png", interactive=False, elem_id="plot-weights")
        gates = gr.Image(label="Gates (gated method)", format="png", interactive=False, elem_id="plot-gates")
    chart = gr.Image(label="Retrieval scores (auto)", format="png", interactive=False, elem_id="plot-scores")

    def compose(
        text: str, names: list[str] | None, method_name: str, step_count: float
    ) -> tuple[str, str | None, str | None, str | None]:
        adapters: Any = [adapter_request(name) for name in names] if names else AUTO
        try:
            result = service.compose(text, adapters, method=method_name, steps=int(step_count), plot=True)
        except ComposerError as exc:
            raise gr.Error(str(exc)) from exc
        found = {kind: str(path) for kind, path in result.plots.items()}
        return str(result.paths[0]), found.get("weights"), found.get("gates"), found.get("scores")

    button.click(compose, [prompt, picked, method, steps], [image, weights, gates, chart], api_name="plots")


SPECTRA_HEADERS = ["adapter", "ΔH", "band", "HF with", "error"]


def spectra_section(service: CompositionService) -> None:
    """CMLoRA frequency analysis: ΔH per adapter (stored in the catalog), the summary chart and each profile."""
    gr.Markdown("### Spectra: high-frequency shift per adapter (CMLoRA order)")
    with gr.Row():
        prompts = gr.Textbox(
            label="Prompts (one per line; empty = defaults)", lines=2, scale=3, elem_id="spectra-prompts"
        )
        steps = gr.Slider(1, 30, value=4, step=1, label="Steps", scale=1)
        button = gr.Button("Measure spectra", scale=1, elem_id="spectra")
    table = gr.Dataframe(headers=SPECTRA_HEADERS, interactive=False, elem_id="spectra-table")
    summary = gr.Image(label="ΔH per adapter", format="png", interactive=False, elem_id="spectra-summary")
    profiles = gr.Gallery(label="Radial profiles", columns=3, elem_id="spectra-profiles")

    def measure(text: str, step_count: float) -> tuple[list[list[Any]], str | None, list[str]]:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        try:
            report = service.spectra(lines, steps=int(step_count))
        except ComposerError as exc:
            raise gr.Error(str(exc)) from exc
        rows = [[a.name, a.delta_h, a.band, a.hf_with, a.error] for a in report.adapters]
        plotted = [str(a.plot) for a in report.adapters if a.plot is not None]
        return rows, None if report.summary_plot is None else str(report.summary_plot), plotted

    button.click(measure, [prompts, steps], [table, summary, profiles], api_name="spectra")


def build(service: CompositionService) -> None:
    """Lay out the Analyze tab."""
    if service.library_root is None:
        gr.Markdown("No library is open: start the app with `--library DIR` to analyze retrieval.")
        return
    retrieval_section(service)
    composition_section(service)
    spectra_section(service)
