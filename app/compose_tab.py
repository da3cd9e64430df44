"""The Compose tab: a prompt, automatic or hand-picked adapters (weight, schedule, block weights, step window),
method, steps and seed → images in a gallery and a "why these adapters" table.

The adapter editor is a table with one row per picked adapter; its columns map onto
:class:`composer.service.LoraTag` requests. Progress comes from the pipeline's own progress bar (``track_tqdm``).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from composer.service import (
    AUTO,
    DEFAULT_MAX_LORAS,
    ComposerError,
    CompositionService,
    LoraTag,
    adapter_request,
    available_methods,
)

MANUAL = "manual"
EDITOR_HEADERS = ["adapter", "weight", "schedule", "block weights", "start", "stop"]
WHY_HEADERS = ["adapter", "weight", "source", "score", "why"]
DEFAULT_WEIGHT = 0.8
HISTORY = 24
"""Images kept in the result gallery (newest first)."""


def _optional_float(value: Any, column: str, name: str) -> float | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        return float(value)
    except ValueError as exc:
        raise ComposerError(f"adapter {name!r}: {column} {value!r} is not a number") from exc


def adapter_requests(rows: list[list[Any]] | None) -> list[LoraTag]:
    """The editor table's rows as requests (blank rows skipped; numbers checked)."""
    requests = []
    for row in rows or []:
        cells = [*list(row), *[None] * len(EDITOR_HEADERS)][: len(EDITOR_HEADERS)]
        name = str(cells[0] or "").strip()
        if not name:
            continue
        weight = _optional_float(cells[1], "weight", name)
        requests.append(
            adapter_request(
                name=name,
                weight=DEFAULT_WEIGHT if weight is None else weight,
                schedule=str(cells[2] or "").strip() or None,
                block_weights=str(cells[3] or "").strip() or None,
                start=_optional_float(cells[4], "start", name),
                stop=_optional_float(cells[5], "stop", name),
            )
        )
    return requests


def sync_editor(picked: list[str] | None, rows: list[list[Any]] | None) -> list[list[Any]]:
    """One editor row per picked adapter, keeping the edits of rows already there."""
    existing = {str(row[0]): list(row) for row in rows or [] if row and row[0]}
    return [existing.get(name, [name, DEFAULT_WEIGHT, "", "", "", ""]) for name in picked or []]


def why_rows(result: Any) -> list[list[Any]]:
    """The "why these adapters" table of a composition result: the adapters used, then those the prompt names that
    the automatic pick left out (source "left out", with why)."""
    rows = [
        [a.name, a.weight, a.source, None if a.score is None else round(a.score, 4), "; ".join(a.reasons)]
        for a in result.adapters
    ]
    return rows + [[r.name, None, "left out", None, left_out_reason(r)] for r in result.rejected]


def auto_cap(choice: str, most: Any) -> int | None:
    """The 'Most adapters' slider as ``max_loras``: the cap of the automatic pick, None for hand-picked adapters
    (a cap applies only to ``"auto"``)."""
    return int(most or DEFAULT_MAX_LORAS) if choice == AUTO else None


def left_out_reason(rejected: Any) -> str:
    """Why an adapter was left out, with how to include it when the cap was the reason."""
    kept = f" (kept {rejected.lost_to})" if rejected.lost_to else ""
    hint = "; raise 'Most adapters' to include it" if rejected.capped else ""
    return f"{rejected.reason}{kept}{hint}"


def branch_choice(share: float) -> str | float:
    """The slider's unconditional share as ``set_composition(branches=...)``: ``"both"`` at 1, ``"conditional"`` at 0,
    the share itself in between."""
    share = float(share)
    if share >= 1:
        return "both"
    return "conditional" if share <= 0 else share


def branch_label(branches: Any) -> str:
    """How a result's CFG branches are named after its method in captions (nothing for both branches)."""
    if branches == "both":
        return ""
    if branches == "conditional":
        return " (conditional branch)"
    if isinstance(branches, (int, float)):
        return f" (unconditional share {branches:g})"
    return " (per-adapter branches)"


def build(service: CompositionService) -> None:
    """Lay out the Compose tab and wire its events (the Generate click is the ``/generate`` API endpoint)."""
    names = service.adapter_names()
    methods = available_methods()
    with gr.Row():
        with gr.Column(scale=3):
            model = gr.Dropdown(
                service.available_models(),
                value=service.model,
                label="Model (checkpoints in the --models folder)",
                visible=service.models_dir is not None,
                elem_id="model",
            )
            prompt = gr.Textbox(
                label="Prompt",
                lines=2,
                placeholder="zorbex wearing a krwn crown in the snow  (<lora:name:1> tags work too)",
                elem_id="prompt",
            )
            mode = gr.Radio([AUTO, MANUAL], value=AUTO if names else MANUAL, label="Adapters", elem_id="mode")
            picker = gr.Dropdown(names, multiselect=True, label="Pick adapters", visible=not names, elem_id="picker")
            editor = gr.Dataframe(
                headers=EDITOR_HEADERS,
                datatype=["str", "number", "str", "str", "str", "str"],
                type="array",
                interactive=True,
                label="Weights, schedules (0@0,1@0.5), block weights (INS, OUTALL or 1,0,…), start/stop",
                visible=not names,
                elem_id="editor",
            )
            with gr.Row():
                method = gr.Dropdown(methods, value=methods[0], label="Method", elem_id="method")
                steps = gr.Slider(0, 60, value=0, step=1, label="Steps (0 = model default)", elem_id="steps")
                seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                count = gr.Slider(1, 4, value=1, step=1, label="Images", elem_id="count")
                unconditional_share = gr.Slider(
                    0,
                    1,
                    value=1,
                    step=0.05,
                    label="Adapters' weight on CFG's unconditional branch (1: both branches, as pipelines do; "
                    "0: conditional branch only)",
                    elem_id="unconditional-share",
                )
                max_loras = gr.Slider(
                    1,
                    10,
                    value=DEFAULT_MAX_LORAS,
                    step=1,
                    label="Most adapters (auto)",
                    elem_id="max-loras",
                )
            generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=2):
            gallery = gr.Gallery(label="Results", columns=2, format="png", elem_id="gallery")
            summary = gr.Markdown(elem_id="summary")
    why = gr.Dataframe(
        headers=WHY_HEADERS,
        interactive=False,
        wrap=True,
        column_widths=["18%", "9%", "9%", "9%", "55%"],
        label="Why these adapters",
        elem_id="why",
    )
    history = gr.State([])

    def show_editor(choice: str) -> tuple[Any, Any]:
        return gr.update(visible=choice == MANUAL), gr.update(visible=choice == MANUAL)

    def generate(
        text: str,
        choice: str,
        rows: list[list[Any]] | None,
        method_name: str,
        step_count: float,
        seed_value: float,
        images: float,
        share: float,
        most: float,
        past: list[tuple[str, str]],
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 (Gradio's documented idiom)
    ) -> tuple[list[tuple[str, str]], list[list[Any]], str, list[tuple[str, str]]]:
        try:
            adapters = AUTO if choice == AUTO else adapter_requests(rows)
            result = service.compose(
                text,
                adapters,
                method=method_name,
                steps=int(step_count) or None,
                seed=int(seed_value or 0),
                num_images=int(images),
                progress=True,
                branches=branch_choice(share),
                max_loras=auto_cap(choice, most),
            )
        except ComposerError as exc:
            raise gr.Error(str(exc)) from exc
        method_shown = result.method + branch_label(result.branches)
        caption = f"seed {result.seed} · {method_shown}"
        shown = [(str(path), caption) for path in result.paths] + list(past)
        shown = shown[:HISTORY]
        used = ", ".join(f"`{a.name}`" for a in result.adapters) or "none (base model)"
        text_summary = (
            f"**Prompt used:** {result.prompt}\n\n**Adapters:** {used} · **method** {method_shown} · "
            f"{result.steps} steps · seed {result.seed} · {result.seconds:.2f} s"
        )
        if result.rejected:
            left = "; ".join(f"`{r.name}`: {left_out_reason(r)}" for r in result.rejected)
            text_summary += f"\n\n**Left out:** {left}"
        return shown, why_rows(result), text_summary, shown

    def switch_model(name: str) -> str:
        try:
            return f"**Model:** `{service.use_model(name)}` (loaded)"
        except ComposerError as exc:
            raise gr.Error(str(exc)) from exc

    model.change(switch_model, model, summary, api_visibility="private")
    mode.change(show_editor, mode, [picker, editor], api_visibility="private")
    picker.change(sync_editor, [picker, editor], editor, api_visibility="private")
    generate_button.click(
        generate,
        [prompt, mode, editor, method, steps, seed, count, unconditional_share, max_loras, history],
        [gallery, why, summary, history],
        api_name="generate",
    )
