"""Text embeddings for retrieval from an open_clip text tower, built offline.

The architecture is configurable (default ``ViT-B-32``). Weights come from a local file when one is given;
otherwise the tower is randomly initialised under a fixed seed, so the same (name, seed) always gives the same
embeddings — enough for a retriever trained against them, and nothing ever reaches a network. Custom
architectures (e.g. a tiny one for tests) are registered with :func:`register_model_config`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import open_clip
import torch

from fusion.errors import ComposerError

DEFAULT_MODEL = "ViT-B-32"

TINY_MODEL = "lora-composer-tiny-text"
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
"""A 32-wide one-layer text tower (real CLIP vocabulary) that builds in milliseconds: for tests and quick runs."""


class TextModelError(ComposerError):
    """A text tower (open_clip, or a pipeline's text encoder) could not be built, loaded or matched."""


class TextTower(Protocol):
    """What the learned retriever needs of a text tower: :class:`TextEmbedder` or
    :class:`retrieval.pipeline_text.PipelineTextEmbedder`."""

    dim: int

    @property
    def spec(self) -> dict[str, Any]:
        """What identifies the embeddings (recorded in the encoder checkpoint)."""
        ...

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(len(texts), dim) float32 unit vectors on the CPU."""
        ...


def register_model_config(name: str, config: Mapping[str, Any]) -> str:
    """Register an open_clip architecture under ``name`` (idempotent); returns the name."""
    if name in open_clip.list_models():
        return name
    folder = Path(tempfile.mkdtemp(prefix="open-clip-config-"))
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{name}.json")
    return name


def _ensure_known(name: str) -> None:
    if name == TINY_MODEL:
        register_model_config(TINY_MODEL, TINY_CONFIG)
    if name not in open_clip.list_models():
        raise TextModelError(
            f"unknown open_clip architecture {name!r}",
            hint=f"use one of open_clip.list_models(), e.g. {DEFAULT_MODEL}, or register it first",
        )


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def random_init_is_intended(intended: bool = True) -> Iterator[None]:
    """Silence open_clip's root-logger warning about random weights while building a model that is meant to have
    them (offline use without a weights file; callers report that themselves)."""
    if not intended:
        yield
        return
    quiet = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


class TextEmbedder:
    """L2-normalised text embeddings from an open_clip text tower (weights from ``weights`` or random offline).

    ``spec`` (name, weights, seed) is what a trained retriever records so queries use the same embedder.
    """

    def __init__(
        self,
        name: str = DEFAULT_MODEL,
        weights: str | Path | None = None,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        _ensure_known(name)
        self.name = name
        self.weights = None if weights is None else str(Path(weights).expanduser())
        self.seed = seed
        self.device = torch.device(device)
        if self.weights is not None and not Path(self.weights).is_file():
            raise TextModelError(
                "open_clip weights file not found", path=self.weights, hint="pass a local weights file or none"
            )
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                with random_init_is_intended(self.weights is None):
                    model = open_clip.create_model(name, pretrained=self.weights, device=self.device)
            self.tokenizer = open_clip.get_tokenizer(name)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            raise TextModelError(
                f"cannot build open_clip model {name!r}: {exc}",
                path=self.weights,
                hint="check the architecture name and that the weights file matches it",
            ) from exc
        model.visual = None  # only the text tower is used; frees the image tower's memory
        self.model = model.eval().requires_grad_(False)
        self.dim = int(self.model.text_projection.shape[1])

    @property
    def spec(self) -> dict[str, Any]:
        """What identifies these embeddings: architecture, weights file and seed."""
        return {"name": self.name, "weights": self.weights, "seed": self.seed}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], device: str | torch.device = "cpu") -> TextEmbedder:
        """Rebuild the embedder a :attr:`spec` describes."""
        return cls(spec["name"], spec.get("weights"), seed=int(spec.get("seed", 0)), device=device)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(len(texts), dim) float32 unit vectors on the CPU."""
        if not texts:
            return torch.empty(0, self.dim)
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            chunks.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(chunks)
