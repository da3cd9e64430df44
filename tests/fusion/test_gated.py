"""Gated fusion on tiny SD: open gates reproduce unfused Merge, table mode is the weight table, gates are recorded."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from fusion.adapters import Adapter, LowRank
from fusion.engine import FusionEngine
from fusion.errors import CompositionError
from fusion.gates import GateBank
from fusion.strategies import get_strategy
from fusion.strategies.gated import initial_gates


def _adapters(engine: FusionEngine, count: int = 3) -> list[Adapter]:
    g = torch.Generator().manual_seed(0)
    keys = [k for k in engine.expected_shapes if ".attn" in k and not k.startswith("text_encoder")]
    adapters = []
    for i in range(count):
        layers = {}
        for key in keys[i % 2 :: 1 + i % 2]:
            out, inp = engine.expected_shapes[key]
            rank = 2 + 2 * i
            layers[key] = LowRank(torch.randn(rank, inp, generator=g) * 0.2, torch.randn(out, rank, generator=g) * 0.2)
        adapters.append(Adapter(f"a{i}", "sd1", layers))
    return adapters


def _engine(pipe: Any) -> FusionEngine:
    engine = FusionEngine(pipe.unet, scheduler=pipe.scheduler, family="sd1")
    engine.add_adapters(_adapters(engine))
    return engine


def _inputs(pipe: Any) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(2, 5, pipe.text_encoder.config.hidden_size, generator=g),
    }


WEIGHTS = {"a0": 0.8, "a1": 0.5, "a2": 1.2}


@torch.no_grad()
def test_open_gates_reproduce_unfused_merge(tiny_sd: Any) -> None:
    engine = _engine(tiny_sd)
    inputs = _inputs(tiny_sd)
    engine.set_strategy(get_strategy("merge")(WEIGHTS, fuse=False))
    merged = tiny_sd.unet(**inputs).sample
    strategy = get_strategy("gated")(WEIGHTS, gates=initial_gates(engine))
    engine.set_strategy(strategy)
    assert strategy.mode == "learned"
    assert isinstance(strategy.gates, GateBank)
    assert len(strategy.gated_layers) == len(strategy.gates.keys) > 0
    gated_fresh = tiny_sd.unet(**inputs).sample
    assert (gated_fresh - merged).abs().max() > 1e-3, "reference-initialised gates are not all open"
    for gate in strategy.gates.gates:
        for name in ("u_b", "u_l", "u_c"):
            getattr(gate, name).zero_()
        gate.beta.fill_(math.inf)  # sigmoid(+inf) = 1 exactly: g = 1; u_out stays 1
        gate.time.weight.normal_()  # a finite timestep term cannot close an infinitely open gate
    gated = tiny_sd.unet(**inputs).sample
    assert (gated - merged).abs().max() <= 1e-5
    engine.clear()


@torch.no_grad()
def test_table_mode_is_the_weight_table_and_is_recorded(tiny_sd: Any) -> None:
    engine = _engine(tiny_sd)
    specs = {"a0": [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], "a1": "0@0,1@1", "a2": 0.7}
    engine.set_strategy(get_strategy("merge")(specs, fuse=False))
    args = {"num_inference_steps": 3, "height": 32, "width": 32, "output_type": "latent"}
    merged = tiny_sd("x", generator=torch.Generator().manual_seed(0), **args).images
    strategy = get_strategy("gated")(specs, mode="table", scores={"a2": 0.5}, record=True)
    engine.set_strategy(strategy)
    halved = get_strategy("merge")({**specs, "a2": 0.35}, fuse=False)
    gated = tiny_sd("x", generator=torch.Generator().manual_seed(0), **args).images
    engine.set_strategy(halved)
    expected = tiny_sd("x", generator=torch.Generator().manual_seed(0), **args).images
    assert (gated - expected).abs().max() <= 1e-6
    assert (gated - merged).abs().max() > 1e-4, "the score scales a2"
    assert strategy.recorder is not None
    values = strategy.recorder.result()
    assert values.shape[0] == 3
    a1 = engine.adapter_names.index("a1")
    row = next(i for i, key in enumerate(strategy.recorder.layer_keys) if "a1" in engine.layers[key].names)
    assert values[:, row, a1].tolist() == pytest.approx([0.0, 0.5, 1.0])
    engine.clear()


@torch.no_grad()
def test_learned_gates_are_recorded_per_step_during_a_generation(tiny_sd: Any) -> None:
    engine = _engine(tiny_sd)
    strategy = get_strategy("gated")(WEIGHTS, gates=initial_gates(engine, seed=3), record=True)
    engine.set_strategy(strategy)
    for gate in strategy.gates.gates:
        gate.time.weight.normal_(std=5.0)  # make the gates depend on the timestep
    tiny_sd("x", num_inference_steps=3, height=32, width=32, output_type="latent")
    values = strategy.recorder.result()
    assert values.shape == (3, len(strategy.gated_layers), 3)
    seen = ~torch.isnan(values)
    assert seen.any(dim=(0, 2)).all(), "every gated layer recorded a gate"
    assert ((values[seen] > 0) & (values[seen] < 1)).all()
    assert not torch.allclose(values[0].nan_to_num(), values[2].nan_to_num()), "gates change with the timestep"
    engine.clear()


@torch.no_grad()
def test_gated_without_gates_is_the_table_mode_never_random_gates(tiny_sd: Any) -> None:
    engine = _engine(tiny_sd)
    inputs = _inputs(tiny_sd)
    engine.set_strategy(get_strategy("merge")(WEIGHTS, fuse=False))
    merged = tiny_sd.unet(**inputs).sample
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)  # random gates would differ between these two runs
        strategy = get_strategy("gated")(WEIGHTS)
        engine.set_strategy(strategy)
        assert strategy.mode == "table"
        assert strategy.gates is None
        assert all(layer.mixer is None for layer in engine.layers.values())
        outputs.append(tiny_sd.unet(**inputs).sample)
    assert torch.equal(outputs[0], outputs[1])
    assert (outputs[0] - merged).abs().max() <= 1e-6
    engine.clear()


def test_learned_mode_without_trained_gates_names_train_gates() -> None:
    with pytest.raises(CompositionError, match="compose train-gates") as caught:
        get_strategy("gated")({"a": 1.0}, mode="learned")
    assert "mode='table'" in str(caught.value)


def test_bad_options_are_typed() -> None:
    gated = get_strategy("gated")
    with pytest.raises(CompositionError, match="fused"):
        gated({"a": 1.0}, fuse=True)
    with pytest.raises(CompositionError, match="mode"):
        gated({"a": 1.0}, mode="dense")
    with pytest.raises(CompositionError, match="GateBank"):
        gated({"a": 1.0}, gates="name")
    with pytest.raises(CompositionError, match="unknown options"):
        gated({"a": 1.0}, seed=0)
    with pytest.raises(CompositionError, match="outside"):
        gated({"a": 1.0}, scores={"b": 0.5})
