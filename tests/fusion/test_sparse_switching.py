"""Fused sparse switching: exact sums, bit-exact restores, chunked switches, shared supports, and the state cache."""

from __future__ import annotations

import pytest
import torch

from fusion import sparse_switching
from fusion.adapters import Adapter, LowRank, Sparse
from fusion.errors import CompositionError, ShapeMismatchError
from fusion.sparse_switching import (
    FusedSparseCache,
    SparseSwitcher,
    fuse_sparse,
    restore_sparse,
    same_support,
)


def _sparse(
    shape: tuple[int, int],
    k: int,
    gen: torch.Generator,
    dtype: torch.dtype = torch.float32,
    index: torch.Tensor | None = None,
) -> Sparse:
    if index is None:
        index = torch.randperm(shape[0] * shape[1], generator=gen)[:k].sort().values
    return Sparse(index, torch.randn(index.numel(), generator=gen).to(dtype), shape)


def _expected(pristine: torch.Tensor, updates: list[tuple[Sparse, float]]) -> torch.Tensor:
    total = pristine.float() + sum(w * u.delta(torch.float32) for u, w in updates)
    return total.to(pristine.dtype)


@pytest.fixture(params=[1 << 18, 97], ids=["one-chunk", "many-chunks"])
def chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run with the production chunk size and with a tiny one, so small weights span many interleaved chunks."""
    monkeypatch.setattr(sparse_switching, "CHUNK_ENTRIES", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fuse_matches_dense_sum_and_restores_bit_exactly(dtype: torch.dtype, chunk: int) -> None:
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(48, 40, generator=gen).to(dtype)
    pristine = weight.clone()
    first, second = _sparse((48, 40), 300, gen, dtype), _sparse((48, 40), 200, gen, dtype)
    state = fuse_sparse(weight, [(first, 0.7), (second, -1.3)])
    assert state is not None
    assert torch.equal(weight, _expected(pristine, [(first, 0.7), (second, -1.3)]))
    switched = fuse_sparse(weight, [(second, 0.5)], current=state)
    assert torch.equal(weight, _expected(pristine, [(second, 0.5)]))
    assert switched is not None
    restore_sparse(weight, switched)
    assert torch.equal(weight, pristine)


def test_shared_support_switch_writes_once_and_stays_exact() -> None:
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(64, 32, generator=gen)
    pristine = weight.clone()
    mask = torch.randperm(64 * 32, generator=gen)[:150].sort().values
    first = _sparse((64, 32), 0, gen, index=mask)
    second = _sparse((64, 32), 0, gen, index=mask.clone())
    state = fuse_sparse(weight, [(first, 1.0)])
    assert state is not None
    switched = fuse_sparse(weight, [(second, 0.6)], current=state)
    assert switched is not None
    assert switched.original is state.original
    assert torch.equal(weight, _expected(pristine, [(second, 0.6)]))
    restore_sparse(weight, switched)
    assert torch.equal(weight, pristine)


def test_same_support_compares_contents_not_samples() -> None:
    index = torch.arange(0, 1000, 3)
    other = index.clone()
    assert same_support(index, other)
    other[5] += 1
    assert not same_support(index, other)
    assert not same_support(index, index[:-1])


def test_prepared_state_is_reused_and_cache_drops_after_foreign_writes() -> None:
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(40, 30, generator=gen)
    first, second = _sparse((40, 30), 100, gen), _sparse((40, 30), 100, gen)
    cache = FusedSparseCache(capacity=2)
    state = None
    seen = {}
    for updates in ([(first, 1.0)], [(second, 2.0)], [(first, 1.0)], [(second, 2.0)]):
        prepared = cache.lookup(weight, updates)
        state = fuse_sparse(weight, updates, state, prepared)
        cache.store(weight, updates, state)
        key = id(updates[0][0])
        assert seen.setdefault(key, state) is state
    assert len(cache) == 2
    assert cache.lookup(weight, [(first, 0.5)]) is None
    with torch.no_grad():
        weight.add_(1.0)
    assert cache.lookup(weight, [(first, 1.0)]) is None
    assert len(cache) == 0


def test_switcher_random_switches_restore_exactly(chunk: int) -> None:
    gen = torch.Generator().manual_seed(3)
    weights = {"a": torch.randn(32, 24, generator=gen), "b": torch.randn(16, 32, generator=gen)}
    pristine = {k: v.clone() for k, v in weights.items()}
    shared = {k: torch.randperm(v.numel(), generator=gen)[:60].sort().values for k, v in weights.items()}
    adapters = [
        Adapter(
            f"s{i}",
            "sd1",
            {
                k: _sparse(tuple(v.shape), 60, gen, index=shared[k] if i >= 3 else None)
                for k, v in weights.items()
                if i % 3 or k == "a"
            },
        )
        for i in range(6)
    ]
    switcher = SparseSwitcher(weights, cache_size=2)
    for _ in range(200):
        count = int(torch.randint(1, 3, (1,), generator=gen))
        chosen = torch.randperm(6, generator=gen)[:count].tolist()
        scales = torch.randint(1, 4, (count,), generator=gen).float().div(2).tolist()
        switcher.apply([(adapters[i], w) for i, w in zip(chosen, scales)])
        for key, weight in weights.items():
            updates = [(adapters[i].layers[key], w) for i, w in zip(chosen, scales) if key in adapters[i].layers]
            assert torch.allclose(weight, _expected(pristine[key], updates), atol=1e-6)
    assert switcher.fused
    assert switcher.cache_nbytes > 0
    switcher.restore()
    assert not switcher.fused
    assert all(torch.equal(weights[k], pristine[k]) for k in weights)


def test_switcher_refuses_non_sparse_or_unknown_layers_before_touching() -> None:
    weights = {"a": torch.zeros(4, 3)}
    switcher = SparseSwitcher(weights)
    good = Adapter("g", "sd1", {"a": Sparse(torch.tensor([1]), torch.tensor([2.0]), (4, 3))})
    switcher.apply([(good, 1.0)])
    low = Adapter("l", "sd1", {"a": LowRank(torch.ones(1, 3), torch.ones(4, 1))})
    with pytest.raises(CompositionError, match="not sparse"):
        switcher.apply([(low, 1.0)])
    wrong = Adapter("w", "sd1", {"b": Sparse(torch.tensor([1]), torch.tensor([2.0]), (4, 3))})
    with pytest.raises(ShapeMismatchError):
        switcher.apply([(wrong, 1.0)])
    assert float(weights["a"].reshape(-1)[1]) == 2.0


def test_int32_positions_from_files_switch_like_int64_ones() -> None:
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(30, 20, generator=gen)
    pristine = weight.clone()
    wide = _sparse((30, 20), 50, gen)
    narrow = Sparse(wide.index.to(torch.int32), wide.values, wide.shape)
    assert narrow.index.dtype == torch.int32
    assert same_support(wide.index, narrow.index)
    state = fuse_sparse(weight, [(wide, 1.0)])
    switched = fuse_sparse(weight, [(narrow, 2.0)], current=state)
    assert switched is not None
    assert torch.equal(weight, _expected(pristine, [(wide, 2.0)]))
    both = fuse_sparse(weight, [(narrow, 1.0), (_sparse((30, 20), 40, gen), 1.0)], current=switched)
    assert both is not None
    restore_sparse(weight, both)
    assert torch.equal(weight, pristine)
