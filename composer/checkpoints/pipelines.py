"""The diffusers pipeline class that runs each base-model family and variant, and how one is assembled from its parts
(an SD 1.x/2.x pipeline without the safety checker and feature extractor it would otherwise ask for)."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DiffusionPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

PIPELINES: dict[tuple[str, str], type[DiffusionPipeline]] = {
    ("sd1", ""): StableDiffusionPipeline,
    ("sd2", ""): StableDiffusionPipeline,
    ("sdxl", ""): StableDiffusionXLPipeline,
    ("flux", "dev"): FluxPipeline,
    ("flux", "schnell"): FluxPipeline,
    ("flux", "kontext"): FluxKontextPipeline,
}
"""(family, variant) → the pipeline class; the variant is "" for the SD families, "dev", "schnell" or "kontext"
for FLUX.1 (as :class:`composer.checkpoints.layout.CheckpointLayout` names them)."""


def assemble_pipeline(cls: type[DiffusionPipeline], parts: dict[str, Any]) -> DiffusionPipeline:
    """``cls`` built from its components ``parts``; a ``StableDiffusionPipeline`` gets no safety checker or feature
    extractor and is told it needs none."""
    if cls is StableDiffusionPipeline:
        parts = {**parts, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return cls(**parts)
