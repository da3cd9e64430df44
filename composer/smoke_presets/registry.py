"""The smoke-test presets by name, and how one is built: every component from its config, the models' weights drawn
from a seed derived from the preset name, so the same name gives bit-identical weights on every run (for a given
torch version)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from composer.checkpoints.pipelines import PIPELINES, assemble_pipeline
from composer.smoke_presets import components
from composer.smoke_presets.components import Components
from composer.smoke_presets.tokenizers import build_clip_tokenizer, build_t5_tokenizer
from fusion.errors import PresetError

PRESET_FORMAT_VERSION = 1
"""Bumped when the way presets are built or saved changes; part of every cache fingerprint."""

_MODEL_BUILDERS: dict[str, Callable[[dict[str, Any]], torch.nn.Module]] = {
    "UNet2DConditionModel": lambda cfg: UNet2DConditionModel(**cfg),
    "FluxTransformer2DModel": lambda cfg: FluxTransformer2DModel(**cfg),
    "AutoencoderKL": lambda cfg: AutoencoderKL(**cfg),
    "CLIPTextModel": lambda cfg: CLIPTextModel(CLIPTextConfig(**cfg)),
    "CLIPTextModelWithProjection": lambda cfg: CLIPTextModelWithProjection(CLIPTextConfig(**cfg)),
    "T5EncoderModel": lambda cfg: T5EncoderModel(T5Config(**cfg)),
}
_OTHER_BUILDERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "clip-tokenizer": lambda cfg: build_clip_tokenizer(**cfg),
    "t5-tokenizer": lambda cfg: build_t5_tokenizer(**cfg),
    "DDIMScheduler": lambda cfg: DDIMScheduler(**cfg),
    "EulerDiscreteScheduler": lambda cfg: EulerDiscreteScheduler(**cfg),
    "FlowMatchEulerDiscreteScheduler": lambda cfg: FlowMatchEulerDiscreteScheduler(**cfg),
}


def _minor(version: str) -> str:
    """``major.minor`` of a version string: releases that may change default initialisation invalidate caches."""
    return ".".join(version.split("+")[0].split(".")[:2])


@dataclass(frozen=True)
class PresetSpec:
    """One built-in preset: its pipeline class, component configs, family and what it is for.

    ``seed_key`` names the weight stream: presets sharing it (Flux and Flux Kontext) share weights.
    """

    name: str
    family: str
    pipeline_class: type[DiffusionPipeline]
    components: Callable[[], Components]
    description: str
    seed_key: str

    @property
    def denoiser_name(self) -> str:
        """The pipeline attribute holding the denoiser: ``unet`` or ``transformer``."""
        return "transformer" if "transformer" in self.components() else "unet"

    def fingerprint(self) -> str:
        """A hash of everything the built weights depend on; a cached copy with another fingerprint is stale."""
        payload = {
            "format": PRESET_FORMAT_VERSION,
            "pipeline": self.pipeline_class.__name__,
            "seed_key": self.seed_key,
            "components": self.components(),
            "versions": [_minor(torch.__version__), _minor(diffusers.__version__), _minor(transformers.__version__)],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _spec(
    name: str, family: str, variant: str, parts: Callable, description: str, seed_key: str | None = None
) -> PresetSpec:
    """Shorthand for a ``PresetSpec`` run by the pipeline class of ``family`` and ``variant``
    (:data:`composer.checkpoints.pipelines.PIPELINES`), whose seed stream is its own name unless ``seed_key`` says
    otherwise."""
    return PresetSpec(name, family, PIPELINES[(family, variant)], parts, description, seed_key or name)


PRESETS: dict[str, PresetSpec] = {
    spec.name: spec
    for spec in (
        _spec("tiny-sd", "sd1", "", components.tiny_sd, "tiny SD 1.x for tests"),
        _spec("tiny-sdxl", "sdxl", "", components.tiny_sdxl, "tiny SDXL for tests"),
        _spec("tiny-flux", "flux", "dev", components.tiny_flux, "tiny FLUX.1 for tests"),
        _spec(
            "tiny-flux-kontext",
            "flux",
            "kontext",
            components.tiny_flux,
            "tiny FLUX.1 Kontext for tests (same weights as tiny-flux)",
            seed_key="tiny-flux",
        ),
        _spec("small-sd", "sd1", "", components.small_sd, "small SD 1.x for CPU benchmarks"),
        _spec(
            "sd15-shapes",
            "sd1",
            "",
            components.sd15_shapes,
            "real SD 1.5 shapes, random weights (5 GB; benchmarks only, see build_denoiser)",
        ),
    )
}
"""Built-in offline presets by name."""


def preset_spec(name: str) -> PresetSpec:
    """The built-in preset called ``name``, or a PresetError listing the names that exist."""
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}", hint=f"use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def _seed(seed_key: str, component: str) -> int:
    """A stable 63-bit seed for one component of one preset (independent of Python's hash randomisation)."""
    digest = hashlib.sha256(f"lora-composer/{seed_key}/{component}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _build_component(spec: PresetSpec, component: str, kind: str, config: dict[str, Any]) -> Any:
    """Build one component; models get weights from their own seed, leaving the global RNG untouched."""
    if kind in _OTHER_BUILDERS:
        return _OTHER_BUILDERS[kind](config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(spec.seed_key, component))
        model = _MODEL_BUILDERS[kind](config)
    return model.eval()


def build_preset(name: str) -> DiffusionPipeline:
    """Build a built-in preset in memory (no cache) on CPU with seeded weights, bit-identical on every call."""
    spec = preset_spec(name)
    parts = {part: _build_component(spec, part, kind, cfg) for part, (kind, cfg) in spec.components().items()}
    return assemble_pipeline(spec.pipeline_class, parts)


def build_tokenizers(name: str) -> dict[str, Any]:
    """Build only the tokenizers of a built-in preset, by component name (``tokenizer``, ``tokenizer_2``).

    ``load_preset`` passes them to ``from_pretrained`` instead of reading the copies saved in the cache: building the
    offline CLIP tokenizer takes about 40 ms, parsing its saved ``tokenizer.json`` back about 500 ms (2 cores), and
    both read text alike.
    """
    spec = preset_spec(name)
    return {
        part: _OTHER_BUILDERS[kind](config)
        for part, (kind, config) in spec.components().items()
        if kind.endswith("-tokenizer")
    }


def build_denoiser(name: str) -> torch.nn.Module:
    """Build only the denoiser (UNet or Flux transformer) of a built-in preset, with the same weights as the pipeline.

    This is the cheap way to get real SD 1.5 shapes for benchmarks: ``build_denoiser("sd15-shapes")``.
    """
    spec = preset_spec(name)
    kind, config = spec.components()[spec.denoiser_name]
    return _build_component(spec, spec.denoiser_name, kind, config)
