"""Frequency analysis of a library (docs/methods.md#cmlora): each adapter's ΔH on the current model, in the catalog.

For a few prompts (one seed), the pipeline generates once without adapters and once with each adapter alone (Merge
at ``weight``); :mod:`fusion.frequency` scores every image's high-frequency content, and the adapter's
``hf_with`` / ``hf_without`` are the means over the prompts, ``delta_h = hf_with − hf_without``. The three numbers go
into the catalog (``Library.update_scores``), where CMLoRA's H/L order and the facade can find them; they are kept
until the file's content changes. Radial profiles are drawn as PNGs: one per adapter (with vs without, the
high-frequency band shaded) and a summary bar chart of ΔH.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from composer.mixin import make_composable
from composer.presets import preset_family
from fusion.errors import ComposerError
from fusion.frequency import CUTOFF, high_frequency_cut, high_frequency_score, radial_profile

DEFAULT_PROMPTS = (
    "a portrait of a person standing in a garden",
    "a city street at night with shop signs",
    "a bowl of fruit on a wooden table",
)
"""Prompts that cover faces, fine structure and plain surfaces."""

SUMMARY_PLOT = "summary.png"


@dataclass
class AdapterAnalysis:
    """One adapter's frequency analysis: its scores, mean radial profile, the plot written, or why it failed."""

    name: str
    delta_h: float | None = None
    hf_with: float | None = None
    hf_without: float | None = None
    profile_with: list[float] = field(default_factory=list)
    plot: Path | None = None
    error: str | None = None

    @property
    def band(self) -> str | None:
        """``"H"`` when the adapter raises high-frequency content (ΔH > 0), ``"L"`` otherwise (CMLoRA's split)."""
        return None if self.delta_h is None else ("H" if self.delta_h > 0 else "L")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready view (profiles left out: they are in the plots)."""
        return {
            "name": self.name,
            "delta_h": self.delta_h,
            "hf_with": self.hf_with,
            "hf_without": self.hf_without,
            "band": self.band,
            "plot": None if self.plot is None else str(self.plot),
            "error": self.error,
        }


@dataclass
class AnalysisReport:
    """What :func:`analyze_library` measured, for the table, ``--json`` and the plots."""

    model: str
    family: str
    prompts: list[str]
    steps: int
    seed: int
    size: int | None
    weight: float
    radii: list[int]
    cut: int
    hf_without: float
    profile_without: list[float]
    adapters: list[AdapterAnalysis]
    summary_plot: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "model": self.model,
            "family": self.family,
            "prompts": self.prompts,
            "steps": self.steps,
            "seed": self.seed,
            "size": self.size,
            "weight": self.weight,
            "cutoff": CUTOFF,
            "cut_radius": self.cut,
            "max_radius": self.radii[-1] if self.radii else None,
            "hf_without": self.hf_without,
            "adapters": [a.to_json() for a in self.adapters],
            "summary_plot": None if self.summary_plot is None else str(self.summary_plot),
        }


def generate(pipe: Any, prompts: list[str], *, steps: int, seed: int, size: int | None) -> torch.Tensor:
    """(P, 3, H, W) images in [0, 1] for ``prompts`` in one batched call, every prompt from the same seed."""
    call: dict[str, Any] = {"num_inference_steps": steps, "output_type": "pt"}
    if size:
        call.update(height=size, width=size)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.inference_mode():
        images = pipe(list(prompts), generator=generator, **call).images
    return torch.as_tensor(images).float().cpu()


def analyze_library(
    library: Any,
    pipe: Any,
    *,
    model: str = "pipeline",
    prompts: list[str] | None = None,
    steps: int = 4,
    seed: int = 0,
    size: int | None = None,
    weight: float = 0.8,
    plot_dir: str | Path | None = None,
) -> AnalysisReport:
    """Score every readable adapter of ``library`` made for ``pipe``'s family; store ΔH; draw plots into
    ``plot_dir`` (when given). A failing adapter is reported with its error; the others go on."""
    pipe = make_composable(pipe)
    pipe.set_progress_bar_config(disable=True)
    pipe.clear_composition()
    family = preset_family(pipe)
    prompts = list(prompts or DEFAULT_PROMPTS)
    without = generate(pipe, prompts, steps=steps, seed=seed, size=size)
    radii, base_profile = radial_profile(without)
    hf_without = float(high_frequency_score(without).mean())
    results: list[AdapterAnalysis] = []
    for entry in library.entries():
        if entry.family not in (family, "unknown") and family != "unknown":
            continue
        result = AdapterAnalysis(entry.name)
        results.append(result)
        if not entry.ok:
            result.error = entry.error
            continue
        try:
            images = _with_adapter(pipe, library, entry.name, weight, prompts, steps, seed, size)
        except ComposerError as error:
            result.error = str(error)
            continue
        result.hf_with = float(high_frequency_score(images).mean())
        result.hf_without = hf_without
        result.delta_h = result.hf_with - hf_without
        result.profile_with = radial_profile(images)[1].mean(0).tolist()
        library.update_scores(
            entry.name, {"delta_h": result.delta_h, "hf_with": result.hf_with, "hf_without": hf_without}
        )
    report = AnalysisReport(
        model=model,
        family=family,
        prompts=prompts,
        steps=steps,
        seed=seed,
        size=size,
        weight=weight,
        radii=radii.tolist(),
        cut=high_frequency_cut(radii),
        hf_without=hf_without,
        profile_without=base_profile.mean(0).tolist(),
        adapters=results,
    )
    if plot_dir is not None:
        write_plots(report, Path(plot_dir))
    return report


def _with_adapter(
    pipe: Any, library: Any, name: str, weight: float, prompts: list[str], steps: int, seed: int, size: int | None
) -> torch.Tensor:
    """Images with only adapter ``name`` merged at ``weight``; the pipeline is left as it was."""
    added = name not in pipe.adapters
    if added:
        pipe.add_adapter(library.read(name, shapes=pipe.model_shapes()), name=name)
    try:
        pipe.set_composition({name: weight}, method="merge")
        return generate(pipe, prompts, steps=steps, seed=seed, size=size)
    finally:
        pipe.clear_composition()
        if added:
            pipe.remove_adapter(name)


def write_plots(report: AnalysisReport, directory: Path) -> None:
    """One PNG per scored adapter (its mean radial profile vs the base model's) and a ΔH summary bar chart."""
    from matplotlib.figure import Figure

    directory.mkdir(parents=True, exist_ok=True)
    radius = [r / max(report.radii[-1], 1) for r in report.radii]
    band_start = report.cut / max(report.radii[-1], 1)
    scored = [a for a in report.adapters if a.delta_h is not None]
    for analysis in scored:
        figure = Figure(figsize=(6, 4), dpi=100)
        axes = figure.add_subplot()
        axes.plot(radius, report.profile_without, label=f"without (HF {report.hf_without:.3f})", color="0.4")
        axes.plot(radius, analysis.profile_with, label=f"with {analysis.name} (HF {analysis.hf_with:.3f})")
        axes.axvspan(band_start, 1.0, color="tab:orange", alpha=0.12, label="high-frequency band")
        axes.set_xlabel("radius / r_max")
        axes.set_ylabel("log|F| / max (radial mean)")
        axes.set_title(f"{analysis.name}: ΔH = {analysis.delta_h:+.4f} → {analysis.band}")
        axes.legend(loc="upper right", fontsize=8)
        figure.tight_layout()
        analysis.plot = directory / f"profile-{_safe(analysis.name)}.png"
        figure.savefig(analysis.plot)
    figure = Figure(figsize=(max(4, 0.8 * len(scored) + 2), 4), dpi=100)
    axes = figure.add_subplot()
    values = [a.delta_h or 0.0 for a in scored]
    colors = ["tab:red" if a.band == "H" else "tab:blue" for a in scored]
    axes.bar([a.name for a in scored], values, color=colors)
    axes.axhline(0.0, color="0.3", linewidth=0.8)
    axes.set_ylabel("ΔH (red: H, blue: L)")
    axes.set_title(f"High-frequency shift per adapter on {report.model}")
    axes.tick_params(axis="x", labelrotation=45)
    figure.tight_layout()
    report.summary_plot = directory / SUMMARY_PLOT
    figure.savefig(report.summary_plot)


def _safe(name: str) -> str:
    """A file name for an adapter name (path separators and odd characters replaced)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "adapter"
