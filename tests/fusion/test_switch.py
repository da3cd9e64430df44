"""LoRA Switch equals the reference loop: diffusers set_adapters inside a step-end callback, on tiny SD."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lora_factories import random_lora

from composer.mixin import make_composable
from fusion.adapters import Adapter, LowRank
from fusion.errors import CompositionError
from fusion.strategies.switch import Switch, active_index, category_order

STEPS = 7
TAU = 2


def _peft(layers: dict[str, LowRank]) -> dict[str, torch.Tensor]:
    out = {}
    for name, update in layers.items():
        out[f"unet.{name}.lora_A.weight"] = update.down.clone()
        out[f"unet.{name}.lora_B.weight"] = update.up.clone()
    return out


def _run(pipe: Any, **kwargs: Any) -> torch.Tensor:
    out = pipe(
        "a corgi astronaut",
        num_inference_steps=STEPS,
        height=32,
        width=32,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    return out.images


def _adapters(pipe: Any) -> list[Adapter]:
    categories = ["style", "background", "character"]
    return [
        Adapter(f"l{i}", "sd1", random_lora(pipe.unet, 2 + i, seed=i, every=i + 1), meta={"category": categories[i]})
        for i in range(3)
    ]


def _reference(pipe: Any, adapters: list[Adapter], order: list[str], weights: dict[str, float], offset: str) -> Any:
    """diffusers' own multi-LoRA path, switched in callback_on_step_end exactly as the published Switch code."""
    with torch.no_grad():
        for adapter in adapters:
            pipe.load_lora_weights(_peft(adapter.layers), adapter_name=adapter.name)
    pipe.set_adapters([order[0]], [weights[order[0]]])
    state = {"turn": 0}

    def callback(p: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        due = (i > 0 and i % TAU == 0) if offset == "reference" else (i + 1) % TAU == 0
        if due:
            state["turn"] += 1
            name = order[state["turn"] % len(order)]
            p.set_adapters([name], [weights[name]])
        return kwargs

    with torch.inference_mode():
        return _run(pipe, callback_on_step_end=callback)


@pytest.mark.slow
@pytest.mark.parametrize("offset", ["uniform", "reference"])
@pytest.mark.parametrize("fuse", [None, False])
def test_switch_matches_set_adapters_in_a_callback(
    tiny_sd: Any, fresh_pipeline: Any, offset: str, fuse: bool | None
) -> None:
    pipe = make_composable(tiny_sd)
    adapters = _adapters(pipe)
    weights = {"l0": 0.8, "l1": 1.2, "l2": 0.6}
    for adapter in adapters:
        pipe.add_adapter(adapter)
    pipe.set_composition(weights, method="switch", fuse=fuse, tau=TAU, switch_offset=offset)
    with torch.inference_mode():
        ours = _run(pipe)
        again = _run(pipe)  # a second generation starts from the first adapter again
    # default order by category: character (l2), style (l0), background (l1)
    expected = _reference(fresh_pipeline("tiny-sd"), adapters, ["l2", "l0", "l1"], weights, offset)
    error = float((ours - expected).abs().max() / expected.abs().max())
    assert error <= 1e-5, error
    assert torch.equal(again, ours)
    pipe.set_composition(weights, method="merge")
    with torch.inference_mode():
        merged = _run(pipe)
    assert (merged - ours).abs().max() > 1e-3  # switching is not merging: the comparison can fail


def test_active_index_offsets() -> None:
    uniform = [active_index(t, 3, 2, "uniform") for t in range(10)]
    assert uniform == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1]
    reference = [active_index(t, 3, 2, "reference") for t in range(10)]
    assert reference == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]  # first adapter runs τ+1 steps


@pytest.mark.parametrize(
    ("tau", "k", "steps", "expected"),
    [
        # the published callback switches after step t when t > 0 and t % τ == 0: the switch lands at t + 1
        (5, 3, 20, [0] * 6 + [1] * 5 + [2] * 5 + [0] * 4),
        (2, 2, 7, [0, 0, 0, 1, 1, 0, 0]),
        (1, 3, 6, [0, 0, 1, 2, 0, 1]),
        (4, 1, 9, [0] * 9),
    ],
)
def test_default_schedule_is_the_published_one(tau: int, k: int, steps: int, expected: list[int]) -> None:
    assert [active_index(t, tau, k) for t in range(steps)] == expected
    assert Switch({"a": 1.0}).switch_offset == "reference"


def test_category_order_keeps_unknowns_last_in_order() -> None:
    names = ["bg", "x", "char", "y", "style"]
    categories = ["Background", None, "character", "misc", "style"]
    assert category_order(names, categories) == ["char", "style", "bg", "x", "y"]


@pytest.mark.parametrize(
    "options",
    [{"tau": 0}, {"tau": 1.5}, {"switch_offset": "late"}, {"order": ["a"]}, {"order": "random"}, {"gamma": 1}],
)
def test_bad_options_are_typed(options: dict[str, Any]) -> None:
    with pytest.raises(CompositionError):
        Switch({"a": 1.0, "b": 1.0}, **options)
