"""The learned signal's storage: a trained encoder's adapter embeddings in FAISS, kept consistent with the catalog.

Files live beside the catalog: ``retriever-<family>.safetensors`` (the checkpoint) and
``retriever-<family>.vectors.npz`` (a :class:`weights_index.vectors.VectorStore` keyed by catalog row ids). The
JSON file ``retriever-<family>.vectors.json`` stamps which checkpoint (size and mtime) made the vectors.

:meth:`LearnedIndex.sync` makes the store match the catalog after a rescan: rows that are gone (deleted files)
are dropped, renamed files keep their row id and so their vector, and new or changed files (whose catalog
``vector_id`` a rescan clears) are embedded. A new checkpoint invalidates every vector.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fusion.adapters import Adapter
from fusion.errors import ComposerError
from retrieval.checkpoints import checkpoint_path, vectors_path
from retrieval.encoder import ProbeEncoder
from retrieval.pipeline_text import PipelineTextEmbedder, is_pipeline_spec
from retrieval.text import TextEmbedder, TextModelError, TextTower
from weights_index.catalog import Library
from weights_index.vectors import VectorStore

__all__ = ["LearnedIndex", "checkpoint_path", "vectors_path"]


def _stamp(path: Path) -> str:
    info = path.stat()
    return f"{info.st_size}:{info.st_mtime_ns}"


class LearnedIndex:
    """Adapter embeddings of one family from a trained :class:`ProbeEncoder`, searchable by prompt text."""

    def __init__(
        self,
        library: Library,
        family: str,
        encoder: ProbeEncoder,
        *,
        text: TextTower | None = None,
        validation: dict[str, Any] | None = None,
        pipe: Any = None,
    ):
        self.library = library
        self.family = family
        self.encoder = encoder
        self.validation = validation
        """The training run's held-out check (``retrieval.training.Validation.to_json``), None when unvalidated."""
        self._text = text
        self._pipe = pipe
        self.store = VectorStore(encoder.config.out_dim)
        self._stamp_path = vectors_path(library, family).with_suffix(".json")
        path = vectors_path(library, family)
        checkpoint = checkpoint_path(library, family)
        if path.exists() and self._stamp_path.exists() and checkpoint.exists():
            stamp = json.loads(self._stamp_path.read_text()).get("checkpoint")
            if stamp == _stamp(checkpoint):
                self.store = VectorStore.load(path)

    @classmethod
    def open(
        cls, library: Library, family: str, *, text: TextTower | None = None, pipe: Any = None
    ) -> LearnedIndex | None:
        """The family's index when a trained checkpoint exists beside the catalog, else None.

        ``pipe`` serves an encoder trained against a pipeline's text encoder (it must be that same encoder).
        """
        path = checkpoint_path(library, family)
        if not path.exists():
            return None
        encoder, extra = ProbeEncoder.load(path)
        return cls(library, family, encoder, text=text, validation=extra.get("validation"), pipe=pipe)

    @property
    def reliable(self) -> bool:
        """False when the training run's held-out check found the encoder no better than chance."""
        return self.validation is None or bool(self.validation.get("reliable", True))

    @property
    def text(self) -> TextTower:
        """The text tower the encoder was trained against (built on first use).

        Raises :class:`TextModelError` when it was a pipeline's text encoder and no (or another) pipeline is given.
        """
        if self._text is None:
            spec = self.encoder.config.text
            if not is_pipeline_spec(spec):
                self._text = TextEmbedder.from_spec(spec)
            elif self._pipe is None:
                raise TextModelError(
                    f"the {self.family} retriever was trained against {spec.get('name')!r}'s text encoder",
                    hint=f"give that pipeline (e.g. compose search --model {spec.get('name')})",
                )
            else:
                self._text = PipelineTextEmbedder.from_spec(spec, self._pipe)
        return self._text

    def text_problem(self) -> str | None:
        """Why the text tower cannot be served (a pipeline's text encoder without that pipeline), else None.

        Builds a pipeline text tower now; an open_clip one stays lazy (it needs nothing but its spec).
        """
        if self._text is not None or not is_pipeline_spec(self.encoder.config.text):
            return None
        try:
            self.text  # noqa: B018 — building it is the check
        except TextModelError as exc:
            return exc.reason
        return None

    def rebuild(self, adapters: Mapping[int, Adapter]) -> None:
        """Replace every vector with embeddings of ``adapters`` (catalog id → adapter) and save."""
        self.store = VectorStore(self.encoder.config.out_dim)
        self._embed(adapters)
        self.save()

    def _embed(self, adapters: Mapping[int, Adapter]) -> None:
        if not adapters:
            return
        ids = list(adapters)
        vectors = self.encoder.embed([adapters[i] for i in ids])
        self.store.upsert(ids, vectors.numpy())
        for item_id in ids:
            self.library.set_vector_id(item_id, item_id)

    def sync(self) -> dict[str, int]:
        """Match the store to the catalog (drop gone rows, embed new/changed ones); saves when anything changed.

        Returns counts: ``removed``, ``embedded`` and ``failed`` (files that could not be read).
        """
        entries = [e for e in self.library.entries(self.family) if e.ok]
        removed = self.store.retain([e.id for e in entries])
        stored = set(self.store.ids.tolist())
        stale = [e for e in entries if e.id not in stored or e.vector_id != e.id]
        adapters: dict[int, Adapter] = {}
        failed = 0
        for entry in stale:
            try:
                adapters[entry.id] = self.library.read(entry.id)
            except ComposerError:
                failed += 1
        self._embed(adapters)
        if removed or adapters:
            self.save()
        return {"removed": removed, "embedded": len(adapters), "failed": failed}

    def save(self) -> None:
        """Write the vectors (atomically) and the stamp of the checkpoint that made them."""
        self.store.save(vectors_path(self.library, self.family))
        tmp = self._stamp_path.with_name(f".{self._stamp_path.name}.tmp")
        tmp.write_text(json.dumps({"checkpoint": _stamp(checkpoint_path(self.library, self.family))}))
        os.replace(tmp, self._stamp_path)

    def query(self, prompt: str, k: int) -> list[tuple[int, float]]:
        """Top-``k`` (catalog id, cosine) for a prompt."""
        return self.query_vector(self.text.encode([prompt])[0], k)

    def query_vector(self, vector: torch.Tensor, k: int) -> list[tuple[int, float]]:
        """Top-``k`` (catalog id, cosine) for an already-embedded query."""
        scores, ids = self.store.search(vector.reshape(1, -1).numpy(), k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
