"""The plots one composed generation leaves behind: the retrieval scores of the adapters it was given, its weight
table and (gated fusion) its gates. Light to import: matplotlib loads only when a plot is written."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class RunPlotData:
    """What a generation leaves for its plots: the weight table and (gated) the gate recorder."""

    table: torch.Tensor | None = None
    adapters: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    recorder: Any = None


def write_run_plots(
    stem: Path,
    method: str,
    data: RunPlotData,
    ranked: str | None = None,
    rank: Callable[[str, int], list[dict[str, Any]]] | None = None,
) -> dict[str, Path]:
    """Write ``<stem>-scores.png`` (retrieval scores per adapter and signal, when ``ranked`` holds the prompt the
    adapters were retrieved for and ``rank(prompt, k)`` scores it), ``<stem>-weights.png`` (the weight table) and
    ``<stem>-gates.png`` (gated); returns the written files by kind."""
    from composer.analysis import plots

    written: dict[str, Path] = {}
    if ranked is not None and rank is not None:
        names, scores, fused = plots.hit_scores(rank(ranked, plots.SCORE_TOP_K))
        written["scores"] = plots.write_score_chart(
            names, scores, fused, f"{stem}-scores.png", title=f"retrieval: {ranked}"
        )
    if data.table is not None:
        written["weights"] = plots.write_weight_table(
            data.table, data.adapters, data.groups, f"{stem}-weights.png", title=f"weight ({method})"
        )
    if data.recorder is not None:
        from composer.training.gates import write_gate_heatmap

        written["gates"] = write_gate_heatmap(data.recorder, f"{stem}-gates.png")
    return written
