"""FusionEngine: atomic attach, bit-exact restore over many random cycles, the step index, the hooked forward."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch import nn

from fusion.adapters import Adapter, Dense, LowRank, Sparse
from fusion.engine import FusionEngine
from fusion.errors import CompositionError, ShapeMismatchError
from fusion.layers import ComposedLayer
from fusion.strategies import get_strategy
from fusion.strategies.base import StepContext, Strategy


def _snapshot(module: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, type]]]:
    params = {k: v.detach().clone() for k, v in module.state_dict().items()}
    tree = [(name, type(m)) for name, m in module.named_modules()]
    return params, tree


def _assert_identical(module: nn.Module, snapshot: tuple[dict[str, torch.Tensor], list[tuple[str, type]]]) -> None:
    params, tree = snapshot
    now = module.state_dict()
    assert list(now) == list(params)
    for key, value in params.items():
        assert torch.equal(now[key], value), key
    assert [(name, type(m)) for name, m in module.named_modules()] == tree
    assert "forward" not in module.__dict__


def _low_rank(shape: tuple[int, ...], rank: int, g: torch.Generator, dtype: torch.dtype = torch.float32) -> LowRank:
    down = torch.randn(rank, *shape[1:], generator=g) * 0.1
    up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.1
    return LowRank(down.to(dtype), up.to(dtype), alpha=rank / 2)


def _adapter(name: str, shapes: dict[str, tuple[int, ...]], keys: list[str], seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter(name, "sd1", {k: _low_rank(shapes[k], 1 + seed % 5, g) for k in keys})


def _engine(pipe: Any) -> FusionEngine:
    return FusionEngine(
        pipe.unet,
        text_encoders={"text_encoder": pipe.text_encoder},
        scheduler=pipe.scheduler,
        family="sd1",
    )


def _attention_keys(engine: FusionEngine) -> list[str]:
    return [k for k in engine.expected_shapes if ".attn" in k and not k.startswith("text_encoder")]


def test_bad_adapter_among_good_ones_changes_nothing(tiny_sd: Any) -> None:
    engine = _engine(tiny_sd)
    keys = _attention_keys(engine)
    shapes = engine.expected_shapes
    engine.add_adapter(_adapter("live", shapes, keys[:6], seed=0))
    engine.set_strategy(get_strategy("merge")({"live": 0.8}))
    assert engine.fused
    unet_before = _snapshot(tiny_sd.unet)
    text_before = _snapshot(tiny_sd.text_encoder)
    bad_shape = dict(shapes)
    bad_shape[keys[3]] = (shapes[keys[3]][0] + 1, shapes[keys[3]][1])
    good1 = _adapter("good1", shapes, keys, seed=1)
    good2 = _adapter("good2", shapes, keys[::2], seed=2)
    bad = _adapter("bad", bad_shape, keys[:5], seed=3)
    with pytest.raises(ShapeMismatchError, match="bad"):
        engine.add_adapters([good1, bad, good2])
    unknown_key = Adapter("ghost", "sd1", {"down_blocks.9.nothing": good1.layers[keys[0]]})
    with pytest.raises(ShapeMismatchError, match="does not have"):
        engine.add_adapters([good1, unknown_key])
    with pytest.raises(CompositionError, match="already attached"):
        engine.add_adapters([good1, _adapter("good1", shapes, keys[:1], seed=4)])
    state = tiny_sd.unet.state_dict()
    for key, value in unet_before[0].items():
        assert torch.equal(state[key], value), key
    assert [(n, type(m)) for n, m in tiny_sd.unet.named_modules()] == unet_before[1]
    _assert_identical(tiny_sd.text_encoder, text_before)
    assert engine.adapter_names == ["live"]
    assert engine.fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_random_cycles_restore_bit_exactly(tiny_sd: Any, dtype: torch.dtype) -> None:
    """1000 random attach / fuse / unfuse / reweight / detach operations, then clear: every weight is identical."""
    tiny_sd.unet.to(dtype)
    before = _snapshot(tiny_sd.unet)
    engine = _engine(tiny_sd)
    keys = [*_attention_keys(engine)[:6], "down_blocks.0.resnets.0.conv1", "conv_in"]
    shapes = engine.expected_shapes
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    counter = 0
    for _ in range(1000):
        op = rng.random()
        attached = engine.adapter_names
        if op < 0.25 and len(attached) < 5:
            chosen = rng.sample(keys, rng.randint(1, len(keys)))
            layers: dict[str, Any] = {}
            for key in chosen:
                shape = shapes[key]
                kind = rng.choice(["low", "low", "dense", "sparse"])
                if kind == "low":
                    layers[key] = _low_rank(shape, rng.randint(1, 4), g, dtype)
                elif kind == "dense":
                    layers[key] = Dense(torch.randn(shape, generator=g).to(dtype) * 0.01)
                else:
                    numel = torch.Size(shape).numel()
                    index = torch.randperm(numel, generator=g)[: max(1, numel // 50)].sort().values
                    layers[key] = Sparse(index, torch.randn(index.numel(), generator=g).to(dtype), shape)
            counter += 1
            engine.add_adapter(Adapter(f"a{counter}", "sd1", layers))
        elif op < 0.4 and attached:
            engine.remove_adapter(rng.choice(attached))
        elif op < 0.7 and attached:
            engine.fuse([rng.uniform(-2, 2) for _ in attached])
        elif op < 0.85:
            engine.unfuse()
        elif attached:
            engine.set_weights([rng.uniform(-2, 2) for _ in attached])
    engine.fuse(torch.ones(len(engine.adapter_names)))
    fused_now = {k.replace(".base.", "."): v for k, v in tiny_sd.unet.state_dict().items()}
    assert engine.adapter_names
    assert any(not torch.equal(v, before[0][k]) for k, v in fused_now.items()), "fusing must change some weight"
    engine.clear()
    _assert_identical(tiny_sd.unet, before)


def test_step_index_follows_the_scheduler(tiny_sd: Any) -> None:
    """Every denoiser call sees its index in scheduler.timesteps; a new generation starts again at 0."""
    engine = _engine(tiny_sd)
    engine.add_adapter(_adapter("a", engine.expected_shapes, _attention_keys(engine)[:2], seed=0))
    calls: list[tuple[int, int]] = []
    starts: list[int] = []

    class Recorder(Strategy):
        def start_generation(self, engine: FusionEngine, num_steps: int) -> None:
            starts.append(num_steps)

        def step(self, ctx: StepContext) -> Any:
            calls.append((ctx.step, ctx.num_steps))
            return ctx.run()

    engine.set_strategy(Recorder({"a": 1.0}))
    tiny_sd("x", num_inference_steps=4, height=32, width=32, output_type="latent")
    tiny_sd("x", num_inference_steps=3, height=32, width=32, output_type="latent")
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4), (0, 3), (1, 3), (2, 3)]
    assert starts == [4, 3]


def test_clear_unwraps_and_restores(tiny_sd: Any) -> None:
    before = _snapshot(tiny_sd.unet)
    engine = _engine(tiny_sd)
    assert "forward" in tiny_sd.unet.__dict__
    keys = _attention_keys(engine)
    engine.add_adapters(
        [_adapter("a", engine.expected_shapes, keys, 0), _adapter("b", engine.expected_shapes, keys, 1)]
    )
    layer = engine.layers[keys[0]]
    assert isinstance(layer, ComposedLayer)
    assert layer.weight is layer.base.weight, "diffusers code still finds .weight on a composed layer"
    engine.set_strategy(get_strategy("merge")({"a": 1.0, "b": 0.5}))
    with pytest.raises(CompositionError, match="active composition"):
        engine.remove_adapter("a")
    engine.clear()
    _assert_identical(tiny_sd.unet, before)


def test_state_dict_keeps_the_base_names_while_composed(tiny_sd: Any) -> None:
    """Saving a composed UNet writes the usual keys (fused weights while fused); loading routes them to the base."""
    unet = tiny_sd.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    engine = _engine(tiny_sd)
    keys = _attention_keys(engine)
    engine.add_adapter(_adapter("a", engine.expected_shapes, keys, 0))
    engine.set_strategy(get_strategy("merge")({"a": 1.0}))
    fused = unet.state_dict()
    assert list(fused) == list(before)
    assert not torch.equal(fused[f"{keys[0]}.weight"], before[f"{keys[0]}.weight"])
    engine.set_strategy(None)
    shifted = {k: v + 1 if v.is_floating_point() else v for k, v in before.items()}
    unet.load_state_dict(shifted)
    assert torch.equal(engine.layers[keys[0]].base.weight, shifted[f"{keys[0]}.weight"])


def test_true_cfg_calls_share_their_step(tiny_flux: Any) -> None:
    """Flux with true CFG calls the transformer twice per step (timestep/1000): both calls see the same step."""
    engine = FusionEngine(tiny_flux.transformer, scheduler=tiny_flux.scheduler, family="flux")
    calls: list[int] = []

    class Recorder(Strategy):
        def step(self, ctx: StepContext) -> Any:
            calls.append(ctx.step)
            return ctx.run()

    engine.set_strategy(Recorder({}))
    args = {"num_inference_steps": 3, "height": 32, "width": 32, "output_type": "latent"}
    tiny_flux("x", negative_prompt="y", true_cfg_scale=2.0, **args)
    assert calls == [0, 0, 1, 1, 2, 2]


def _shira(name: str, shapes: dict[str, tuple[int, ...]], keys: list[str], seed: int, **meta: Any) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for key in keys:
        numel = torch.Size(shapes[key]).numel()
        index = torch.randperm(numel, generator=g)[: numel // 20].sort().values
        layers[key] = Sparse(index, torch.randn(index.numel(), generator=g) * 0.1, shapes[key])
    return Adapter(name, "sd1", layers, meta=dict(meta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shira_fuse_scatters_without_pristine_copies(tiny_sd: Any, dtype: torch.dtype) -> None:
    """Sparse-only layers fuse by scatter (saved originals, no pristine copy); 300 random switches among 5 SHiRA
    adapters equal the dense sum and leave every weight bit-identical after clear."""
    tiny_sd.unet.to(dtype)
    before = _snapshot(tiny_sd.unet)
    engine = FusionEngine(tiny_sd.unet, family="sd1")
    keys = _attention_keys(engine)
    adapters = [_shira(f"s{i}", engine.expected_shapes, keys[i % 3 :: 1 + i % 2], seed=i) for i in range(5)]
    engine.add_adapters(adapters)
    rng = random.Random(1)
    for switch in range(300):
        weights = torch.zeros(5)
        for i in rng.sample(range(5), rng.randint(0, 3)):
            weights[i] = rng.uniform(-1.5, 1.5)
        engine.fuse(weights)
        if switch % 100 == 0:
            assert all(layer.pristine is None for layer in engine.layers.values())
            key = keys[0]
            layer = engine.layers[key]
            expected = before[0][f"{key}.weight"].float() + layer.delta(weights)
            assert torch.equal(layer.base.weight, expected.to(dtype))
    engine.set_weights(torch.ones(5))
    engine.fuse(torch.zeros(5))
    engine.clear()
    _assert_identical(tiny_sd.unet, before)


def test_shira_for_another_base_is_refused_before_anything_changes(tiny_sd: Any) -> None:
    from fusion.sparse import BaseMismatchError, base_fingerprint

    engine = _engine(tiny_sd)
    keys = _attention_keys(engine)[:4]
    weights = {
        key: engine.layers[key].weight if key in engine.layers else tiny_sd.unet.get_submodule(key).weight
        for key in keys
    }
    good = _shira("good", engine.expected_shapes, keys, seed=0, base_fingerprint=base_fingerprint(weights))
    other = {key: w + 1.0 for key, w in weights.items()}
    foreign = _shira("foreign", engine.expected_shapes, keys, seed=1, base_fingerprint=base_fingerprint(other))
    engine.add_adapter(_adapter("live", engine.expected_shapes, keys, seed=2))
    engine.set_strategy(get_strategy("merge")({"live": 1.0}))
    before = _snapshot(tiny_sd.unet)
    with pytest.raises(BaseMismatchError, match="foreign"):
        engine.add_adapters([good, foreign])
    state = tiny_sd.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before[0].items())
    engine.add_adapters([good])  # fused "live" changed the weights; the check reads the pristine ones
    assert engine.adapter_names == ["live", "good"]


def test_muting_gives_the_base_output_and_is_refused_while_fused(tiny_sd: Any) -> None:
    engine = _engine(tiny_sd)
    keys = _attention_keys(engine)
    engine.add_adapter(_adapter("live", engine.expected_shapes, keys, seed=0))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 7, tiny_sd.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = tiny_sd.unet(x, 10, encoder_hidden_states=text).sample
        engine.set_strategy(get_strategy("merge")({"live": 0.8}, fuse=False))
        with engine.muted():
            muted = tiny_sd.unet(x, 10, encoder_hidden_states=text).sample
        adapted = tiny_sd.unet(x, 10, encoder_hidden_states=text).sample
        torch.testing.assert_close(muted, base, atol=0, rtol=0)
        assert (adapted - base).abs().max() > 1e-4
        engine.set_strategy(get_strategy("merge")({"live": 0.8}))
        assert engine.fused
        with pytest.raises(CompositionError, match="fused"), engine.muted():
            pass
        engine.set_branches("conditional")
        engine.reset_generation(cfg_halves=True)
        with pytest.raises(CompositionError, match="fused"):
            tiny_sd.unet(x, 10, encoder_hidden_states=text)
    engine.clear()
