"""LoRA-Squeeze of whole updates: exact at full rank, best rank-k below, energy thresholds, sums of updates."""

from __future__ import annotations

import pytest
import torch

from fusion.adapters import Dense, LowRank
from fusion.errors import CompositionError
from fusion.squeeze import combine, squeeze_update


def _low_rank(seed: int, out: int = 12, inp: int = 10, rank: int = 4, conv: bool = False) -> LowRank:
    gen = torch.Generator().manual_seed(seed)
    shape = (rank, inp, 3, 3) if conv else (rank, inp)
    up = torch.randn(out, rank, *((1, 1) if conv else ()), generator=gen)
    return LowRank(down=torch.randn(*shape, generator=gen), up=up, alpha=2.0)


@pytest.mark.parametrize("conv", [False, True])
def test_full_rank_is_exact_and_lower_rank_is_the_best_approximation(conv: bool) -> None:
    update = _low_rank(0, conv=conv)
    full = squeeze_update(update, energy=1.0)
    assert full.rank_after == 4
    assert full.retained == pytest.approx(1.0)
    assert torch.allclose(full.update.delta(), update.delta(), atol=1e-5)
    low = squeeze_update(update, rank=2)
    singular = torch.linalg.svdvals(update.delta(torch.float64).reshape(12, -1))
    error = (low.update.delta(torch.float64) - update.delta(torch.float64)).norm()
    assert float(error) == pytest.approx(float(singular[2:].norm()), rel=1e-4)
    assert low.retained == pytest.approx(float((singular[:2] ** 2).sum() / (singular**2).sum()), rel=1e-6)


def test_energy_threshold_keeps_the_fewest_values() -> None:
    update = _low_rank(1)
    squeezed = squeeze_update(update, energy=0.9)
    assert squeezed.retained >= 0.9
    assert squeezed.rank_after > 1
    assert squeeze_update(update, rank=squeezed.rank_after - 1).retained < 0.9


def test_combine_is_the_exact_weighted_sum() -> None:
    a, b = _low_rank(2), _low_rank(3)
    dense = Dense(weight=torch.randn(12, 10, generator=torch.Generator().manual_seed(4)))
    low = combine([(a, 0.8), (b, -0.5)])
    assert isinstance(low, LowRank)
    assert torch.allclose(low.delta(), 0.8 * a.delta() - 0.5 * b.delta(), atol=1e-5)
    mixed = combine([(a, 0.8), (dense, 0.3), (b, 0.0)])
    assert isinstance(mixed, Dense)
    assert torch.allclose(mixed.delta(torch.float32), 0.8 * a.delta() + 0.3 * dense.delta(), atol=1e-5)
    assert squeeze_update(mixed, energy=1.0).rank_after <= 10


def test_bias_updates_and_bad_options_are_refused() -> None:
    with pytest.raises(CompositionError, match="bias"):
        combine([(Dense(weight=torch.zeros(3, 2), bias=torch.ones(3)), 1.0)])
    with pytest.raises(CompositionError, match="exactly one"):
        squeeze_update(_low_rank(5), rank=2, energy=0.9)
    with pytest.raises(CompositionError, match="energy"):
        squeeze_update(_low_rank(5), energy=1.5)
