"""FAISS vector store: exact search, incremental updates, approximate recall, atomic persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from weights_index import vectors as vectors_module
from weights_index.vectors import VectorStore, VectorStoreError


def _random(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _exact_top(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = unit @ (query / np.linalg.norm(query))
    return [int(ids[i]) for i in np.argsort(-scores)[:k]]


def test_flat_search_equals_numpy_cosine() -> None:
    data, ids = _random(200, 16), np.arange(1000, 1200)
    store = VectorStore(16)
    store.upsert(ids, data)
    query = _random(1, 16, seed=5)[0]
    scores, found = store.search(query, k=5)
    assert store.kind == "flat"
    assert found[0].tolist() == _exact_top(data, ids, query, 5)
    assert np.all(np.diff(scores[0]) <= 1e-6)


def test_upsert_replaces_and_remove_and_retain() -> None:
    store = VectorStore(4)
    store.upsert([1, 2, 3], np.eye(4, dtype=np.float32)[:3])
    store.upsert([2], np.array([[0, 0, 0, 1]], dtype=np.float32))
    assert len(store) == 3
    _, found = store.search(np.array([0, 0, 0, 1], dtype=np.float32), k=1)
    assert found[0, 0] == 2
    assert store.remove([3, 99]) == 1
    assert store.retain([2]) == 1
    assert store.ids.tolist() == [2]
    scores, found = store.search(np.ones(4, dtype=np.float32), k=3)
    assert found[0].tolist() == [2, -1, -1]
    assert np.isneginf(scores[0, 1:]).all()


def test_bad_inputs_raise_typed_errors() -> None:
    store = VectorStore(4)
    with pytest.raises(VectorStoreError, match="dimension"):
        store.upsert([1], np.ones((1, 5), dtype=np.float32))
    with pytest.raises(VectorStoreError, match="duplicate"):
        store.upsert([1, 1], np.ones((2, 4), dtype=np.float32))
    with pytest.raises(VectorStoreError, match="NaN"):
        store.upsert([1], np.full((1, 4), np.nan, dtype=np.float32))
    assert len(store) == 0
    with pytest.raises(VectorStoreError):
        store.search(np.ones(3, dtype=np.float32))


def test_approximate_index_reaches_target_recall() -> None:
    data = _random(3000, 32, seed=1)
    store = VectorStore(32, approx_threshold=1000, target_recall=0.9)
    store.upsert(np.arange(3000), data)
    queries = _random(50, 32, seed=2)
    _, found = store.search(queries, k=10)
    assert store.kind == "ivf"
    assert store.recall >= 0.9
    recall = np.mean([len(set(f) & set(_exact_top(data, np.arange(3000), q, 10))) / 10 for f, q in zip(found, queries)])
    assert recall >= 0.8


def test_save_load_roundtrip(tmp_path: Path) -> None:
    store = VectorStore(8)
    store.upsert([7, 8, 9], _random(3, 8))
    path = tmp_path / "vectors.npz"
    store.save(path)
    loaded = VectorStore.load(path)
    assert loaded.ids.tolist() == [7, 8, 9]
    np.testing.assert_allclose(loaded.vector(8), store.vector(8))
    query = _random(1, 8, seed=3)
    assert loaded.search(query, 3)[1].tolist() == store.search(query, 3)[1].tolist()


def test_failed_save_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vectors.npz"
    store = VectorStore(4)
    store.upsert([1], np.ones((1, 4), dtype=np.float32))
    store.save(path)
    before = path.read_bytes()

    def explode(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    store.upsert([2], np.ones((1, 4), dtype=np.float32))
    monkeypatch.setattr(vectors_module.np, "savez", explode)
    with pytest.raises(OSError, match="disk full"):
        store.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.npz"]


def test_load_garbage_raises(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    path.write_bytes(b"not a store")
    with pytest.raises(VectorStoreError, match="rebuild"):
        VectorStore.load(path)
