"""What the catalog says about one file (:class:`CatalogEntry`) and a search result, read from its database row."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from weights_index.metadata import AdapterMetadata

ROW_COLUMNS = (
    "id, name, relpath, title, format, family, ranks, rank, num_layers, has_text_encoder, file_size, mtime_ns, "
    "sha256, metadata, header_metadata, preview, error, error_type, scores, vector_id"
)
"""The ``adapters`` columns an entry is read from, in :func:`entry_from_row`'s order."""


@dataclass(frozen=True)
class CatalogEntry:
    """One catalogued file: what its header and metadata say, or why it could not be read (``error``)."""

    id: int
    name: str
    relpath: str
    path: Path
    title: str
    format: str | None
    family: str
    ranks: tuple[int, ...]
    num_layers: int | None
    has_text_encoder: bool
    file_size: int
    mtime_ns: int
    sha256: str | None
    metadata: AdapterMetadata
    header_metadata: dict[str, str]
    preview: Path | None
    error: str | None
    error_type: str | None
    scores: dict[str, Any] = field(default_factory=dict)
    vector_id: int | None = None

    @property
    def rank(self) -> int | None:
        """The largest rank among the adapted modules (None for broken or rank-less files)."""
        return max(self.ranks) if self.ranks else None

    @property
    def trigger_words(self) -> tuple[str, ...]:
        """Words/phrases that activate the adapter, from every metadata source."""
        return self.metadata.trigger_words

    @property
    def ok(self) -> bool:
        """True when the file was read without error."""
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with every field (paths as strings)."""
        return {
            "id": self.id,
            "name": self.name,
            "title": self.title,
            "relpath": self.relpath,
            "path": str(self.path),
            "format": self.format,
            "family": self.family,
            "rank": self.rank,
            "ranks": list(self.ranks),
            "num_layers": self.num_layers,
            "has_text_encoder": self.has_text_encoder,
            "file_size": self.file_size,
            "mtime_ns": self.mtime_ns,
            "sha256": self.sha256,
            "trigger_words": list(self.trigger_words),
            "preview": None if self.preview is None else str(self.preview),
            "error": self.error,
            "error_type": self.error_type,
            "metadata": self.metadata.to_json(),
            "header_metadata": self.header_metadata,
            "scores": self.scores,
            "vector_id": self.vector_id,
        }


@dataclass(frozen=True)
class SearchHit:
    """A full-text search result: the entry and its bm25 relevance (higher is better)."""

    entry: CatalogEntry
    score: float


def entry_from_row(row: tuple[Any, ...], root: Path) -> CatalogEntry:
    """The entry of one ``adapters`` row selected as :data:`ROW_COLUMNS` (paths made absolute under ``root``)."""
    (row_id, name, relpath, title, fmt, family, ranks, _rank, num_layers, has_te, size, mtime_ns) = row[:12]
    sha256, metadata, header_metadata, preview, error, error_type, scores, vector_id = row[12:]
    meta = AdapterMetadata.from_json(json.loads(metadata))
    meta = replace(meta, previews=tuple(str(root / p) for p in meta.previews))
    return CatalogEntry(
        id=row_id,
        name=name,
        relpath=relpath,
        path=root / relpath,
        title=title,
        format=fmt,
        family=family,
        ranks=tuple(json.loads(ranks)),
        num_layers=num_layers,
        has_text_encoder=bool(has_te),
        file_size=size,
        mtime_ns=mtime_ns,
        sha256=sha256,
        metadata=meta,
        header_metadata=json.loads(header_metadata),
        preview=None if preview is None else root / preview,
        error=error,
        error_type=error_type,
        scores=json.loads(scores),
        vector_id=vector_id,
    )
