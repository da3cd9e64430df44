"""PEFT ``save_pretrained`` folders and diffusers ``save_lora_weights`` files, checked against the producer's forward.

PEFT injects its tuner layers into the tiny UNet; every trainable parameter is perturbed (LoRA's B, SHiRA's values
and DoRA's magnitudes start as no-ops), the folder is saved, and the reference is PEFT's own forward: per layer the
tuner layer's output minus its base layer's, and for the pipeline the latents with the adapter injected.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from producers import pipeline_latents, relative_error

from composer.mixin import make_composable
from fusion.relative import Relative
from weights_index.reader import probe, read_adapter

TOL = 1e-5
TARGETS = ["to_q", "to_v", "conv1", "proj_in"]


def _config(kind: str):
    from peft import LoHaConfig, LoKrConfig, LoraConfig, ShiraConfig

    if kind == "lora":
        return LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"to_v": 2}, alpha_pattern={"to_v": 3}
        )
    if kind == "rslora":
        return LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, use_rslora=True)
    if kind == "dora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    if kind == "loha":
        return LoHaConfig(r=4, alpha=8, target_modules=TARGETS, rank_pattern={"to_q": 2})
    if kind == "lokr":
        return LoKrConfig(r=4, alpha=8, target_modules=TARGETS)
    return ShiraConfig(r=4, target_modules=["to_q", "to_v"])


def _perturb(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)


@torch.no_grad()
def _peft_layer_outputs(unet: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    gen = torch.Generator().manual_seed(1)
    found = {}
    for name, layer in unet.named_modules():
        if isinstance(layer, BaseTunerLayer):
            base = layer.get_base_layer()
            if isinstance(base, torch.nn.Conv2d):
                x = torch.randn(2, base.in_channels, 6, 6, generator=gen)
            else:
                x = torch.randn(3, base.in_features, generator=gen)
            found[name.removeprefix("base_model.model.")] = (base, x, (layer(x) - base(x)).double())
    return found


def _apply(module: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if isinstance(module, torch.nn.Conv2d):
        return module._conv_forward(x, delta.reshape(module.weight.shape), None)
    return torch.nn.functional.linear(x, delta.reshape(module.weight.shape))


PEFT_KINDS = ("lora", "rslora", "dora", "loha", "lokr", "shira")


def check_peft_folder(pipe, kind: str, folder: Path) -> dict[str, float]:
    """Save a perturbed PEFT ``kind`` adapter of ``pipe``'s UNet to ``folder``; return the worst per-layer error
    (read with the pipeline's shapes) and the fused / unfused composed errors against PEFT's own forward."""
    from peft import get_peft_model

    model = get_peft_model(pipe.unet, _config(kind))
    _perturb(model)
    model.save_pretrained(str(folder))
    want = pipeline_latents(pipe)
    outputs = _peft_layer_outputs(pipe.unet)
    pipe.unet = model.unload()
    pipe = make_composable(pipe)
    assert relative_error(pipeline_latents(pipe), want) > 1e-4
    adapter = read_adapter(folder, "sd1", shapes=pipe.model_shapes())
    assert adapter.name == folder.name
    assert probe(folder).num_layers == len(outputs)
    errors = {"layer": 0.0}
    for key, (module, x, expected) in outputs.items():
        update = adapter.layers[key]
        delta = update.resolve(module.weight).delta() if isinstance(update, Relative) else update.delta(torch.float32)
        errors["layer"] = max(errors["layer"], relative_error(_apply(module, x, delta), expected))
    pipe.add_adapter_file(folder)
    pipe.set_composition({folder.name: 1.0})
    errors["fused"] = relative_error(pipeline_latents(pipe), want)
    pipe.set_composition({folder.name: 1.0}, fuse=False)
    errors["unfused"] = relative_error(pipeline_latents(pipe), want)
    return errors


@pytest.mark.parametrize("kind", PEFT_KINDS)
def test_peft_save_pretrained_folder(tiny_sd, tmp_path: Path, kind: str) -> None:
    errors = check_peft_folder(tiny_sd, kind, tmp_path / f"peft-{kind}")
    assert max(errors.values()) <= TOL, errors


def test_peft_shira_file_through_add_adapter_file_without_shapes(tiny_sd, tmp_path: Path) -> None:
    """The pipeline supplies the shapes a PEFT SHiRA file lacks: the bare file loads with no ``shapes=``."""
    from peft import get_peft_model

    model = get_peft_model(tiny_sd.unet, _config("shira"))
    _perturb(model)
    model.save_pretrained(str(tmp_path / "s"))
    want = pipeline_latents(tiny_sd)
    tiny_sd.unet = model.unload()
    pipe = make_composable(tiny_sd)
    name = pipe.add_adapter_file(tmp_path / "s" / "adapter_model.safetensors", name="shira")
    pipe.set_composition({name: 1.0})
    assert relative_error(pipeline_latents(pipe), want) <= TOL


def check_diffusers_file(pipe, fresh, folder: Path) -> dict[str, float]:
    """Write ``pipe``'s perturbed denoiser + CLIP LoRA with the pipeline class's ``save_lora_weights`` (adapter
    metadata included, as training scripts pass it) and compose the file on ``fresh()`` (an untouched copy)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    denoiser_name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    denoiser = getattr(pipe, denoiser_name)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"]))
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    _perturb(denoiser)
    _perturb(pipe.text_encoder)
    layers = {
        f"{denoiser_name}_lora_layers": get_peft_model_state_dict(denoiser),
        "text_encoder_lora_layers": get_peft_model_state_dict(pipe.text_encoder),
        f"{denoiser_name}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict(),
        "text_encoder_lora_adapter_metadata": pipe.text_encoder.peft_config["default"].to_dict(),
    }
    type(pipe).save_lora_weights(str(folder), **layers, weight_name="lora.safetensors")
    want = pipeline_latents(pipe)
    ours = make_composable(fresh())
    assert relative_error(pipeline_latents(ours), want) > 1e-4
    ours.add_adapter_file(folder / "lora.safetensors", name="d")
    ours.set_composition({"d": 1.0})
    return {"fused": relative_error(pipeline_latents(ours), want)}


@pytest.mark.parametrize("preset", ["tiny_sd", "tiny_sdxl", "tiny_flux"])
def test_diffusers_save_lora_weights(preset: str, request, tmp_path: Path) -> None:
    """Files written by the pipeline class's ``save_lora_weights`` (denoiser + CLIP text-encoder LoRA) compose to
    the latents of the PEFT-injected pipeline that wrote them."""
    make = request.getfixturevalue("fresh_pipeline")
    errors = check_diffusers_file(request.getfixturevalue(preset), lambda: make(preset.replace("_", "-")), tmp_path)
    assert max(errors.values()) <= TOL, errors
