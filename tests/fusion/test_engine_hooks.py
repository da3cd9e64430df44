"""The engine's entry through diffusers hooks, the step index from the scheduler, and the models it refuses.

Hooks present before attach (accelerate's, diffusers') survive clear; hooks added after attach keep working after
clear; the step index comes from the scheduler (step_index, or the exact timestep for stateless schedulers), and a
step-dependent composition where no step can be known is a typed error. Quantised weights are refused up front.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from accelerate.hooks import ModelHook as AccelerateHook
from accelerate.hooks import add_hook_to_module, remove_hook_from_module
from diffusers import EulerDiscreteScheduler
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from fusion.adapters import Adapter, LowRank
from fusion.engine import FusionEngine
from fusion.errors import StepUnknownError, UnsupportedModelError
from fusion.strategies import get_strategy
from fusion.strategies.base import StepContext, Strategy

ARGS = {"num_inference_steps": 3, "height": 32, "width": 32, "output_type": "latent"}


class CountingAccelerateHook(AccelerateHook):
    def __init__(self) -> None:
        self.calls = 0

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.calls += 1
        return args, kwargs


class CountingDiffusersHook(ModelHook):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.calls += 1
        return args, kwargs


class StepRecorder(Strategy):
    def __init__(self, weights: dict[str, Any]) -> None:
        super().__init__(weights)
        self.calls: list[tuple[int, int]] = []

    def step(self, ctx: StepContext) -> Any:
        self.calls.append((ctx.step, ctx.num_steps))
        return ctx.run()


def _adapter(engine: FusionEngine, name: str = "a", seed: int = 0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    keys = [k for k in engine.expected_shapes if ".attn" in k and not k.startswith("text_encoder")][:4]
    layers = {}
    for key in keys:
        out, inp = engine.expected_shapes[key]
        layers[key] = LowRank(torch.randn(4, inp, generator=g) * 0.3, torch.randn(out, 4, generator=g) * 0.3)
    return Adapter(name, "sd1", layers)


def _latents(pipe: Any, seed: int = 0) -> torch.Tensor:
    return pipe("x", generator=torch.Generator().manual_seed(seed), **ARGS).images


def test_clear_leaves_no_trace_without_other_hooks(tiny_sd: Any) -> None:
    unet = tiny_sd.unet
    engine = FusionEngine(unet, scheduler=tiny_sd.scheduler, family="sd1")
    assert HookRegistry.check_if_exists_or_initialize(unet).get_hook("lora_composer") is not None
    engine.clear()
    assert not hasattr(unet, "_diffusers_hook")
    assert "forward" not in unet.__dict__


@pytest.mark.parametrize("kind", ["accelerate", "diffusers"])
def test_hooks_present_before_attach_survive_clear(tiny_sd: Any, kind: str) -> None:
    unet = tiny_sd.unet
    if kind == "accelerate":
        hook: Any = CountingAccelerateHook()
        add_hook_to_module(unet, hook)
    else:
        hook = CountingDiffusersHook()
        HookRegistry.check_if_exists_or_initialize(unet).register_hook(hook, "counter")
    forward_before = unet.__dict__["forward"]
    plain = _latents(tiny_sd)
    engine = FusionEngine(unet, scheduler=tiny_sd.scheduler, family="sd1")
    engine.add_adapter(_adapter(engine))
    engine.set_strategy(get_strategy("merge")({"a": "0@0,1@1"}))
    calls = hook.calls
    composed = _latents(tiny_sd)
    assert hook.calls == calls + 3, "the earlier hook still runs while composed"
    assert not torch.equal(composed, plain)
    engine.clear()
    assert unet.__dict__["forward"] is forward_before
    calls = hook.calls
    assert torch.equal(_latents(tiny_sd), plain)
    assert hook.calls == calls + 3, "the earlier hook still runs after clear"
    if kind == "accelerate":
        remove_hook_from_module(unet)
    else:
        HookRegistry.check_if_exists_or_initialize(unet).remove_hook("counter")


def test_accelerate_hook_added_after_attach_survives_clear(tiny_sd: Any) -> None:
    unet = tiny_sd.unet
    plain = _latents(tiny_sd)
    engine = FusionEngine(unet, scheduler=tiny_sd.scheduler, family="sd1")
    engine.add_adapter(_adapter(engine))
    engine.set_strategy(get_strategy("merge")({"a": 1.0}, fuse=False))
    hook = CountingAccelerateHook()
    add_hook_to_module(unet, hook)
    composed = _latents(tiny_sd)
    assert hook.calls == 3
    assert not torch.equal(composed, plain)
    engine.clear()
    assert torch.equal(_latents(tiny_sd), plain), "the engine is a pass-through after clear"
    assert hook.calls == 6, "the later hook was not dropped by clear"
    again = FusionEngine(unet, scheduler=tiny_sd.scheduler, family="sd1")  # reuses the pass-through hook
    again.add_adapter(_adapter(again))
    again.set_strategy(get_strategy("merge")({"a": 1.0}, fuse=False))
    assert torch.equal(_latents(tiny_sd), composed)
    again.clear()
    remove_hook_from_module(unet)


def test_step_index_comes_from_a_stateful_scheduler(tiny_sd: Any) -> None:
    tiny_sd.scheduler = EulerDiscreteScheduler.from_config(tiny_sd.scheduler.config)
    engine = FusionEngine(tiny_sd.unet, scheduler=lambda: tiny_sd.scheduler, family="sd1")
    engine.add_adapter(_adapter(engine))
    recorder = StepRecorder({"a": 1.0})
    engine.set_strategy(recorder)
    _latents(tiny_sd)
    tiny_sd("x", num_inference_steps=4, height=32, width=32, output_type="latent")
    assert recorder.calls == [(0, 3), (1, 3), (2, 3), (0, 4), (1, 4), (2, 4), (3, 4)]
    engine.clear()


def test_step_dependent_weights_without_a_step_are_typed_errors(tiny_sd: Any) -> None:
    engine = FusionEngine(tiny_sd.unet, family="sd1")
    engine.add_adapter(_adapter(engine))
    with pytest.raises(StepUnknownError, match="scheduler"):
        engine.set_strategy(get_strategy("merge")({"a": "0@0,1@1"}))
    engine.set_strategy(get_strategy("merge")({"a": 0.5}))  # constant weights need no step
    engine.clear()

    engine = FusionEngine(tiny_sd.unet, scheduler=tiny_sd.scheduler, family="sd1")
    engine.add_adapter(_adapter(engine))
    engine.set_strategy(get_strategy("merge")({"a": "0@0,1@1"}))
    g = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(1, 4, 4, 4, generator=g),
        "timestep": torch.tensor(333.5),  # no element of the scheduler's table
        "encoder_hidden_states": torch.randn(1, 5, tiny_sd.text_encoder.config.hidden_size, generator=g),
    }
    with pytest.raises(StepUnknownError, match="pipeline"):
        tiny_sd.unet(**inputs)
    engine.clear()


class FakeQuantisedParameter(nn.Parameter):
    """Stands in for bitsandbytes' Params4bit / diffusers' GGUFParameter: a Parameter subclass holding packed data."""


@pytest.mark.parametrize("how", ["parameter class", "integer storage"])
def test_quantised_bases_are_refused_before_anything_changes(tiny_sd: Any, how: str) -> None:
    unet = tiny_sd.unet
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    original = layer.weight
    if how == "parameter class":
        layer.weight = FakeQuantisedParameter(original.detach().clone(), requires_grad=False)
    else:
        layer.weight = nn.Parameter(original.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(UnsupportedModelError, match="quantised"):
        FusionEngine(unet, scheduler=tiny_sd.scheduler, family="sd1")
    assert not hasattr(unet, "_diffusers_hook")
    layer.weight = original


def test_bf16_composition_equals_fp32_within_bf16_tolerance(tiny_sd: Any) -> None:
    weights = {"a": 0.8, "b": "0@0,1@1"}
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        tiny_sd.unet.to(dtype)
        engine = FusionEngine(tiny_sd.unet, scheduler=tiny_sd.scheduler, family="sd1")
        engine.add_adapters([_adapter(engine, "a", 0), _adapter(engine, "b", 1)])
        engine.set_strategy(get_strategy("merge")(weights))
        g = torch.Generator().manual_seed(0)
        sample = torch.randn(2, 4, 8, 8, generator=g)
        text = torch.randn(2, 5, tiny_sd.text_encoder.config.hidden_size, generator=g)
        tiny_sd.scheduler.set_timesteps(3)
        with torch.no_grad():
            out = tiny_sd.unet(sample.to(dtype), tiny_sd.scheduler.timesteps[1], text.to(dtype)).sample
        results[dtype] = out.float()
        engine.clear()
    tiny_sd.unet.to(torch.float32)
    reference, low = results[torch.float32], results[torch.bfloat16]
    scale = reference.abs().max()
    assert (low - reference).abs().max() <= 3e-2 * scale, "bf16 rounding (2^-8 relative) through a tiny UNet"
    assert (low - reference).abs().mean() <= 5e-3 * scale
