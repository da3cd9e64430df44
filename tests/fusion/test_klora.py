"""K-LoRA equals its formula: per layer and step the adapter with the larger top-K sum (content over γ, style times
α·t/T + β) is fused at its weight, for a content/style pair and for three adapters; refusals are typed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lora_factories import random_lora

from composer.mixin import make_composable
from fusion.adapters import Adapter
from fusion.errors import CompositionError
from fusion.strategies import get_strategy
from fusion.strategies.base import StepContext
from fusion.strategies.klora import KLoRA, style_scale

STEPS = 10


def _delta(update: Any, shape: torch.Size) -> torch.Tensor:
    return (update.up.flatten(1) @ update.down.flatten(1) * update.scale).reshape(shape)


def _top64(delta: torch.Tensor) -> float:
    values = delta.abs().flatten().sort(descending=True).values
    return float(values[:64].sum())


def _setup(pipe: Any, categories: dict[str, str]) -> list[Adapter]:
    pipe = make_composable(pipe)
    adapters = []
    for i, (name, category) in enumerate(categories.items()):
        layers = random_lora(pipe.unet, 2 + 2 * i, seed=20 + i, every=1 + i % 2)
        adapters.append(Adapter(name, "sd1", layers, meta={"category": category}))
        pipe.add_adapter(adapters[-1])
    return adapters


def _drive(engine: Any, step: int) -> None:
    """One denoiser call at ``step`` that runs nothing: only the strategy's weight changes happen."""
    ctx = StepContext(engine, step, STEPS, None, 1, (), {}, forward=lambda *a, **k: None)
    engine.strategy.step(ctx)


def _expected_choice(scores: dict[str, float], styles: set[str], step: int) -> str:
    """argmax over adapters of top-64 sum / γ, style sums times 1.5·t/T + 0.5 (ties: the earlier adapter)."""
    best, best_score = "", float("-inf")
    for name, score in scores.items():
        if name in styles:
            score *= 1.5 * step / STEPS + 0.5
        if score > best_score:
            best, best_score = name, score
    return best


def _gamma(adapters: list[Adapter], reference: str, shapes: dict[str, torch.Size]) -> dict[str, float]:
    """Mean over shared layers of Σ|ΔW_a| / Σ|ΔW_reference|."""
    ref = next(a for a in adapters if a.name == reference)
    out = {}
    for adapter in adapters:
        shared = [k for k in adapter.layers if k in ref.layers]
        ratios = [
            float(_delta(adapter.layers[k], shapes[k]).abs().sum() / _delta(ref.layers[k], shapes[k]).abs().sum())
            for k in shared
        ]
        out[adapter.name] = sum(ratios) / len(ratios)
    return out


def _check_every_step(pipe: Any, adapters: list[Adapter], weights: dict[str, float], styles: set[str]) -> int:
    engine = pipe.composition_engine
    pristine = {key: layer.pristine.clone() for key, layer in engine.layers.items()}
    shapes = {key: layer.base.weight.shape for key, layer in engine.layers.items()}
    reference = next((a.name for a in adapters if a.name in styles), adapters[0].name)
    gamma = _gamma(adapters, reference, shapes)
    deltas = {key: {a.name: _delta(a.layers[key], shapes[key]) for a in adapters if key in a.layers} for key in shapes}
    scores = {key: {name: _top64(d) / gamma[name] for name, d in row.items()} for key, row in deltas.items()}
    engine.strategy.start_generation(engine, STEPS)
    flips = 0
    previous: dict[str, str] = {}
    for step in range(STEPS):
        _drive(engine, step)
        for key, layer in engine.layers.items():
            name = _expected_choice(scores[key], styles, step)
            expected = pristine[key] + weights[name] * deltas[key][name]
            torch.testing.assert_close(layer.base.weight.detach(), expected, rtol=0, atol=1e-6)
            flips += key in previous and previous[key] != name
            previous[key] = name
    return flips


def test_content_and_style_follow_the_papers_rule_at_every_step(tiny_sd: Any) -> None:
    adapters = _setup(tiny_sd, {"hero": "character", "ink": "style"})
    weights = {"hero": 0.9, "ink": 0.7}
    tiny_sd.set_composition(weights, method="klora")
    flips = _check_every_step(tiny_sd, adapters, weights, {"ink"})
    assert flips > 0  # the style factor moved some layers from the content adapter to the style one


def test_three_adapters_take_the_argmax(tiny_sd: Any) -> None:
    adapters = _setup(tiny_sd, {"hero": "character", "hat": "clothing", "ink": "style"})
    weights = {"hero": 1.0, "hat": 0.6, "ink": 0.8}
    tiny_sd.set_composition(weights, method="klora")
    _check_every_step(tiny_sd, adapters, weights, {"ink"})
    tiny_sd.set_composition(weights, method="klora", styles=[])  # no style: γ against the first adapter, no factor
    _check_every_step(tiny_sd, adapters, weights, set())


def test_clearing_restores_the_base_weights(tiny_sd: Any) -> None:
    _setup(tiny_sd, {"hero": "character", "ink": "style"})
    pristine = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    tiny_sd.set_composition({"hero": 1.0, "ink": 1.0}, method="klora")
    engine = tiny_sd.composition_engine
    _drive(engine, STEPS - 1)
    tiny_sd.clear_composition()
    assert all(torch.equal(v, pristine[k]) for k, v in tiny_sd.unet.state_dict().items())


def test_style_scale_and_refusals() -> None:
    assert [style_scale(t, 4) for t in range(4)] == [0.5, 0.875, 1.25, 1.625]
    assert get_strategy("klora") is KLoRA
    weights = {"a": 1.0, "b": 1.0}
    bad: list[dict[str, Any]] = [
        {"fuse": False},
        {"top_k": 0},
        {"top_k": 2.5},
        {"beta": 0.0},
        {"alpha": -1.0, "beta": 0.5},
        {"styles": ["c"]},
        {"gamma": 2.0},
    ]
    for options in bad:
        with pytest.raises(CompositionError):
            KLoRA(weights, **options)
    with pytest.raises(CompositionError):
        KLoRA({})
