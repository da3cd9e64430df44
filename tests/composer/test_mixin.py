"""The mixin on stock pipelines: register, compose, run, clear — and nothing changes when something is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FluxKontextPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from composer.mixin import ComposableMixin, make_composable
from composer.presets import kontext_call_kwargs
from fusion.adapters import Adapter, LowRank
from fusion.engine import FusionEngine
from fusion.errors import CompositionError, FamilyMismatchError, ShapeMismatchError


def _lora(denoiser: nn.Module, family: str, name: str, seed: int, rank: int = 4) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path, module in denoiser.named_modules():
        if isinstance(module, nn.Linear) and (path.endswith(("to_q", "to_v")) or path.endswith("proj_mlp")):
            out_f, in_f = module.weight.shape
            layers[path] = LowRank(
                torch.randn(rank, in_f, generator=g) * 0.1, torch.randn(out_f, rank, generator=g) * 0.1
            )
    return Adapter(name, family, layers)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = module.state_dict()
    return list(now) == list(before) and all(torch.equal(now[k], v) for k, v in before.items())


def _latents(pipe: Any, **kwargs: Any) -> torch.Tensor:
    args = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "latent", **kwargs}
    return pipe("a corgi", generator=torch.Generator().manual_seed(0), **args).images


def test_make_composable_keeps_the_class_identity(tiny_sd: Any) -> None:
    pipe = make_composable(tiny_sd)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe, ComposableMixin)
    assert type(pipe).__name__ == "StableDiffusionPipeline", "save_pretrained records the original class"
    assert make_composable(pipe) is pipe
    assert pipe.family == "sd1"
    assert pipe.composition is None


def test_compose_run_and_clear_bit_exactly(tiny_sd: Any) -> None:
    pipe = make_composable(tiny_sd)
    unet_before, text_before = _state(pipe.unet), _state(pipe.text_encoder)
    base = _latents(pipe)
    pipe.add_adapter(_lora(pipe.unet, "sd1", "style", 0))
    pipe.add_adapter(_lora(pipe.unet, "sd1", "other", 1), name="char")
    assert _same(pipe.unet, unet_before), "registering alone touches nothing"
    pipe.set_composition({"style": 0.8, "char": 0.6})
    assert pipe.composition == {
        "weights": {"style": 0.8, "char": 0.6},
        "method": "merge",
        "fuse": None,
        "branches": "both",
        "options": {},
    }
    both = _latents(pipe)
    assert (both - base).abs().max() > 1e-3
    pipe.set_composition({"style": 0.8, "char": "0@0,1@1"}, fuse=False)
    scheduled = _latents(pipe)
    assert (scheduled - both).abs().max() > 1e-4
    pipe.remove_adapter("char")
    assert pipe.composition["weights"] == {"style": 0.8}
    assert list(pipe.adapters) == ["style"]
    pipe.clear_composition()
    assert _same(pipe.unet, unet_before)
    assert _same(pipe.text_encoder, text_before)
    assert "forward" not in pipe.unet.__dict__
    torch.testing.assert_close(_latents(pipe), base, atol=0, rtol=0)
    pipe.set_composition({"style": 0.8})
    assert (_latents(pipe) - base).abs().max() > 1e-3, "registered adapters re-attach after a clear"


def test_refusals_leave_the_pipeline_unchanged(tiny_sd: Any) -> None:
    pipe = make_composable(tiny_sd)
    wrong = _lora(pipe.unet, "sd1", "wrong", 1)
    xl = _lora(pipe.unet, "sdxl", "xl", 2)
    duplicate = _lora(pipe.unet, "sd1", "good", 3)
    pipe.add_adapter(_lora(pipe.unet, "sd1", "good", 0))
    pipe.set_composition({"good": 1.0})
    before = _state(pipe.unet)
    key = next(iter(wrong.layers))
    wrong.layers[key] = LowRank(torch.zeros(2, 3), torch.zeros(5, 2))
    with pytest.raises(ShapeMismatchError, match="wrong"):
        pipe.add_adapter(wrong)
    with pytest.raises(FamilyMismatchError):
        pipe.add_adapter(xl)
    with pytest.raises(CompositionError, match="not registered"):
        pipe.set_composition({"good": 1.0, "missing": 0.5})
    with pytest.raises(CompositionError, match="unknown composition method"):
        pipe.set_composition({"good": 1.0}, method="nope")
    with pytest.raises(CompositionError, match="good"):
        pipe.set_composition({"good": "1@0,oops"})
    with pytest.raises(CompositionError, match="fuse=True"):
        pipe.set_composition({"good": "0@0,1@1"}, fuse=True)
    with pytest.raises(CompositionError, match="already registered"):
        pipe.add_adapter(duplicate)
    assert _same(pipe.unet, before)
    assert list(pipe.adapters) == ["good"]
    assert pipe.composition["weights"] == {"good": 1.0}


def test_reading_shapes_and_checking_adapters_install_nothing(tiny_sd: Any) -> None:
    """model_shapes() and add_adapter() only read the model: they work while another engine holds the denoiser's
    hook, and leave its hook and module tree as they were."""
    pipe = make_composable(tiny_sd)
    other = FusionEngine(pipe.unet)
    try:
        modules = dict(pipe.unet.named_modules())
        shapes = pipe.model_shapes()
        style = _lora(pipe.unet, "sd1", "style", 0)
        assert pipe.add_adapter(style) == "style"
        wrong = _lora(pipe.unet, "sd1", "wrong", 1)
        wrong.layers[next(iter(wrong.layers))] = LowRank(torch.zeros(2, 3), torch.zeros(5, 2))
        with pytest.raises(ShapeMismatchError, match="wrong"):
            pipe.add_adapter(wrong)
        assert dict(pipe.unet.named_modules()) == modules
        assert pipe.composition is None
    finally:
        other.clear()
    assert not hasattr(pipe.unet, "_diffusers_hook")
    key = next(iter(style.layers))
    assert shapes[key] == tuple(pipe.unet.get_submodule(key).weight.shape)
    assert any(name.startswith("text_encoder.") for name in shapes)
    assert list(pipe.adapters) == ["style"]


def test_img2img_variant_sees_the_suffix_of_the_schedule(tiny_sd: Any) -> None:
    pipe = make_composable(StableDiffusionImg2ImgPipeline(**tiny_sd.components))
    pipe.set_progress_bar_config(disable=True)
    pipe.add_adapter(_lora(pipe.unet, "sd1", "style", 0))
    pipe.set_composition({"style": 0.8}, fuse=False)
    engine = pipe.composition_engine
    seen: list[int] = []
    original = engine.strategy.step
    engine.strategy.step = lambda ctx: (seen.append(ctx.step), original(ctx))[1]
    image = Image.new("RGB", (32, 32), (120, 80, 40))
    pipe("a corgi", image=image, strength=0.5, num_inference_steps=4, output_type="latent")
    assert seen == [2, 3]


def test_kontext_pipeline_composes(tiny_kontext: Any) -> None:
    pipe = make_composable(tiny_kontext)
    assert isinstance(pipe, FluxKontextPipeline)
    before = _state(pipe.transformer)
    image = Image.new("RGB", (32, 32), (10, 200, 90))
    args = {"image": image, "num_inference_steps": 2, "output_type": "latent", **kontext_call_kwargs(32, 32)}
    base = pipe(prompt="edit", generator=torch.Generator().manual_seed(0), **args).images
    pipe.add_adapter(_lora(pipe.transformer, "flux", "restore", 0))
    pipe.set_composition({"restore": 1.0})
    composed = pipe(prompt="edit", generator=torch.Generator().manual_seed(0), **args).images
    assert (composed - base).abs().max() > 1e-4
    pipe.clear_composition()
    assert _same(pipe.transformer, before)


def test_add_adapter_file_reads_a_peft_lora(tiny_sd: Any, tmp_path: Path) -> None:
    pipe = make_composable(tiny_sd)
    adapter = _lora(pipe.unet, "sd1", "x", 0)
    tensors = {}
    for path, update in adapter.layers.items():
        tensors[f"unet.{path}.lora_A.weight"] = update.down.contiguous()
        tensors[f"unet.{path}.lora_B.weight"] = update.up.contiguous()
    file = tmp_path / "style.safetensors"
    save_file(tensors, str(file))
    assert pipe.add_adapter_file(file) == "style"
    assert pipe.add_adapter_file(file, name="again") == "again"
    loaded = pipe.adapters["style"]
    key = next(iter(adapter.layers))
    torch.testing.assert_close(loaded.layers[key].delta(), adapter.layers[key].delta())
