"""Write ordinary LoRA files that every loader reads: kohya/A1111 names or diffusers names, scale folded in.

Every layer is written as plain ``down``/``up`` factors with its scale folded into ``up`` and no ``alpha`` tensor
(every loader then uses scale 1), so no loader needs our scaling conventions, diffusers' ``lora_adapter_metadata``
or an ``adapter_config.json``. (Writing alpha = rank would also mean scale 1, but diffusers keeps a single alpha for
all attention modules of an SD file, which is wrong as soon as ranks differ between layers.)

- ``kohya``: ``lora_unet_<path_with_underscores>.lora_down.weight`` / ``lora_up.weight``, CLIP layers as
  ``lora_te_text_model_…`` (``lora_te1_`` / ``lora_te2_`` on SDXL). SD 1.x / SD 2 / SDXL only: kohya's Flux names
  are BFL's fused-qkv layout, which per-projection factors cannot express.
- ``diffusers``: ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (``transformer.`` for Flux), CLIP layers as
  ``text_encoder[_2].text_model.<path>…`` — what ``save_lora_weights`` writes and ``load_lora_weights`` reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from fusion.adapters import LowRank
from fusion.errors import AdapterFormatError
from weights_index.safetensors_file import save_atomic

FORMATS = ("kohya", "diffusers")


def _text_path(key: str) -> tuple[str, str]:
    """(component, module path with ``text_model.``) for a ``text_encoder[_2].…`` key."""
    component, _, module = key.partition(".")
    return component, module if module.startswith("text_model.") else f"text_model.{module}"


def _kohya_name(key: str, family: str) -> str:
    if key.startswith(("text_encoder.", "text_encoder_2.")):
        component, module = _text_path(key)
        if component == "text_encoder_2":
            prefix = "lora_te2_"
        else:
            prefix = "lora_te1_" if family == "sdxl" else "lora_te_"
        return prefix + module.replace(".", "_")
    return "lora_unet_" + key.replace(".", "_")


def _diffusers_name(key: str, family: str) -> str:
    if key.startswith(("text_encoder.", "text_encoder_2.")):
        component, module = _text_path(key)
        return f"{component}.{module}"
    return f"{'transformer' if family == 'flux' else 'unet'}.{key}"


def save_lora(
    layers: Mapping[str, LowRank],
    path: str | Path,
    *,
    family: str,
    format: str = "kohya",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``layers`` (canonical key → :class:`LowRank`; text-encoder keys ``text_encoder[_2].…``) as an
    ordinary LoRA file in ``format`` (see the module); returns the path. The write is atomic."""
    if format not in FORMATS:
        raise AdapterFormatError(f"unknown LoRA format {format!r}", path=path, hint=f"use one of {FORMATS}")
    if format == "kohya" and family == "flux":
        raise AdapterFormatError(
            "kohya LoRA names for Flux use BFL's fused qkv layers, which per-projection factors cannot express",
            path=path,
            hint="use --format diffusers (ComfyUI, A1111 Forge and diffusers all read it)",
        )
    tensors: dict[str, torch.Tensor] = {}
    for key, update in layers.items():
        up = update.up.float() * update.scale
        down = update.down.float()
        if format == "kohya":
            name = _kohya_name(key, family)
            tensors[f"{name}.lora_down.weight"] = down.contiguous()
            tensors[f"{name}.lora_up.weight"] = up.contiguous()
        else:
            name = _diffusers_name(key, family)
            tensors[f"{name}.lora_A.weight"] = down.contiguous()
            tensors[f"{name}.lora_B.weight"] = up.contiguous()
    meta = {"format": "pt", "base_family": family, **{str(k): str(v) for k, v in (metadata or {}).items()}}
    return save_atomic(tensors, path, meta)
