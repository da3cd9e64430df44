"""FAISS vector store keyed by catalog row ids: exact below a size threshold, approximate above, saved atomically.

Vectors are L2-normalised so inner product is cosine similarity. The store keeps the raw vectors as the source
of truth (so any index kind can be rebuilt after deletions) and the built FAISS index, both in ONE ``.npz`` file
replaced atomically — a crash mid-save leaves the previous file intact.

Below :data:`APPROX_THRESHOLD` entries the index is exact (``IndexFlatIP``). Above it, an IVF index is trained
and its ``nprobe`` raised until recall@k on held-out queries, measured against exact search, reaches
``target_recall``; the measured recall is kept in :attr:`VectorStore.recall`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import faiss
import numpy as np

from fusion.errors import ComposerError

APPROX_THRESHOLD = 50_000
FORMAT_VERSION = 1


class VectorStoreError(ComposerError):
    """A vector store file is unreadable, or vectors of the wrong dimension were given."""


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class VectorStore:
    """Cosine-similarity search over (id, vector) pairs, with incremental upsert/remove and atomic persistence."""

    def __init__(self, dim: int, *, target_recall: float = 0.95, approx_threshold: int = APPROX_THRESHOLD) -> None:
        if dim <= 0:
            raise VectorStoreError(f"vector dimension must be positive, got {dim}")
        self.dim = dim
        self.target_recall = target_recall
        self.approx_threshold = approx_threshold
        self._ids = np.empty(0, dtype=np.int64)
        self._vectors = np.empty((0, dim), dtype=np.float32)
        self._index: faiss.Index | None = None
        self.kind = "flat"
        self.nprobe = 0
        self.recall = 1.0

    def __len__(self) -> int:
        return int(self._ids.size)

    @property
    def ids(self) -> np.ndarray:
        """Stored ids, in insertion order."""
        return self._ids.copy()

    def vector(self, item_id: int) -> np.ndarray:
        """The stored (normalised) vector of ``item_id``."""
        where = np.flatnonzero(self._ids == item_id)
        if where.size == 0:
            raise KeyError(item_id)
        return self._vectors[where[0]].copy()

    def upsert(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        """Insert vectors, replacing any already stored under the same ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (ids.size, self.dim):
            raise VectorStoreError(f"expected {ids.size} vectors of dimension {self.dim}, got shape {vectors.shape}")
        if np.unique(ids).size != ids.size:
            raise VectorStoreError("duplicate ids in one upsert")
        if not np.isfinite(vectors).all():
            raise VectorStoreError("vectors contain NaN or Inf")
        keep = ~np.isin(self._ids, ids)
        self._ids = np.concatenate([self._ids[keep], ids])
        self._vectors = np.concatenate([self._vectors[keep], _normalise(vectors)])
        self._index = None

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """Remove ids (unknown ids are ignored); returns how many were removed."""
        drop = np.isin(self._ids, np.asarray(ids, dtype=np.int64))
        self._ids, self._vectors = self._ids[~drop], self._vectors[~drop]
        if drop.any():
            self._index = None
        return int(drop.sum())

    def retain(self, ids: np.ndarray | list[int]) -> int:
        """Keep only the given ids (how a rescan drops deleted files); returns how many were removed."""
        return self.remove(self._ids[~np.isin(self._ids, np.asarray(ids, dtype=np.int64))])

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (cosine scores, ids) per query row; missing slots have id -1 and score -inf."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.shape[1] != self.dim:
            raise VectorStoreError(f"query dimension {queries.shape[1]} does not match the store's {self.dim}")
        if len(self) == 0 or k <= 0:
            return np.full((len(queries), max(k, 0)), -np.inf, np.float32), np.full((len(queries), max(k, 0)), -1)
        index = self._built_index()
        scores, positions = index.search(_normalise(queries), min(k, len(self)))
        found = np.where(positions >= 0, self._ids[np.clip(positions, 0, None)], -1)
        scores = np.where(positions >= 0, scores, -np.inf).astype(np.float32)
        if found.shape[1] < k:
            pad = k - found.shape[1]
            found = np.pad(found, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return scores, found

    def _built_index(self) -> faiss.Index:
        if self._index is None:
            self._index = self._build()
        return self._index

    def _build(self) -> faiss.Index:
        if len(self) < self.approx_threshold:
            self.kind, self.nprobe, self.recall = "flat", 0, 1.0
            index = faiss.IndexFlatIP(self.dim)
            index.add(self._vectors)
            return index
        return self._build_ivf()

    def _build_ivf(self) -> faiss.Index:
        count = len(self)
        nlist = int(4 * math.sqrt(count))
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = self._vectors[rng.choice(count, size=min(count, 64 * nlist), replace=False)]
        index.train(sample)
        index.add(self._vectors)
        probes = self._vectors[rng.choice(count, size=min(200, count), replace=False)]
        probes = _normalise(probes + rng.normal(scale=0.05, size=probes.shape).astype(np.float32))
        exact = faiss.IndexFlatIP(self.dim)
        exact.add(self._vectors)
        k = 10
        _, truth = exact.search(probes, k)
        nprobe = 1
        while True:
            index.nprobe = nprobe
            _, approx = index.search(probes, k)
            recall = float(np.mean([len(set(a) & set(t)) / k for a, t in zip(approx, truth)]))
            if recall >= self.target_recall or nprobe >= nlist:
                break
            nprobe = min(nlist, nprobe * 2)
        self.kind, self.nprobe, self.recall = "ivf", nprobe, recall
        return index

    def save(self, path: str | Path) -> None:
        """Write ids, vectors and the built index to ``path`` (``.npz``) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        index = self._built_index() if len(self) else None
        meta = {
            "version": FORMAT_VERSION,
            "dim": self.dim,
            "kind": self.kind,
            "nprobe": self.nprobe,
            "recall": self.recall,
            "target_recall": self.target_recall,
            "approx_threshold": self.approx_threshold,
        }
        serialized = faiss.serialize_index(index) if index is not None else np.empty(0, np.uint8)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, ids=self._ids, vectors=self._vectors, index=serialized, meta=json.dumps(meta))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> VectorStore:
        """Read a store written by :meth:`save`."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                ids, vectors, serialized = data["ids"], data["vectors"], data["index"]
        except (OSError, ValueError, KeyError) as exc:
            raise VectorStoreError(
                f"cannot read vector store: {exc}", path=path, hint="rebuild it with a rescan"
            ) from exc
        if meta.get("version") != FORMAT_VERSION or vectors.shape[1:] != (meta["dim"],):
            raise VectorStoreError("vector store has an unknown layout", path=path, hint="rebuild it with a rescan")
        store = cls(meta["dim"], target_recall=meta["target_recall"], approx_threshold=meta["approx_threshold"])
        store._ids, store._vectors = ids.astype(np.int64), vectors.astype(np.float32)
        store.kind, store.nprobe, store.recall = meta["kind"], meta["nprobe"], meta["recall"]
        if serialized.size:
            store._index = faiss.deserialize_index(serialized)
            if store.kind == "ivf":
                store._index.nprobe = store.nprobe
        return store
