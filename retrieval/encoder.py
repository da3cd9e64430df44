"""The AutoLoRA probe encoder: an adapter's weights → one embedding in a text-embedding space.

Per adapted layer ℓ a learnable probe X_ℓ (P×in, P = 16) is pushed through the layer's update, computed from its
factors as (X·downᵀ)·upᵀ·scale so ΔW is never formed; token_ℓ = a per-layer-type linear projection (to width d) of
LN(X_ℓ·ΔW_ℓᵀ) flattened, plus a learned embedding of the layer's position. One more token carries the adapter's
spectral features (:mod:`retrieval.features`). The tokens and a learnable summary token go through a small
transformer; the summary token → LN → linear is the adapter's embedding, trained to match text embeddings of its
description (:mod:`retrieval.training`).

The layer vocabulary (key → input and output width) is fixed when the encoder is built from a library; layers an
adapter has outside it are ignored. Checkpoints are safetensors files with the configuration in their metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fusion.adapters import Adapter, AdapterKind, LowRank
from fusion.errors import ComposerError
from retrieval.features import FEATURE_DIM, layer_type, spectral_features

CHECKPOINT_FORMAT = "lora-composer-probe-encoder/1"


class CheckpointError(ComposerError):
    """A retriever checkpoint is missing, unreadable, or does not fit the encoder it is loaded into."""


@dataclass
class EncoderConfig:
    """Shape of a :class:`ProbeEncoder`: its layer vocabulary, widths and the text space it maps into."""

    layers: dict[str, tuple[int, int]]
    """Layer key → (flattened input width, output width)."""
    out_dim: int
    dim: int = 128
    depth: int = 2
    heads: int = 4
    probes: int = 16
    family: str = "unknown"
    text: dict[str, Any] = field(default_factory=dict)
    """The text embedder's spec (see :attr:`retrieval.text.TextEmbedder.spec`)."""

    def to_json(self) -> str:
        """JSON text of every field."""
        data = asdict(self)
        data["layers"] = {k: list(v) for k, v in self.layers.items()}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EncoderConfig:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        data["layers"] = {k: (int(v[0]), int(v[1])) for k, v in data["layers"].items()}
        return cls(**data)


def layer_shapes(adapter: Adapter) -> dict[str, tuple[int, int]]:
    """(flattened input width, output width) of every layer of an adapter (denoiser and text encoders)."""
    return {key: update_shape(update) for key, update in adapter.all_layers()}


def update_shape(update: AdapterKind) -> tuple[int, int]:
    """(flattened input width, output width) of one layer update."""
    shape = update.shape
    return (math.prod(shape[1:]), int(shape[0]))


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter reduced to what the encoder reads: per vocabulary layer, factors (or a dense ΔW), and features.

    Each entry is (vocabulary index, down (r×in) or ΔW (out×in), up (out×r) with the scale folded in, or None).
    """

    layers: tuple[tuple[int, torch.Tensor, torch.Tensor | None], ...]
    spectral: torch.Tensor

    def to(self, device: torch.device | str) -> PreparedAdapter:
        """A copy on ``device``."""
        return PreparedAdapter(
            tuple((i, d.to(device), None if u is None else u.to(device)) for i, d, u in self.layers),
            self.spectral.to(device),
        )


class ProbeEncoder(nn.Module):
    """Probes through each layer's ΔW → per-type projections → transformer with a summary token → embedding."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.keys = sorted(config.layers)
        self.index = {key: i for i, key in enumerate(self.keys)}
        types = sorted({self._type(key) for key in self.keys})
        self.type_of = [types.index(self._type(key)) for key in self.keys]
        self.probes = nn.ParameterList(
            nn.Parameter(torch.randn(config.probes, config.layers[key][0]) / math.sqrt(config.layers[key][0]))
            for key in self.keys
        )
        self.projections = nn.ModuleList(
            nn.Linear(config.probes * int(name.rsplit(":", 1)[1]), config.dim) for name in types
        )
        self.position = nn.Parameter(torch.randn(len(self.keys), config.dim) * 0.02)
        self.summary = nn.Parameter(torch.randn(1, config.dim) * 0.02)
        self.spectral = nn.Sequential(nn.LayerNorm(FEATURE_DIM), nn.Linear(FEATURE_DIM, config.dim))
        block = nn.TransformerEncoderLayer(
            config.dim, config.heads, 4 * config.dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(block, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.out_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        """Learnable temperature of the contrastive loss (CLIP's initial 0.07)."""

    def _type(self, key: str) -> str:
        return f"{layer_type(key)}:{self.config.layers[key][1]}"

    def prepare(self, adapter: Adapter) -> PreparedAdapter:
        """Keep the adapter's vocabulary layers of the expected shape as fp32 factors; compute its features."""
        layers = []
        for key, update in adapter.all_layers():
            position = self.index.get(key)
            if position is None or update_shape(update) != self.config.layers[key]:
                continue
            if isinstance(update, LowRank):
                down = update.down.flatten(1).float()
                up = update.up.flatten(1).float() * update.scale
                layers.append((position, down, up))
            else:
                delta = update.delta(torch.float32)
                layers.append((position, delta.reshape(delta.shape[0], -1), None))
        return PreparedAdapter(tuple(layers), spectral_features(adapter))

    def tokens(self, adapter: PreparedAdapter) -> torch.Tensor:
        """(1 + layers, d) tokens of one adapter: the spectral token, then one per vocabulary layer it has."""
        out = [self.spectral(adapter.spectral[None])]
        for position, down, up in adapter.layers:
            probe = self.probes[position]
            response = probe @ down.T if up is None else (probe @ down.T) @ up.T
            response = nn.functional.layer_norm(response, response.shape[-1:])
            token = self.projections[self.type_of[position]](response.reshape(1, -1)) + self.position[position]
            out.append(token)
        return torch.cat(out)

    def forward(self, batch: list[PreparedAdapter]) -> torch.Tensor:
        """(B, out_dim) embeddings (not normalised) of a batch of prepared adapters."""
        sequences = [torch.cat([self.summary, self.tokens(adapter)]) for adapter in batch]
        length = max(len(s) for s in sequences)
        padded = torch.zeros(len(batch), length, self.config.dim, device=self.summary.device)
        mask = torch.ones(len(batch), length, dtype=torch.bool, device=self.summary.device)
        for i, sequence in enumerate(sequences):
            padded[i, : len(sequence)] = sequence
            mask[i, : len(sequence)] = False
        hidden = self.transformer(padded, src_key_padding_mask=mask)
        return self.head(self.norm(hidden[:, 0]))

    @torch.no_grad()
    def embed(self, adapters: list[Adapter], batch_size: int = 32) -> torch.Tensor:
        """(N, out_dim) unit-norm embeddings of adapters, on the CPU (eval mode)."""
        was_training = self.training
        self.eval()
        device = self.summary.device
        chunks = []
        for start in range(0, len(adapters), batch_size):
            prepared = [self.prepare(a).to(device) for a in adapters[start : start + batch_size]]
            chunks.append(nn.functional.normalize(self(prepared).float(), dim=-1).cpu())
        self.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0, self.config.out_dim)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write the weights and configuration to a safetensors file (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": CHECKPOINT_FORMAT, "config": self.config.to_json(), "extra": json.dumps(extra or {})}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> tuple[ProbeEncoder, dict[str, Any]]:
        """Read a checkpoint written by :meth:`save`; returns the encoder (eval mode) and its ``extra`` dict."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            if metadata.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(
                    "not a retriever checkpoint", path=path, hint="retrain with compose train-retriever"
                )
            encoder = cls(EncoderConfig.from_json(metadata["config"]))
            encoder.load_state_dict(load_file(str(path)))
        except (OSError, SafetensorError, KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"cannot load retriever checkpoint: {exc}", path=path, hint="retrain with compose train-retriever"
            ) from exc
        return encoder.to(device).eval(), json.loads(metadata.get("extra", "{}"))
