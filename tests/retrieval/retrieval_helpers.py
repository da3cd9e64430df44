"""Shared builders for retrieval tests: synthetic LoRA adapters and library files in the PEFT layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fusion.adapters import Adapter, LowRank
from weights_index.catalog import Library

CROSS_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
CROSS_V = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
SELF_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TINY_SHAPES = {CROSS_K: (32, 32), CROSS_V: (32, 32), SELF_Q: (32, 32)}
"""Three tiny-sd-shaped layers (out, in): cross-attention keys/values read 32-wide CLIP states."""


def random_lora(name: str, seed: int, *, rank: int = 4, shapes: dict | None = None, family: str = "sd1") -> Adapter:
    """An adapter with seeded random LoRA factors on ``shapes`` (default :data:`TINY_SHAPES`)."""
    generator = torch.Generator().manual_seed(seed)
    layers = {
        key: LowRank(
            down=torch.randn(rank, fan_in, generator=generator),
            up=torch.randn(fan_out, rank, generator=generator),
            alpha=float(rank) / 2,
        )
        for key, (fan_out, fan_in) in (shapes or TINY_SHAPES).items()
    }
    return Adapter(name=name, family=family, layers=layers)


def write_peft(path: Path, adapter: Adapter, metadata: dict | None = None) -> Path:
    """Write ``adapter`` as a diffusers/PEFT LoRA file (``unet.<path>.lora_A/B.weight``) for SD 1.x."""
    tensors = {}
    for key, update in adapter.layers.items():
        tensors[f"unet.{key}.lora_A.weight"] = (update.down * update.scale).contiguous()
        tensors[f"unet.{key}.lora_B.weight"] = update.up.contiguous()
    header = {"modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.sai_model_spec": "1.0.0"}
    for field, value in (metadata or {}).items():
        header[field] = value if isinstance(value, str) else json.dumps(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path


CONCEPTS = {
    "corgi": ("crgastro", "corgi, astronaut, space suit", "character"),
    "castle": ("cstlsea", "castle, ocean, cliff", "background"),
    "scarf": ("redscarf", "scarf, knitted, red", "clothing"),
    "neon": ("neoncity", "city, neon lights, night", "background"),
    "forest": ("mossyforest", "forest, moss, fog", "background"),
    "teapot": ("gldteapot", "teapot, gold, porcelain", "object"),
}
"""name → (trigger word, tags, category) of the small test library."""


def make_library(root: Path, concepts: dict = CONCEPTS) -> Library:
    """Write one seeded random LoRA per concept with ModelSpec metadata, and scan the folder."""
    for seed, (name, (trigger, tags, category)) in enumerate(concepts.items()):
        write_peft(
            root / f"{name}.safetensors",
            random_lora(name, seed),
            {
                "modelspec.title": name.title(),
                "modelspec.trigger_phrase": trigger,
                "modelspec.tags": f"{tags}, {category}",
            },
        )
    library = Library(root)
    library.scan()
    return library


_WORD_TEXT = (
    "a photo of an image picture something scene high quality detailed simple illustration view place thing on "
    "table someone standing drawing best everyday with objects corgi astronaut castle ocean by the in room old "
    "ground painting at night dog house car tree person chair flower city"
)
WORDS = tuple(_WORD_TEXT.split())


def word_encoder(width: int = 32):
    """A fake text encoder: one fixed random state per known word (unknown words: zeros)."""
    vocabulary = {word: torch.randn(width, generator=torch.Generator().manual_seed(i)) for i, word in enumerate(WORDS)}

    def encode(prompt: str) -> torch.Tensor:
        words = prompt.replace(",", " ").split() or [""]
        return torch.stack([vocabulary.get(w, torch.zeros(width)) for w in words])

    encode.vocabulary = vocabulary  # type: ignore[attr-defined]
    return encode


def aligned_lora(name: str, directions: torch.Tensor) -> Adapter:
    """An adapter whose cross-attention down rows span ``directions`` (r × width), as training would push them."""
    up = torch.randn(32, directions.shape[0], generator=torch.Generator().manual_seed(5))
    layers = {key: LowRank(down=directions.clone(), up=up.clone()) for key in (CROSS_K, CROSS_V)}
    return Adapter(name=name, family="sd1", layers=layers)
