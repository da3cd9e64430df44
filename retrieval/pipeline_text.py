"""A diffusers pipeline's own CLIP text encoder as the learned retriever's text tower.

The probe encoder is trained to map adapters into a text-embedding space; a pipeline's text encoder has been trained
on that pipeline's captions, so it knows the words its prompts use (open_clip offline has random weights). Any
pipeline with a CLIP ``tokenizer`` and ``text_encoder`` works: SD 1.x/2.x, SDXL (its first encoder) and Flux (its
CLIP encoder). A prompt's vector is the final-layer state of its end-of-text token (``eos``, CLIP's pooled output,
projected when the encoder has a projection) or the mean of its non-padding token states (``mean``).

The :attr:`spec` records the pipeline's name, the pooling and a fingerprint of the encoder's weights, so a checkpoint
trained against one pipeline's text encoder refuses another's (:meth:`PipelineTextEmbedder.check_spec`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from retrieval.text import TextModelError

PIPELINE_KIND = "pipeline"
"""``spec["kind"]`` of a pipeline text tower (open_clip specs carry no kind)."""

POOLINGS = ("eos", "mean")

PIPELINE_PREFIX = "pipeline:"
"""A text-model name ``pipeline:NAME`` asks for the text encoder of the pipeline ``NAME`` (preset, folder, hub id)."""


def pipeline_name(text_model: str | None) -> str | None:
    """``NAME`` of a ``pipeline:NAME`` text-model name, else None (an open_clip architecture)."""
    if text_model is None or not text_model.startswith(PIPELINE_PREFIX):
        return None
    name = text_model.removeprefix(PIPELINE_PREFIX).strip()
    if not name:
        raise TextModelError("empty pipeline name in the text model", hint="use pipeline:NAME, e.g. pipeline:toy-sd")
    return name


def is_pipeline_spec(spec: Mapping[str, Any]) -> bool:
    """True when a text spec (from a checkpoint) names a pipeline's text encoder rather than an open_clip tower."""
    return spec.get("kind") == PIPELINE_KIND


def text_fingerprint(text_encoder: torch.nn.Module) -> str:
    """A short hash of the text encoder's token-embedding weights (fp32): tells one trained encoder from another."""
    weight = text_encoder.get_input_embeddings().weight.detach().float().cpu().contiguous()
    return hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]


class PipelineTextEmbedder:
    """L2-normalised prompt vectors from a pipeline's CLIP text encoder (``pooling``: ``eos`` or ``mean``).

    ``name`` is how the pipeline is loaded again (e.g. ``toy-sd``); it is recorded, not used to load anything.
    """

    def __init__(self, pipe: Any, *, name: str, pooling: str = "eos") -> None:
        tokenizer = getattr(pipe, "tokenizer", None)
        encoder = getattr(pipe, "text_encoder", None)
        if tokenizer is None or encoder is None:
            raise TextModelError(
                f"the pipeline {name!r} has no tokenizer and text_encoder to embed prompts with",
                hint="use an SD 1.x/2.x, SDXL or Flux pipeline, or an open_clip text model",
            )
        config = getattr(encoder, "config", None)
        if getattr(config, "model_type", None) != "clip_text_model":
            raise TextModelError(
                f"the text encoder of {name!r} is a {type(encoder).__name__}, not a CLIP text model",
                hint="only CLIP text encoders are supported as the retriever's text tower",
            )
        if pooling not in POOLINGS:
            raise TextModelError(f"unknown pooling {pooling!r}", hint=f"use one of {', '.join(POOLINGS)}")
        self.tokenizer = tokenizer
        self.model = encoder
        self.name = name
        self.pooling = pooling
        self.fingerprint = text_fingerprint(encoder)
        projection = getattr(config, "projection_dim", None)
        self.dim = int(projection if hasattr(encoder, "text_projection") else config.hidden_size)

    @property
    def spec(self) -> dict[str, Any]:
        """What identifies these embeddings: pipeline name, pooling, width and weight fingerprint."""
        return {
            "kind": PIPELINE_KIND,
            "name": self.name,
            "pooling": self.pooling,
            "dim": self.dim,
            "fingerprint": self.fingerprint,
        }

    def check_spec(self, spec: Mapping[str, Any]) -> None:
        """Raise :class:`TextModelError` unless ``spec`` (from a checkpoint) describes this same text tower."""
        if not is_pipeline_spec(spec) or spec.get("fingerprint") != self.fingerprint:
            raise TextModelError(
                f"the retriever was trained against {spec.get('name')!r}'s text encoder, not {self.name!r}'s",
                hint="query with the pipeline the retriever was trained with, or retrain it (compose train-retriever)",
            )

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], pipe: Any) -> PipelineTextEmbedder:
        """The embedder ``spec`` describes, on ``pipe``'s text encoder (which must be the one it was made from)."""
        embedder = cls(pipe, name=str(spec.get("name")), pooling=str(spec.get("pooling", "eos")))
        embedder.check_spec(spec)
        return embedder

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(len(texts), dim) float32 unit vectors on the CPU."""
        if not texts:
            return torch.empty(0, self.dim)
        device = self.model.device
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
            output = self.model(ids, attention_mask=mask)
            if self.pooling == "mean":
                states = output.last_hidden_state.float()
                weights = mask[..., None].to(states.dtype)
                vectors = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
            elif hasattr(output, "text_embeds"):
                vectors = output.text_embeds.float()
            else:
                vectors = output.pooler_output.float()
            chunks.append(torch.nn.functional.normalize(vectors, dim=-1).cpu())
        return torch.cat(chunks)
