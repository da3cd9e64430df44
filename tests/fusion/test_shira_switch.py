"""Fused SHiRA switching on tiny SD: 1000 random switches among 5 adapters restore the base bit-exactly, and fused
outputs equal the unfused reference (the engine's composed layers) within 1e-5."""

from __future__ import annotations

import math

import pytest
import torch

from fusion.adapters import Adapter, Sparse
from fusion.engine import FusionEngine
from fusion.sparse import shira_budget
from fusion.sparse_switching import SparseSwitcher

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def _shira_adapters(unet: torch.nn.Module, count: int, r: int = 2) -> list[Adapter]:
    gen = torch.Generator().manual_seed(11)
    keys = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(ATTENTION)]
    adapters = []
    for i in range(count):
        layers = {}
        for key in keys[i % 2 :: 1 + i % 2]:
            shape = tuple(unet.get_submodule(key).weight.shape)
            k = shira_budget(shape, r)
            index = torch.randperm(math.prod(shape), generator=gen)[:k].sort().values
            layers[key] = Sparse(index, torch.randn(k, generator=gen) * 0.05, shape)
        adapters.append(Adapter(f"shira{i}", "sd1", layers))
    return adapters


def _inputs(pipe) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=gen),
        "timestep": torch.tensor(300),
        "encoder_hidden_states": torch.randn(1, 5, pipe.text_encoder.config.hidden_size, generator=gen),
    }


def _random_weights(gen: torch.Generator, count: int) -> torch.Tensor:
    weights = torch.zeros(count)
    chosen = torch.randperm(count, generator=gen)[: int(torch.randint(1, 3, (1,), generator=gen))]
    weights[chosen] = torch.rand(len(chosen), generator=gen) * 1.5
    return weights


@torch.no_grad()
@pytest.mark.slow
def test_thousand_switches_through_the_sparse_switcher_and_the_engine(tiny_sd) -> None:
    unet = tiny_sd.unet
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    adapters = _shira_adapters(unet, 5)
    inputs = _inputs(tiny_sd)
    engine = FusionEngine(unet, family="sd1")
    engine.add_adapters(adapters)
    switcher = SparseSwitcher({key: layer.base.weight for key, layer in engine.layers.items()})
    gen = torch.Generator().manual_seed(5)
    zeros = torch.zeros(len(adapters))
    for switch in range(1000):
        weights = _random_weights(gen, len(adapters))
        switcher.apply([(a, float(w)) for a, w in zip(adapters, weights) if w != 0])
        if switch % 200 == 0:
            engine.set_weights(zeros)
            fused = unet(**inputs).sample
            switcher.restore()
            engine.set_weights(weights)
            reference = unet(**inputs).sample
            assert (fused - reference).abs().max() <= 1e-5
            engine.set_weights(zeros)
    switcher.restore()
    for switch in range(1000):
        weights = _random_weights(gen, len(adapters))
        engine.fuse(weights)
        if switch % 250 == 0:
            fused = unet(**inputs).sample
            engine.unfuse()
            engine.set_weights(weights)
            assert (unet(**inputs).sample - fused).abs().max() <= 1e-5
    engine.clear()
    state = unet.state_dict()
    assert set(state) == set(base)
    assert all(torch.equal(state[k], base[k]) for k in base)


def test_switch_restores_exactly_in_half_precision(tiny_sd) -> None:
    unet = tiny_sd.unet.half()
    adapters = [a.to(dtype=torch.float16) for a in _shira_adapters(unet, 3)]
    weights = {k: unet.get_submodule(k).weight for a in adapters for k in a.layers}
    pristine = {k: w.clone() for k, w in weights.items()}
    switcher = SparseSwitcher(weights)
    for adapter in adapters * 5:
        switcher.apply([(adapter, 0.8)])
        key, update = next(iter(adapter.layers.items()))
        expected = (pristine[key].float() + 0.8 * update.delta(torch.float32)).half()
        assert torch.equal(weights[key], expected)
    switcher.restore()
    assert all(torch.equal(weights[k], pristine[k]) for k in weights)


@torch.no_grad()
def test_engine_toggling_back_to_a_fused_set_reuses_it_exactly(tiny_sd) -> None:
    unet = tiny_sd.unet
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    adapters = _shira_adapters(unet, 3)
    engine = FusionEngine(unet, family="sd1")
    engine.add_adapters(adapters)
    first, second = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 0.8, 0.0])
    engine.fuse(first)
    fused_first = {k: v.clone() for k, v in unet.state_dict().items()}
    states = {key: layer._saved for key, layer in engine.layers.items() if layer._saved is not None}
    engine.fuse(second)
    engine.fuse(first)
    assert all(torch.equal(v, fused_first[k]) for k, v in unet.state_dict().items())
    reused = [engine.layers[key]._saved is state for key, state in states.items() if state.index.numel()]
    assert reused
    assert all(reused)
    engine.unfuse()
    assert all(torch.equal(v, base[k]) for k, v in unet.state_dict().items())
