"""LoRA Composite: sequential equals the formula of docs/methods.md#lora-composite from single-LoRA predictions
(diffusers' own LoRA path); batched (one forward, per-sample gates) equals sequential, also when chunked."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lora_factories import random_lora
from torch import nn

from composer.mixin import make_composable
from fusion.adapters import Adapter
from fusion.errors import CompositionError
from fusion.strategies.composite import Composite

STEPS = 4
GUIDANCE = 6.0


def _setup(pipe: Any, k: int = 3) -> list[Adapter]:
    pipe = make_composable(pipe)
    adapters = [
        Adapter(f"l{i}", "sd1", random_lora(pipe.unet, 2 + i, seed=10 + i, every=i + 1, alpha=(2 + i) / 2))
        for i in range(k)
    ]
    for adapter in adapters:
        pipe.add_adapter(adapter)
    return adapters


def _run(pipe: Any) -> torch.Tensor:
    with torch.inference_mode():
        out = pipe(
            "a corgi astronaut",
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            height=32,
            width=32,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
    return out.images


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.slow
def test_sequential_equals_the_formula_from_single_lora_runs(tiny_sd: Any, fresh_pipeline: Any) -> None:
    adapters = _setup(tiny_sd)
    weights = {"l0": 0.8, "l1": 1.1, "l2": 0.5}
    mix = {"l0": 1.5, "l1": 1.0, "l2": 0.7}
    tiny_sd.set_composition(weights, method="composite", mode="sequential", mix=mix)
    calls: list[tuple[tuple, dict, torch.Tensor]] = []

    def capture(_m: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        calls.append((args, dict(kwargs), output[0].clone()))

    hook = tiny_sd.unet.register_forward_hook(capture, with_kwargs=True)
    _run(tiny_sd)
    hook.remove()
    assert len(calls) == STEPS

    reference = fresh_pipeline("tiny-sd")  # diffusers' own LoRA path, no engine
    with torch.no_grad():
        for adapter in adapters:
            state = {}
            for name, update in adapter.layers.items():
                state[f"unet.{name}.lora_A.weight"] = update.down.clone()
                state[f"unet.{name}.lora_B.weight"] = update.up.clone() * update.scale
            reference.load_lora_weights(state, adapter_name=adapter.name)
    for step in (0, STEPS - 1):
        args, kwargs, ours = calls[step]
        kwargs = {**kwargs, "return_dict": False}
        formula = torch.zeros_like(ours[:1])
        for name, weight in weights.items():
            reference.set_adapters([name], [weight])
            with torch.inference_mode():
                uncond, cond = reference.unet(*args, **kwargs)[0].chunk(2)
            formula += mix[name] * (uncond + GUIDANCE * (cond - uncond))
        formula /= len(weights)
        ours_uncond, ours_cond = ours.chunk(2)
        guided = ours_uncond + GUIDANCE * (ours_cond - ours_uncond)  # the pipeline applies CFG once
        assert _relative(guided, formula) <= 1e-5
        with torch.inference_mode():
            single = reference.unet(*args, **kwargs)[0]  # only the last adapter: Composite is not a single LoRA
        assert _relative(single, ours) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("max_batch", [None, 4, 2])
def test_batched_equals_sequential(tiny_sd: Any, max_batch: int | None) -> None:
    _setup(tiny_sd)
    blocks = [1.0, 0.3, 0.7, 0.5, 0.0, 1.2, 0.4]  # tiny-sd's short vector: BASE IN01 IN02 M00 OUT03 OUT04 OUT05
    weights = {"l0": 0.8, "l1": {"weight": 1.1, "blocks": blocks}, "l2": "0.2@0,1@1"}
    tiny_sd.set_composition(weights, method="composite", mode="sequential")
    sequential = _run(tiny_sd)
    tiny_sd.set_composition(weights, method="composite", mode="batched", max_batch=max_batch)
    batched = _run(tiny_sd)
    assert _relative(batched, sequential) <= 1e-5
    tiny_sd.set_composition(weights, method="merge")
    assert _relative(_run(tiny_sd), sequential) > 1e-3  # averaging predictions is not merging weights


def test_direct_call_returns_the_denoisers_output_type(tiny_sd: Any) -> None:
    _setup(tiny_sd, k=2)
    unet = tiny_sd.unet
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 4, 4, generator=g)
    context = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    outputs = {}
    for mode in ("sequential", "batched"):
        tiny_sd.set_composition({"l0": 1.0, "l1": 0.5}, method="composite", mode=mode)
        with torch.inference_mode():
            outputs[mode] = unet(sample, 10, encoder_hidden_states=context)
    assert type(outputs["batched"]) is type(outputs["sequential"])
    assert _relative(outputs["batched"].sample, outputs["sequential"].sample) <= 1e-5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "parallel"}, "mode"),
        ({"max_batch": 0}, "max_batch"),
        ({"mix": {"zz": 1.0}}, "mix"),
        ({"fuse": True}, "fused"),
        ({"chunks": 2}, "unknown options"),
    ],
)
def test_bad_options_are_typed(options: dict[str, Any], message: str) -> None:
    with pytest.raises(CompositionError, match=message):
        Composite({"a": 1.0, "b": 1.0}, **options)
