"""Fused SHiRA switching through the public path (``set_composition``) on tiny SD: 200 random switches among 5
adapters restore the base bit-exactly, switch in place (fused states reused, adapters left attached), and fused
outputs equal the unfused reference (the engine's composed layers) within 1e-5."""

from __future__ import annotations

import math

import pytest
import torch

from composer.mixin import make_composable
from fusion.adapters import Adapter, LowRank, Sparse
from fusion.engine import FusionEngine
from fusion.sparse import shira_budget

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
def test_random_switches_through_set_composition(tiny_sd) -> None:
    """200 switches draw every single adapter and every pair of the 5 many times over (15 sets, weights fresh each
    time): each switch fuses in place, five of them check fused against unfused, and clearing leaves the base bit-exact
    however many fused states came and went."""
    pipe = make_composable(tiny_sd)
    unet = pipe.unet
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    adapters = _shira_adapters(unet, 5)
    for adapter in adapters:
        pipe.add_adapter(adapter)
    names = [a.name for a in adapters]
    inputs = _inputs(tiny_sd)
    gen = torch.Generator().manual_seed(5)
    attached: set[str] = set()
    seen: set[frozenset[str]] = set()
    for switch in range(200):
        weights = _random_weights(gen, len(adapters))
        composition = {n: float(w) for n, w in zip(names, weights) if w != 0}
        seen.add(frozenset(composition))
        pipe.set_composition(composition)
        engine = pipe.composition_engine
        assert engine.fused
        assert attached <= set(engine.adapter_names), "sparse adapters stay attached: switches happen in place"
        attached = set(engine.adapter_names)
        if switch % 40 == 0:
            fused = unet(**inputs).sample
            pipe.set_composition(composition, fuse=False)
            assert (unet(**inputs).sample - fused).abs().max() <= 1e-5
    assert attached == set(names)
    assert len(seen) == 15, "every single adapter and every pair was switched to"
    pipe.clear_composition()
    state = unet.state_dict()
    assert set(state) == set(base)
    assert all(torch.equal(state[k], base[k]) for k in base)


@torch.no_grad()
def test_switch_restores_exactly_in_half_precision(tiny_sd) -> None:
    pipe = make_composable(tiny_sd)
    unet = pipe.unet.half()
    adapters = [a.to(dtype=torch.float16) for a in _shira_adapters(unet, 3)]
    for adapter in adapters:
        pipe.add_adapter(adapter)
    weights = {k: unet.get_submodule(k).weight for a in adapters for k in a.layers}
    pristine = {k: w.clone() for k, w in weights.items()}
    for adapter in adapters * 5:
        pipe.set_composition({adapter.name: 0.8})
        key, update = next(iter(adapter.layers.items()))
        expected = (pristine[key].float() + 0.8 * update.delta(torch.float32)).half()
        assert torch.equal(unet.get_submodule(key).weight, expected)
    pipe.clear_composition()
    assert all(torch.equal(unet.get_submodule(k).weight, pristine[k]) for k in weights)


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


@torch.no_grad()
def test_set_composition_toggling_back_reuses_the_cached_fused_state(tiny_sd) -> None:
    pipe = make_composable(tiny_sd)
    first, second = _shira_adapters(pipe.unet, 2)
    pipe.add_adapter(first)
    pipe.add_adapter(second)
    pipe.set_composition({first.name: 1.0, second.name: 0.5})  # attach both
    pipe.set_composition({first.name: 1.0})
    layers = pipe.composition_engine.layers
    states = {key: layers[key]._saved for key in first.layers}
    pipe.set_composition({second.name: 1.0})
    pipe.set_composition({first.name: 1.0})
    assert all(layers[key]._saved is state for key, state in states.items())
    pipe.clear_composition()


@torch.no_grad()
def test_removing_an_inactive_attached_adapter_keeps_the_composition_fused_in_place(tiny_sd) -> None:
    pipe = make_composable(tiny_sd)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    first, second = _shira_adapters(pipe.unet, 2)
    pipe.add_adapter(first)
    pipe.add_adapter(second)
    pipe.set_composition({first.name: 1.0})
    pipe.set_composition({second.name: 1.0})
    layers = pipe.composition_engine.layers
    states = {key: layers[key]._saved for key in second.layers}
    fused = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.remove_adapter(first.name)
    assert pipe.composition["weights"] == {second.name: 1.0}
    assert all(layers[key]._saved is state for key, state in states.items()), "re-fused without a write"
    assert all(torch.equal(v, fused[k]) for k, v in pipe.unet.state_dict().items())
    pipe.clear_composition()
    assert all(torch.equal(v, base[k]) for k, v in pipe.unet.state_dict().items())


@torch.no_grad()
def test_a_new_lora_joining_a_fused_shira_composition_attaches_in_place_and_restores(tiny_sd) -> None:
    pipe = make_composable(tiny_sd)
    unet = pipe.unet
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    (shira,) = _shira_adapters(unet, 1)
    key = next(iter(shira.layers))
    shape = tuple(unet.get_submodule(key).weight.shape)
    gen = torch.Generator().manual_seed(3)
    lora = Adapter("lora", "sd1", {key: LowRank(torch.randn(4, shape[1], generator=gen), torch.randn(shape[0], 4))})
    pipe.add_adapter(shira)
    pipe.add_adapter(lora)
    pipe.set_composition({shira.name: 1.0})
    pipe.set_composition({lora.name: 0.7})  # not attached yet: joins while the SHiRA weights are fused
    expected = base[f"{key}.weight"] + 0.7 * lora.layers[key].delta()
    assert torch.allclose(unet.get_submodule(key).weight, expected, atol=1e-5)
    pipe.set_composition({shira.name: 0.5})
    expected = (base[f"{key}.weight"].flatten().float() + 0.5 * shira.layers[key].delta().flatten()).reshape(shape)
    assert torch.equal(unet.get_submodule(key).weight, expected)
    pipe.clear_composition()
    assert all(torch.equal(v, base[k]) for k, v in unet.state_dict().items())
