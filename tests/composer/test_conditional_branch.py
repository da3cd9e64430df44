"""Adapters on CFG's conditional branch only (``set_composition(..., branches="conditional")``): exactly the CFG loop
in which the unconditional prediction and the negative prompt come from the base model and the conditional ones from
the adapted model; refused (changing nothing) where that cannot be exact."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from composer.mixin import make_composable
from fusion.adapters import Adapter, LowRank
from fusion.errors import CompositionError
from fusion.strategies.gated import initial_gates

GUIDANCE = 3.0
STEPS = 3
SIZE = 32


def _factors(module: nn.Linear, g: torch.Generator, rank: int = 4) -> LowRank:
    out_f, in_f = module.weight.shape
    return LowRank(torch.randn(rank, in_f, generator=g) * 0.2, torch.randn(out_f, rank, generator=g) * 0.2)


def _lora_with_text_parts(pipe: Any, name: str, seed: int) -> Adapter:
    """A LoRA on the UNet's attention projections and on the text encoder's (kohya's usual coverage)."""
    g = torch.Generator().manual_seed(seed)
    unet = {
        path: _factors(module, g)
        for path, module in pipe.unet.named_modules()
        if isinstance(module, nn.Linear) and path.endswith(("to_q", "to_k", "to_v"))
    }
    text = {
        f"text_encoder.{path}": _factors(module, g)
        for path, module in pipe.text_encoder.named_modules()
        if isinstance(module, nn.Linear) and path.endswith(("q_proj", "v_proj"))
    }
    return Adapter(name, pipe.family, unet, text_encoder_layers=text)


def _generate(pipe: Any, **kwargs: Any) -> torch.Tensor:
    call = {
        "num_inference_steps": STEPS,
        "height": SIZE,
        "width": SIZE,
        "guidance_scale": GUIDANCE,
        "negative_prompt": "blurry",
        "output_type": "latent",
        **kwargs,
    }
    return pipe("a corgi", generator=torch.Generator().manual_seed(0), **call).images


@torch.no_grad()
def _reference_cfg_loop(pipe: Any, base_unet: nn.Module, negative: torch.Tensor, positive: torch.Tensor) -> Any:
    """The SD sampling loop written out: ε = ε_base(z, negative) + g·(ε_adapted(z, positive) − ε_base(z, negative))."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    shape = (1, pipe.unet.config.in_channels, SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor)
    latents = randn_tensor(shape, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        z = scheduler.scale_model_input(latents, t)
        unconditional = base_unet(z, t, encoder_hidden_states=negative).sample
        conditional = pipe.unet(z, t, encoder_hidden_states=positive).sample
        eps = unconditional + GUIDANCE * (conditional - unconditional)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def test_conditional_branch_is_the_cfg_loop_with_a_base_unconditional_branch(tiny_sd: Any) -> None:
    pipe = make_composable(tiny_sd)
    base_unet = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        negative = pipe.encode_prompt("a corgi", "cpu", 1, True, "blurry")[1]
    pipe.add_adapter(_lora_with_text_parts(pipe, "style", 0))
    pipe.set_composition({"style": 0.8})
    with torch.no_grad():
        positive = pipe.encode_prompt("a corgi", "cpu", 1, False)[0]
    expected = _reference_cfg_loop(pipe, base_unet, negative, positive)
    both = _generate(pipe)

    pipe.set_composition({"style": 0.8}, branches="conditional")
    assert pipe.composition["branches"] == "conditional"
    conditional = _generate(pipe)
    torch.testing.assert_close(conditional, expected, atol=2e-5, rtol=1e-4)
    assert (conditional - both).abs().max() > 1e-3, "the unconditional branch no longer carries the adapter"


def test_every_method_composes_the_conditional_half_alone(tiny_sd: Any) -> None:
    """Each strategy sees only the conditional half: with one adapter every method is the same composition."""
    pipe = make_composable(tiny_sd)
    pipe.add_adapter(_lora_with_text_parts(pipe, "style", 0))
    pipe.set_composition({"style": 0.8}, branches="conditional")
    merged = _generate(pipe)
    for method, options in [("switch", {}), ("composite", {"mode": "batched"}), ("gated", {"mode": "table"})]:
        pipe.set_composition({"style": 0.8}, method=method, branches="conditional", **options)
        torch.testing.assert_close(_generate(pipe), merged, atol=2e-5, rtol=1e-4, msg=method)


def test_without_guidance_the_whole_batch_is_composed(tiny_sd: Any) -> None:
    pipe = make_composable(tiny_sd)
    pipe.add_adapter(_lora_with_text_parts(pipe, "style", 0))
    pipe.set_composition({"style": 0.8}, fuse=False)
    both = _generate(pipe, guidance_scale=1.0)
    pipe.set_composition({"style": 0.8}, branches="conditional")
    torch.testing.assert_close(_generate(pipe, guidance_scale=1.0), both, atol=0, rtol=0)


def test_sdxl_negative_prompt_is_encoded_on_the_base(tiny_sdxl: Any) -> None:
    pipe = make_composable(tiny_sdxl)
    with torch.no_grad():
        base = pipe.encode_prompt("a corgi", negative_prompt="blurry", device="cpu")
    g = torch.Generator().manual_seed(3)
    text = {
        f"{name}.{path}": _factors(module, g)
        for name in ("text_encoder", "text_encoder_2")
        for path, module in getattr(pipe, name).named_modules()
        if isinstance(module, nn.Linear) and path.endswith("q_proj")
    }
    pipe.add_adapter(Adapter("style", "sdxl", {}, text_encoder_layers=text))
    pipe.set_composition({"style": 1.0}, branches="conditional")
    seen: list[torch.Tensor] = []
    hook = pipe.unet.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        _generate(pipe, num_inference_steps=1)
    finally:
        hook.remove()
    first = seen[0]
    torch.testing.assert_close(first["encoder_hidden_states"][:1], base[1], atol=0, rtol=0)
    torch.testing.assert_close(first["added_cond_kwargs"]["text_embeds"][:1], base[3], atol=0, rtol=0)
    assert (first["encoder_hidden_states"][1:] - base[0]).abs().max() > 1e-3, "the prompt is encoded adapted"


def test_refusals_change_nothing(tiny_sd: Any, tiny_flux: Any) -> None:
    pipe = make_composable(tiny_sd)
    pipe.add_adapter(_lora_with_text_parts(pipe, "style", 0))
    pipe.set_composition({"style": 0.5})
    before = pipe.composition
    with pytest.raises(CompositionError, match="cannot be fused"):
        pipe.set_composition({"style": 0.8}, fuse=True, branches="conditional")
    with pytest.raises(CompositionError, match="branches must be one of"):
        pipe.set_composition({"style": 0.8}, branches="negative")
    with pytest.raises(CompositionError, match="outside the composition"):
        pipe.set_composition({"style": 0.8}, branches={"scene": "both"})
    with pytest.raises(CompositionError, match="cannot be fused"):
        pipe.set_composition({"style": 0.8}, fuse=True, branches={"style": "conditional"})
    with pytest.raises(CompositionError, match="between 0 and 1"):
        pipe.set_composition({"style": 0.8}, branches={"style": 1.5})
    with pytest.raises(CompositionError, match="between 0 and 1"):
        pipe.set_composition({"style": 0.8}, branches=float("nan"))
    with pytest.raises(CompositionError, match="cannot be fused"):
        pipe.set_composition({"style": 0.8}, fuse=True, branches=0.5)
    assert pipe.composition == before

    flux = make_composable(tiny_flux)
    flux.add_adapter(Adapter("empty", "flux", {}))
    with pytest.raises(CompositionError, match="unconditional; conditional"):
        flux.set_composition({"empty": 1.0}, branches="conditional")
    assert flux.composition is None


WEIGHTS = {"style": 0.8, "scene": 0.6}


def _two_adapters(tiny_sd: Any) -> Any:
    pipe = make_composable(tiny_sd)
    pipe.add_adapter(_lora_with_text_parts(pipe, "style", 0))
    pipe.add_adapter(_lora_with_text_parts(pipe, "scene", 1))
    return pipe


def _composed_and_reference(tiny_sd: Any, unconditional: dict[str, float]) -> tuple[Any, torch.Tensor]:
    """``tiny_sd`` composable with ``style`` and ``scene`` attached, and the latents of the CFG loop written out whose
    unconditional prediction and negative prompt come from a model composed at ``unconditional`` and whose
    conditional ones come from the model with both adapters at :data:`WEIGHTS`."""
    pipe = make_composable(tiny_sd)
    style, scene = _lora_with_text_parts(pipe, "style", 0), _lora_with_text_parts(pipe, "scene", 1)
    kept = make_composable(copy.deepcopy(tiny_sd))
    kept.add_adapter(style)
    kept.add_adapter(scene)
    kept.set_composition(unconditional)
    with torch.no_grad():
        negative = kept.encode_prompt("a corgi", "cpu", 1, True, "blurry")[1]
    pipe.add_adapter(style)
    pipe.add_adapter(scene)
    pipe.set_composition(WEIGHTS)
    with torch.no_grad():
        positive = pipe.encode_prompt("a corgi", "cpu", 1, False)[0]
    return pipe, _reference_cfg_loop(pipe, kept.unet, negative, positive)


def test_per_adapter_branches_are_the_cfg_loop_with_the_kept_adapters_unconditional(tiny_sd: Any) -> None:
    """``{"style": "conditional"}``: the unconditional prediction and the negative prompt come from the model with
    ``scene`` alone merged in, the conditional ones from the model with both adapters."""
    pipe, expected = _composed_and_reference(tiny_sd, {"scene": 0.6})
    pipe.set_composition(WEIGHTS, branches={"style": "conditional"})
    assert pipe.composition["branches"] == {"style": "conditional"}
    per_adapter = _generate(pipe)
    torch.testing.assert_close(per_adapter, expected, atol=2e-5, rtol=1e-4)
    pipe.set_composition(WEIGHTS, branches="conditional")
    assert (per_adapter - _generate(pipe)).abs().max() > 1e-3, "the unconditional half lost the kept adapter"


def test_a_share_puts_that_part_of_the_adapters_weight_on_the_unconditional_half(tiny_sd: Any) -> None:
    """``{"style": 0.25}``: the unconditional prediction and the negative prompt come from the model with style at
    a quarter of its weight (scene, unnamed, at its own), the conditional ones from the model with both at theirs."""
    pipe, expected = _composed_and_reference(tiny_sd, {"style": 0.8 * 0.25, "scene": 0.6})
    pipe.set_composition(WEIGHTS, branches={"style": 0.25})
    assert pipe.composition["branches"] == {"style": 0.25}
    torch.testing.assert_close(_generate(pipe), expected, atol=2e-5, rtol=1e-4)


def test_one_share_for_every_adapter_is_that_share_for_each(tiny_sd: Any) -> None:
    pipe = _two_adapters(tiny_sd)
    weights = {"style": 0.8, "scene": 0.6}
    pipe.set_composition(weights, branches={"style": 0.5, "scene": 0.5})
    each = _generate(pipe)
    pipe.set_composition(weights, branches=0.5)
    assert pipe.composition["branches"] == 0.5
    torch.testing.assert_close(_generate(pipe), each, atol=0, rtol=0)


def test_per_adapter_choices_that_name_one_branch_for_all_are_that_branch(tiny_sd: Any) -> None:
    pipe = _two_adapters(tiny_sd)
    weights = {"style": 0.8, "scene": 0.6}
    outputs = {}
    for label, branches in [
        ("conditional", "conditional"),
        ("all conditional", {"style": "conditional", "scene": "conditional"}),
        ("both", "both"),
        ("all both", {"style": "both"}),
    ]:
        pipe.set_composition(weights, branches=branches)
        outputs[label] = _generate(pipe)
    torch.testing.assert_close(outputs["all conditional"], outputs["conditional"], atol=0, rtol=0)
    torch.testing.assert_close(outputs["all both"], outputs["both"], atol=0, rtol=0)


def test_every_method_runs_with_a_per_adapter_choice_and_keeps_its_own_weights(tiny_sd: Any) -> None:
    """Each half runs the method; the conditional half and everything after it see the strategy's own weights."""
    pipe = _two_adapters(tiny_sd)
    weights = {"style": 0.8, "scene": 0.6}
    switch = {"order": ["scene", "style"]}  # scene, kept on both branches, is switch's active adapter here
    for method, options in [("merge", {}), ("switch", switch), ("composite", {"mode": "batched"}), ("gated", {})]:
        pipe.set_composition(weights, method=method, branches="conditional", **options)
        conditional = _generate(pipe)
        engine = pipe.composition_engine
        installed = engine.state.weights.clone()
        pipe.set_composition(weights, method=method, branches={"style": "conditional"}, **options)
        per_adapter = _generate(pipe)
        assert torch.isfinite(per_adapter).all(), method
        assert (per_adapter - conditional).abs().max() > 1e-4, method
        assert engine.state.scale is None, method
        assert not engine.state.muted, method
        if method == "merge":
            torch.testing.assert_close(engine.state.weights, installed, atol=0, rtol=0)


METHODS = [("merge", {}), ("switch", {}), ("composite", {"mode": "batched"}), ("cmlora", {}), ("gated", {})]


def _denoiser_outputs(pipe: Any, **kwargs: Any) -> list[torch.Tensor]:
    """The whole CFG batch's prediction of every denoiser call of one generation."""
    outputs: list[torch.Tensor] = []
    hook = pipe.unet.register_forward_hook(lambda _module, _args, out: outputs.append(out[0]))
    try:
        _generate(pipe, **kwargs)
    finally:
        hook.remove()
    return outputs


def test_every_method_runs_on_the_unconditional_half_at_the_shares(tiny_sd: Any) -> None:
    """``{"style": 0.25}``: the unconditional half is the method itself (its schedule, Composite's passes, CMLoRA's
    caches, the learned gates) with style at a quarter of its weight, the conditional half the method at the full
    weights: each half of the prediction is that half of the method composed on both branches at those weights."""
    pipe = _two_adapters(tiny_sd)
    pipe.set_composition(WEIGHTS, fuse=False)
    options = {**dict(METHODS), "gated": {"gates": initial_gates(pipe.composition_engine)}}
    shared = {"style": 0.8 * 0.25, "scene": 0.6}
    for method, extra in options.items():
        pipe.set_composition(shared, method=method, **extra)
        (scaled,) = _denoiser_outputs(pipe, num_inference_steps=1)
        pipe.set_composition(WEIGHTS, method=method, **extra)
        (full,) = _denoiser_outputs(pipe, num_inference_steps=1)
        pipe.set_composition(WEIGHTS, method=method, branches={"style": 0.25}, **extra)
        (halves,) = _denoiser_outputs(pipe, num_inference_steps=1)
        torch.testing.assert_close(halves[:1], scaled[:1], atol=1e-5, rtol=1e-4, msg=method)
        torch.testing.assert_close(halves[1:], full[1:], atol=1e-5, rtol=1e-4, msg=method)
        assert (full[:1] - scaled[:1]).abs().max() > 1e-4, method


def test_a_share_next_to_one_is_the_method_on_both_branches(tiny_sd: Any) -> None:
    """Shares are continuous at 1 for every method: a share of 1 − 10⁻⁶ gives the images of ``"both"`` over several
    steps, Switch's turns and CMLoRA's cached passes included (each half keeps its own caches)."""
    pipe = _two_adapters(tiny_sd)
    pipe.set_composition(WEIGHTS, fuse=False)
    options = {**dict(METHODS), "switch": {"tau": 2}, "gated": {"gates": initial_gates(pipe.composition_engine)}}
    for method, extra in options.items():
        pipe.set_composition(WEIGHTS, method=method, fuse=False, **extra)
        both = _generate(pipe, num_inference_steps=6)
        pipe.set_composition(WEIGHTS, method=method, branches=1 - 1e-6, **extra)
        nearly = _generate(pipe, num_inference_steps=6)
        torch.testing.assert_close(nearly, both, atol=1e-4, rtol=1e-4, msg=method)


def test_img2img_and_several_prompts_and_images_per_prompt(tiny_sd: Any) -> None:
    pipe = make_composable(tiny_sd)
    pipe.add_adapter(_lora_with_text_parts(pipe, "style", 0))
    pipe.set_composition({"style": 0.8}, branches="conditional")
    latents = pipe(
        ["a corgi", "a cat"],
        negative_prompt=["blurry", "dark"],
        num_images_per_prompt=2,
        num_inference_steps=2,
        height=SIZE,
        width=SIZE,
        guidance_scale=GUIDANCE,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert latents.shape[0] == 4
    pipe.clear_composition()  # the img2img pipeline below shares this UNet

    img2img = make_composable(StableDiffusionImg2ImgPipeline(**tiny_sd.components))
    img2img.add_adapter(_lora_with_text_parts(img2img, "style", 0))
    image = Image.new("RGB", (SIZE, SIZE), (200, 120, 40))
    outputs = {}
    for branches in ("both", "conditional"):
        img2img.set_composition({"style": 0.8}, fuse=False, branches=branches)
        outputs[branches] = img2img(
            "a corgi",
            image=image,
            strength=0.7,
            num_inference_steps=3,
            guidance_scale=GUIDANCE,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images
    assert (outputs["conditional"] - outputs["both"]).abs().max() > 1e-4
