"""Pictures of a composition: retrieval scores per adapter and signal, and the weight table weight[adapter, group,
step].

Arrays in, PNG files out (matplotlib's Agg backend, no display needed). The CLI's ``--plot DIR`` and the app's
Analyze tab draw with these; gate heatmaps reuse :func:`composer.training.gates.write_gate_heatmap`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from fusion.errors import CompositionError

SIGNALS = ("trigger", "metadata", "learned", "zero_shot")
"""The retrieval signals, in the order :class:`retrieval.retriever.Retriever` fuses them."""
DPI = 100
SCORE_TOP_K = 10
"""How many ranked adapters a score chart shows."""


def hit_scores(hits: Sequence[Mapping[str, Any]]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Ranked hits (``RankedHit.to_json()`` dicts) → (names, raw signal scores (N, len(SIGNALS)) with NaN where a
    signal did not score the adapter, fused scores (N,))."""
    names = [str(hit["name"]) for hit in hits]
    scores = torch.full((len(hits), len(SIGNALS)), math.nan)
    for row, hit in enumerate(hits):
        for column, signal in enumerate(SIGNALS):
            verdict = hit.get("signals", {}).get(signal)
            if verdict is not None:
                scores[row, column] = float(verdict["score"])
    fused = torch.tensor([float(hit["score"]) for hit in hits])
    return names, scores, fused


def _save(figure: Figure, path: str | Path) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=DPI)
    return target


def write_score_chart(
    names: Sequence[str], scores: torch.Tensor, fused: torch.Tensor, path: str | Path, *, title: str = ""
) -> Path:
    """Bar charts of retrieval scores: one panel for the fused score and one per signal (each on its own scale,
    since BM25, cosine and z-scores are not comparable); an adapter a signal did not score has no bar there."""
    values = scores.detach().float().cpu().numpy()
    panels = [("fused (RRF)", fused.detach().float().cpu().numpy())] + [
        (signal, values[:, column]) for column, signal in enumerate(SIGNALS)
    ]
    count = max(len(names), 1)
    figure = Figure(figsize=(2.0 + 2.6 * len(panels), 1.2 + 0.32 * count), constrained_layout=True)
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    positions = np.arange(len(names))
    for index, (axis, (label, column)) in enumerate(zip(axes, panels)):
        shown = np.where(np.isnan(column), 0.0, column)
        colors = ["0.75" if np.isnan(v) else ("tab:blue" if index == 0 else "tab:orange") for v in column]
        axis.barh(positions, shown, color=colors)
        axis.set_title(label, fontsize=9)
        axis.axvline(0.0, color="0.3", linewidth=0.6)
        axis.tick_params(axis="x", labelsize=7)
    axes[0].set_yticks(positions)
    axes[0].set_yticklabels(list(names), fontsize=8)
    axes[0].invert_yaxis()
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def write_weight_table(
    table: torch.Tensor, adapters: Sequence[str], groups: Sequence[str], path: str | Path, *, title: str = "weight"
) -> Path:
    """The weight table (A, G, S) as one heatmap per adapter: layer groups (rows) × steps (columns), colour = weight
    (one shared colour scale, so adapters compare)."""
    values = table.detach().float().cpu().numpy()
    if values.ndim != 3 or values.shape[:2] != (len(adapters), len(groups)):
        raise CompositionError(
            f"weight table of shape {tuple(values.shape)} does not match {len(adapters)} adapters × "
            f"{len(groups)} groups × steps"
        )
    count, rows, steps = values.shape
    figure = Figure(figsize=(2.2 + 2.4 * max(count, 1), 1.5 + 0.16 * rows), constrained_layout=True)
    axes = figure.subplots(1, max(count, 1), squeeze=False)[0]
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if low == high:
        low, high = low - 0.5, high + 0.5
    image = None
    for index, axis in enumerate(axes[:count]):
        image = axis.imshow(values[index], aspect="auto", interpolation="nearest", vmin=low, vmax=high, cmap="magma")
        axis.set_title(adapters[index], fontsize=9)
        axis.set_xlabel("step")
        axis.set_xticks(range(steps))
        axis.set_yticks(range(rows))
        axis.set_yticklabels(list(groups) if index == 0 else [""] * rows, fontsize=6)
    if image is not None:
        figure.colorbar(image, ax=list(axes), label=title)
    return _save(figure, path)
