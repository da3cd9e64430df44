"""TIES merging equals its formula (trim to the top p, elect the sign of the sum, disjoint mean of the weighted
agreeing entries) on hand-worked tensors and on every composed layer of tiny SD; it restores the base weights and
refuses what it cannot do."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lora_factories import random_lora

from composer.mixin import make_composable
from fusion.adapters import Adapter, Dense
from fusion.errors import CompositionError
from fusion.strategies import get_strategy
from fusion.strategies.ties import Ties, ties_merge

WEIGHTS = {"a": 0.8, "b": 1.2, "c": 0.5}


def test_hand_worked_example() -> None:
    # density 0.5 keeps 3 of 6 entries per update
    a = torch.tensor([[4.0, -1.0, 2.0], [0.5, -3.0, 0.1]])  # keeps 4, 2, -3
    b = torch.tensor([[-5.0, 0.2, 1.0], [2.0, -0.1, 3.0]])  # keeps -5, 2, 3
    c = torch.tensor([[1.0, 6.0, -2.5], [0.0, -4.0, 0.3]])  # keeps 6, -2.5, -4
    # trimmed sums: [[-1, 6, -0.5], [2, -7, 3]] → elected signs [[-, +, -], [+, -, +]]
    # agreeing entries: (0,0) b; (0,1) c; (0,2) c; (1,0) b; (1,1) a, c; (1,2) b
    w = (0.5, 2.0, 1.0)
    expected = torch.tensor(
        [
            [2.0 * -5.0, 1.0 * 6.0, 1.0 * -2.5],
            [2.0 * 2.0, (0.5 * -3.0 + 1.0 * -4.0) / 2, 2.0 * 3.0],
        ]
    )
    assert torch.equal(ties_merge([a, b, c], w, density=0.5), expected)


def _reference(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """The formula written out differently: a magnitude threshold per update, the elected sign from the positive
    and negative mass, and the mean as a ratio of masked sums."""
    kept = []
    for delta in deltas:
        count = int(density * delta.numel())
        threshold = delta.abs().flatten().sort(descending=True).values[count - 1]
        kept.append(torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta)))
    positive = sum(torch.clamp(k, min=0) for k in kept)
    negative = sum(torch.clamp(k, max=0) for k in kept)
    up = positive + negative > 0
    down = positive + negative < 0
    numerator = torch.zeros_like(deltas[0])
    denominator = torch.zeros_like(deltas[0])
    for k, w in zip(kept, weights):
        agrees = ((k > 0) & up) | ((k < 0) & down)
        numerator += torch.where(agrees, w * k, torch.zeros_like(k))
        denominator += agrees.float()
    return numerator / denominator.clamp(min=1)


def test_random_tensors_match_the_written_out_formula() -> None:
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(7, 9, generator=g) for _ in range(4)]
    weights = [0.8, -0.3, 1.5, 1.0]
    for density in (0.2, 0.5, 1.0):
        merged = ties_merge(deltas, weights, density)
        torch.testing.assert_close(merged, _reference(deltas, weights, density), rtol=0, atol=1e-6)
    assert int((ties_merge(deltas, weights, 0.2) != 0).sum()) <= 4 * int(0.2 * 63)


def _setup(pipe: Any) -> list[Adapter]:
    pipe = make_composable(pipe)
    adapters = [
        Adapter(name, "sd1", random_lora(pipe.unet, 2 + i, seed=i, every=i + 1)) for i, name in enumerate("abc")
    ]
    for adapter in adapters:
        pipe.add_adapter(adapter)
    return adapters


def test_every_layer_holds_the_merged_update_and_clearing_restores_it(tiny_sd: Any) -> None:
    adapters = _setup(tiny_sd)
    pristine = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    tiny_sd.set_composition(WEIGHTS, method="ties")
    engine = tiny_sd.composition_engine
    assert engine.fused
    checked = 0
    for key, layer in engine.layers.items():
        updates = [(a.layers[key], WEIGHTS[a.name]) for a in adapters if key in a.layers]
        deltas = [(u.up.flatten(1) @ u.down.flatten(1) * u.scale).reshape(layer.base.weight.shape) for u, _ in updates]
        expected = pristine[f"{key}.weight"] + _reference(deltas, [w for _, w in updates], 0.2)
        torch.testing.assert_close(layer.base.weight.detach(), expected, rtol=0, atol=1e-6)
        checked += len(updates) > 1
    assert checked > 0  # some layers merge several adapters
    tiny_sd.set_composition(WEIGHTS, method="merge")
    merged = {key: layer.base.weight.detach().clone() for key, layer in engine.layers.items()}
    tiny_sd.set_composition(WEIGHTS, method="ties", density=1.0)
    assert any(not torch.equal(layer.base.weight, merged[key]) for key, layer in engine.layers.items())
    tiny_sd.clear_composition()
    assert all(torch.equal(v, pristine[k]) for k, v in tiny_sd.unet.state_dict().items())


def test_refusals_are_typed(tiny_sd: Any) -> None:
    for options in ({"density": 0.0}, {"density": 1.5}, {"density": True}, {"trim": 0.2}, {"fuse": False}):
        with pytest.raises(CompositionError):
            Ties(WEIGHTS, **options)
    with pytest.raises(CompositionError, match="changes over steps"):
        Ties({"a": "0@0,1@1"})
    assert get_strategy("ties") is Ties
    _setup(tiny_sd)
    with pytest.raises(CompositionError, match="fused only"):
        tiny_sd.set_composition(WEIGHTS, method="ties", branches="conditional")
    key = "down_blocks.0.attentions.0.proj_in"
    weight = tiny_sd.unet.get_submodule(key).weight
    tiny_sd.add_adapter(
        Adapter("biased", "sd1", {key: Dense(torch.zeros_like(weight), bias=torch.ones(weight.shape[0]))})
    )
    before = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    with pytest.raises(CompositionError, match="bias"):
        tiny_sd.set_composition({"a": 1.0, "biased": 1.0}, method="ties")
    assert tiny_sd.composition is None or tiny_sd.composition["method"] != "ties"
    assert all(torch.equal(v, before[k]) for k, v in tiny_sd.unet.state_dict().items())
