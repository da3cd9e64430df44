"""Canonical adapter kinds: every `.delta()` against an independent dense computation, and the exact helpers."""

from __future__ import annotations

import pytest
import torch

from fusion.adapters import (
    Adapter,
    Dense,
    LowRank,
    Sparse,
    concat_low_rank,
    qr_core_svd,
    to_sparse,
    validate_shapes,
)
from fusion.errors import ShapeMismatchError


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_linear_lowrank_delta_matches_explicit_product(gen: torch.Generator) -> None:
    down, up = torch.randn(4, 10, generator=gen), torch.randn(7, 4, generator=gen)
    update = LowRank(down=down, up=up, alpha=2.0)
    expected = torch.zeros(7, 10, dtype=torch.float64)
    for k in range(4):
        expected += torch.outer(up[:, k].double(), down[k].double())
    assert update.scale == pytest.approx(0.5)
    assert update.shape == (7, 10)
    assert _rel(update.delta(), expected * 0.5) < 1e-6


def test_missing_alpha_means_scale_one(gen: torch.Generator) -> None:
    update = LowRank(down=torch.randn(3, 5, generator=gen), up=torch.randn(6, 3, generator=gen))
    assert update.scale == 1.0
    assert torch.allclose(update.delta(), update.up @ update.down)


def test_conv_lowrank_delta_equals_composed_convolutions(gen: torch.Generator) -> None:
    down = torch.randn(4, 3, 3, 3, generator=gen)
    up = torch.randn(5, 4, 1, 1, generator=gen)
    update = LowRank(down=down, up=up, alpha=8.0)
    x = torch.randn(2, 3, 9, 9, generator=gen)
    two_convs = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, padding=1), up) * update.scale
    one_conv = torch.nn.functional.conv2d(x, update.delta(), padding=1)
    assert update.shape == (5, 3, 3, 3)
    assert _rel(one_conv, two_convs) < 1e-5


def test_lowrank_rejects_inconsistent_factors(gen: torch.Generator) -> None:
    with pytest.raises(ShapeMismatchError, match="rank mismatch"):
        LowRank(down=torch.randn(4, 10, generator=gen), up=torch.randn(7, 3, generator=gen))
    with pytest.raises(ShapeMismatchError):
        LowRank(down=torch.randn(4, 10, generator=gen), up=torch.randn(7, 4, 1, 1, generator=gen))


def test_sparse_delta_places_values(gen: torch.Generator) -> None:
    update = Sparse(index=torch.tensor([1, 5, 11]), values=torch.tensor([1.0, -2.0, 3.0]), shape=(3, 4))
    expected = torch.zeros(3, 4)
    expected[0, 1], expected[1, 1], expected[2, 3] = 1.0, -2.0, 3.0
    assert torch.equal(update.delta(), expected)
    assert update.nnz == 3
    assert update.density == pytest.approx(0.25)


def test_sparse_rejects_unsorted_or_out_of_range() -> None:
    with pytest.raises(ShapeMismatchError, match="sorted"):
        Sparse(index=torch.tensor([5, 1]), values=torch.ones(2), shape=(3, 4))
    with pytest.raises(ShapeMismatchError, match="outside"):
        Sparse(index=torch.tensor([1, 12]), values=torch.ones(2), shape=(3, 4))


def test_sparse_to_is_itself_when_nothing_changes_and_keeps_positions_when_cast() -> None:
    update = Sparse(index=torch.tensor([1, 5], dtype=torch.int32), values=torch.ones(2), shape=(3, 4))
    assert update.to("cpu", torch.float32) is update
    half = update.to("cpu", torch.float16)
    assert half.values.dtype == torch.float16
    assert half.index is update.index
    assert half.shape == (3, 4)
    assert torch.equal(half.delta(torch.float32), update.delta())


def test_sparse_keeps_int32_widens_small_integers_and_refuses_float_indices() -> None:
    narrow = Sparse(index=torch.tensor([1, 5], dtype=torch.int32), values=torch.ones(2), shape=(3, 4))
    assert narrow.index.dtype == torch.int32
    assert torch.equal(narrow.delta().reshape(-1).nonzero().squeeze(1), torch.tensor([1, 5]))
    small = Sparse(index=torch.tensor([1, 5], dtype=torch.int16), values=torch.ones(2), shape=(3, 4))
    assert small.index.dtype == torch.int64
    with pytest.raises(ShapeMismatchError, match="integers"):
        Sparse(index=torch.tensor([1.0, 5.0]), values=torch.ones(2), shape=(3, 4))
    with pytest.raises(ShapeMismatchError):
        Sparse(index=torch.tensor([-1, 5], dtype=torch.int32), values=torch.ones(2), shape=(3, 4))


def test_sparse_from_unsorted_sums_duplicates() -> None:
    update = Sparse.from_unsorted(torch.tensor([7, 2, 7]), torch.tensor([1.0, 2.0, 3.0]), (2, 4))
    assert update.index.tolist() == [2, 7]
    assert update.values.tolist() == [2.0, 4.0]


def test_dense_delta_folds_scale(gen: torch.Generator) -> None:
    weight = torch.randn(3, 3, generator=gen)
    assert torch.allclose(Dense(weight, scale=0.25).delta(), weight * 0.25)


def test_qr_core_svd_matches_dense_svd(gen: torch.Generator) -> None:
    update = LowRank(down=torch.randn(6, 40, generator=gen), up=torch.randn(30, 6, generator=gen), alpha=3.0)
    spectrum = qr_core_svd(update)
    dense = torch.linalg.svdvals(update.delta().double())[:6]
    assert torch.allclose(spectrum.S, dense, rtol=1e-5)
    rebuilt = spectrum.U @ torch.diag(spectrum.S) @ spectrum.Vh
    assert _rel(rebuilt, update.delta().double()) < 1e-6


def test_concat_low_rank_is_exact_weighted_sum(gen: torch.Generator) -> None:
    a = LowRank(down=torch.randn(2, 9, generator=gen), up=torch.randn(5, 2, generator=gen), alpha=1.0)
    b = LowRank(down=torch.randn(4, 9, generator=gen), up=torch.randn(5, 4, generator=gen), alpha=8.0)
    merged = concat_low_rank([(a, 0.8), (b, -0.3)])
    assert merged.rank == 6
    assert _rel(merged.delta(), 0.8 * a.delta() - 0.3 * b.delta()) < 1e-6


def test_to_sparse_full_density_is_exact_and_reports_energy(gen: torch.Generator) -> None:
    update = LowRank(down=torch.randn(3, 8, generator=gen), up=torch.randn(6, 3, generator=gen), alpha=1.5)
    sparse, energy = to_sparse(update, density=1.0)
    assert energy == pytest.approx(1.0)
    assert torch.allclose(sparse.delta(), update.delta(), atol=1e-6)
    partial, partial_energy = to_sparse(update, density=0.25)
    assert partial.nnz == 12
    kept = update.delta().reshape(-1)[partial.index]
    assert partial_energy == pytest.approx(float((kept**2).sum() / (update.delta() ** 2).sum()), rel=1e-5)
    assert 0.25 < partial_energy < 1.0
    largest = update.delta().abs().reshape(-1).topk(12).values.min()
    assert bool((partial.values.abs() >= largest - 1e-7).all())


def test_adapter_counts_and_validation(gen: torch.Generator) -> None:
    adapter = Adapter(
        name="x",
        family="sd1",
        layers={"a.to_q": LowRank(down=torch.randn(2, 4, generator=gen), up=torch.randn(3, 2, generator=gen))},
        text_encoder_layers={"text_encoder.q": Dense(torch.randn(4, 4, generator=gen))},
    )
    assert adapter.num_params == 8 + 6 + 16
    assert adapter.nbytes == (8 + 6 + 16) * 4
    validate_shapes(adapter, {"a.to_q": (3, 4), "text_encoder.q": (4, 4)})
    with pytest.raises(ShapeMismatchError, match="shape") as refused:
        validate_shapes(adapter, {"a.to_q": (3, 5), "text_encoder.q": (4, 4)})
    assert "other layer sizes" in str(refused.value.hint)
    with pytest.raises(ShapeMismatchError) as flattened:
        validate_shapes(adapter, {"a.to_q": (3, 1, 2, 2), "text_encoder.q": (4, 4)})
    assert "stored flattened" in str(flattened.value.hint)
    with pytest.raises(ShapeMismatchError, match="does not have"):
        validate_shapes(adapter, {"a.to_q": (3, 4)})
    with pytest.raises(ShapeMismatchError, match="must start with"):
        Adapter(name="bad", family="sd1", layers={}, text_encoder_layers={"q": Dense(torch.zeros(1, 1))})
    half = adapter.to(dtype=torch.float16)
    assert half.layers["a.to_q"].up.dtype == torch.float16
