"""Merge equals diffusers' own multi-LoRA path (load_lora_weights + set_adapters) on tiny SD, SDXL and Flux."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from composer.mixin import make_composable
from fusion.adapters import Adapter, LowRank
from fusion.engine import FusionEngine
from fusion.errors import CompositionError
from fusion.strategies import get_strategy

RANKS = (4, 2, 8, 3, 6)
WEIGHTS = (0.8, 0.5, 1.2, -0.4, 0.9)


def _denoiser_name(pipe: Any) -> str:
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


def _targets(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention projections, feed-forward linears and (UNets) the resnet conv1 layers: linear and conv LoRAs."""
    chosen = []
    for name, module in denoiser.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        linear = isinstance(module, nn.Linear) and (".attn" in name or ".ff." in name or leaf == "proj_mlp")
        if linear or (isinstance(module, nn.Conv2d) and leaf == "conv1"):
            chosen.append((name, module))
    return chosen


def _random_lora(denoiser: nn.Module, rank: int, seed: int, every: int) -> dict[str, LowRank]:
    """A LoRA with random factors on every ``every``-th target (adapters overlap on some layers, not all)."""
    g = torch.Generator().manual_seed(seed)
    layers: dict[str, LowRank] = {}
    for i, (name, module) in enumerate(_targets(denoiser)):
        if i % every:
            continue
        w = module.weight
        down_shape = (rank, *w.shape[1:])
        up_shape = (w.shape[0], rank, *([1, 1] if w.dim() == 4 else []))
        down = torch.randn(down_shape, generator=g) * 0.1
        up = torch.randn(up_shape, generator=g) * 0.1
        layers[name] = LowRank(down=down, up=up)
    return layers


def _text_lora(pipe: Any, rank: int, seed: int) -> dict[str, LowRank]:
    """Random LoRA factors on the q/v projections of the first layer of each CLIP text encoder, keyed the way
    files spell them (``text_encoder.text_model.encoder…``, whether or not the installed transformers nests
    ``text_model``)."""
    g = torch.Generator().manual_seed(seed)
    layers: dict[str, LowRank] = {}
    for component in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, component, None)
        if encoder is None or "CLIP" not in type(encoder).__name__:
            continue
        root = encoder.text_model if hasattr(encoder, "text_model") else encoder
        for proj in ("q_proj", "v_proj"):
            path = f"encoder.layers.0.self_attn.{proj}"
            out_f, in_f = root.get_submodule(path).weight.shape
            down, up = torch.randn(rank, in_f, generator=g) * 0.1, torch.randn(out_f, rank, generator=g) * 0.1
            layers[f"{component}.text_model.{path}"] = LowRank(down=down, up=up)
    return layers


def _peft_state_dict(prefix: str, adapter: Adapter) -> dict[str, torch.Tensor]:
    """diffusers/PEFT keys for the same tensors: ``<prefix>.<path>.lora_A/B.weight`` (text encoders by their name)."""
    out = {}
    named = [(f"{prefix}.{k}", v) for k, v in adapter.layers.items()] + list(adapter.text_encoder_layers.items())
    for name, update in named:
        out[f"{name}.lora_A.weight"] = update.down.clone()
        out[f"{name}.lora_B.weight"] = update.up.clone()
    return out


def _generate(pipe: Any) -> torch.Tensor:
    """The denoiser's prediction at the first step of a seeded 2-step generation (same inputs in every run)."""
    predictions: list[torch.Tensor] = []
    denoiser = getattr(pipe, _denoiser_name(pipe))
    hook = denoiser.register_forward_hook(lambda _m, _a, out: predictions.append(out[0].detach().clone()))
    try:
        kwargs: dict[str, Any] = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "latent"}
        pipe("a corgi astronaut", generator=torch.Generator().manual_seed(0), **kwargs)
    finally:
        hook.remove()
    return predictions[0]


@pytest.mark.parametrize("preset", ["tiny_sd", "tiny_sdxl", "tiny_flux"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_merge_matches_diffusers_set_adapters(preset: str, k: int, request: pytest.FixtureRequest) -> None:
    pipe = make_composable(request.getfixturevalue(preset))
    denoiser = getattr(pipe, _denoiser_name(pipe))
    prefix = _denoiser_name(pipe)
    family = pipe.family
    adapters = [
        Adapter(
            f"a{i}",
            family,
            _random_lora(denoiser, RANKS[i], seed=i, every=1 + i % 3),
            text_encoder_layers=_text_lora(pipe, RANKS[i], seed=100 + i) if i % 2 == 0 else {},
        )
        for i in range(k)
    ]
    weights = {a.name: WEIGHTS[i] for i, a in enumerate(adapters)}
    base = _generate(pipe)

    for adapter in adapters:
        pipe.add_adapter(adapter)
    pipe.set_composition(weights, fuse=False)
    ours_unfused = _generate(pipe)
    pipe.set_composition(weights)
    assert pipe.composition_engine.fused
    ours_fused = _generate(pipe)
    pipe.clear_composition()

    with torch.no_grad():
        for adapter in adapters:
            pipe.load_lora_weights(_peft_state_dict(prefix, adapter), adapter_name=adapter.name)
    pipe.set_adapters(list(weights), list(weights.values()))
    reference = _generate(pipe)

    assert (reference - base).abs().max() > 1e-3, "the LoRAs must change the output for the test to mean anything"
    torch.testing.assert_close(ours_unfused, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_fused, reference, atol=1e-5, rtol=0)


def _tiny_engine(tiny_sd: Any) -> tuple[FusionEngine, nn.Module]:
    unet = tiny_sd.unet
    return FusionEngine(unet, scheduler=tiny_sd.scheduler, family="sd1"), unet


def test_fused_and_unfused_agree_on_the_denoiser(tiny_sd: Any) -> None:
    engine, unet = _tiny_engine(tiny_sd)
    adapters = [Adapter(f"a{i}", "sd1", _random_lora(unet, RANKS[i], seed=10 + i, every=1)) for i in range(3)]
    engine.add_adapters(adapters)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    Merge = get_strategy("merge")
    weights = {"a0": 0.7, "a1": 0.3, "a2": -1.1}
    with torch.no_grad():
        engine.set_strategy(Merge(weights, fuse=False))
        unfused = unet(x, 500, text).sample
        engine.set_strategy(Merge(weights))
        assert engine.fused
        fused = unet(x, 500, text).sample
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=0)


def test_scheduled_weights_follow_the_step(tiny_sd: Any) -> None:
    """A keyframe weight 0→1 over the run: the first step sees the base model, the last the full adapter."""
    engine, unet = _tiny_engine(tiny_sd)
    engine.add_adapters([Adapter("a", "sd1", _random_lora(unet, 4, seed=3, every=1))])
    seen: list[float] = []
    Merge = get_strategy("merge")

    class Spy(Merge):
        def step(self, ctx):  # type: ignore[no-untyped-def]
            result = super().step(ctx)
            seen.append(float(engine.state.weights[0, 0]))
            return result

    engine.set_strategy(Spy({"a": "0@0,1@1"}))
    assert not engine.fused
    tiny_sd.set_progress_bar_config(disable=True)
    tiny_sd("x", num_inference_steps=3, height=32, width=32, output_type="latent")
    assert seen == pytest.approx([0.0, 0.5, 1.0])
    with pytest.raises(CompositionError):
        engine.set_strategy(Merge({"a": "0@0,1@1"}, fuse=True))
