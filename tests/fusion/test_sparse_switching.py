"""Fused sparse switching: exact sums, bit-exact restores, int32 and int64 positions, shared supports, the cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion.adapters import Sparse
from fusion.layers import ComposedLinear, GateState
from fusion.sparse_switching import FusedSparseCache, fuse_sparse, restore_sparse, same_support


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


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fuse_matches_dense_sum_and_restores_bit_exactly(dtype: torch.dtype, index_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(48, 40, generator=gen).to(dtype)
    pristine = weight.clone()
    first, second = (_sparse((48, 40), k, gen, dtype) for k in (300, 200))
    first, second = (Sparse(u.index.to(index_dtype), u.values, u.shape) for u in (first, second))
    state = fuse_sparse(weight, [(first, 0.7), (second, -1.3)])
    assert state is not None
    assert torch.equal(weight, _expected(pristine, [(first, 0.7), (second, -1.3)]))
    switched = fuse_sparse(weight, [(second, 0.5)], current=state)
    assert torch.equal(weight, _expected(pristine, [(second, 0.5)]))
    assert switched is not None
    at_one = fuse_sparse(weight, [(first, 1.0)], current=switched)
    assert torch.equal(weight, _expected(pristine, [(first, 1.0)]))
    assert at_one is not None
    restore_sparse(weight, at_one)
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


def test_supports_sharing_their_middle_position_are_still_told_apart() -> None:
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(30, 20, generator=gen)
    pristine = weight.clone()
    index = torch.arange(0, 600, 7)
    moved = index.clone()
    moved[3] += 1  # same size, same middle element: only a full comparison tells them apart
    first, second = _sparse((30, 20), 0, gen, index=index), _sparse((30, 20), 0, gen, index=moved)
    state = fuse_sparse(weight, [(first, 1.0)])
    assert state is not None
    switched = fuse_sparse(weight, [(second, 1.0)], current=state)
    assert switched is not None
    assert switched.middle == state.middle
    assert torch.equal(weight, _expected(pristine, [(second, 1.0)]))
    restore_sparse(weight, switched)
    assert torch.equal(weight, pristine)


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


@torch.no_grad()
@pytest.mark.parametrize("capacity", [0, 1, 2, 4])
def test_composed_layers_random_switches_restore_exactly(capacity: int) -> None:
    """200 random fused switches among 6 sparse adapters (some sharing supports) through composed layers, the one
    implementation every public path uses; each fused weight is the dense sum, and unfusing restores bit-exactly,
    whatever the fused-state cache holds (nothing, or some states sharing base values on a shared support)."""
    gen = torch.Generator().manual_seed(3)
    bases = {"a": nn.Linear(24, 32), "b": nn.Linear(32, 16)}
    weights = {k: m.weight for k, m in bases.items()}
    pristine = {k: v.detach().clone() for k, v in weights.items()}
    shared = {k: torch.randperm(v.numel(), generator=gen)[:60].sort().values for k, v in weights.items()}
    adapters = [
        {
            k: _sparse(tuple(v.shape), 60, gen, index=shared[k] if i >= 3 else None)
            for k, v in weights.items()
            if i % 3 or k == "a"
        }
        for i in range(6)
    ]
    state = GateState(1, torch.device("cpu"))
    layers = {k: ComposedLinear(base, k, 0, state) for k, base in bases.items()}
    index = {f"s{i}": i for i in range(6)}
    for key, layer in layers.items():
        layer.sparse_cache = FusedSparseCache(capacity=capacity)
        for i, updates in enumerate(adapters):
            if key in updates:
                layer.add(f"s{i}", updates[key])
        layer.reindex(index)
    for _ in range(200):
        count = int(torch.randint(1, 3, (1,), generator=gen))
        chosen = torch.randperm(6, generator=gen)[:count].tolist()
        scales = torch.randint(1, 4, (count,), generator=gen).float().div(2).tolist()
        vector = torch.zeros(6)
        vector[chosen] = torch.tensor(scales)
        for key, layer in layers.items():
            layer.fuse(vector)
            updates = [(adapters[i][key], w) for i, w in zip(chosen, scales) if key in adapters[i]]
            assert torch.allclose(weights[key], _expected(pristine[key], updates), atol=1e-6)
    assert any(len(layer.sparse_cache) for layer in layers.values()) == bool(capacity)
    for layer in layers.values():
        layer.unfuse()
        assert not layer.fused
    assert all(torch.equal(weights[k], pristine[k]) for k in weights)


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_values_at_weight_one_round_once_like_the_fp32_sum(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    n = 1 << 14
    magnitudes = torch.pow(2.0, torch.randint(-20, 12, (2, n), generator=gen).float())
    weight = (torch.randn(n, generator=gen) * magnitudes[0]).to(dtype).reshape(128, 128)
    values = (torch.randn(n, generator=gen) * magnitudes[1]).to(dtype)
    pristine = weight.clone()
    update = Sparse(torch.arange(n), values, (128, 128))
    state = fuse_sparse(weight, [(update, 1.0)])
    assert torch.equal(weight, (pristine.float() + values.float().reshape(128, 128)).to(dtype))
    assert state is not None
    restore_sparse(weight, state)
    assert torch.equal(weight, pristine)
