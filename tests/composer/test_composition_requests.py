"""Requests on the mixin: ``set_composition`` takes everything a ``<lora:…>`` tag can say (text-encoder weight, block
weights, schedules, ``start=``/``stop=`` windows), resolved in one place, and the facade composes through it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from composer.facade import Composer
from composer.mixin import make_composable
from composer.prompts import LoraTag, extract_lora_tags
from composer.weight_specs import StepWindow
from fusion.adapters import Adapter, LowRank

TEXT_KEY = "text_encoder.encoder.layers.0.self_attn.q_proj"
ATTENTION_KEY = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # IN01: in the short vector
RESNET_KEY = "down_blocks.1.resnets.0.time_emb_proj"  # IN04: a resnet-only block, not in the short vector
OTHER_KEY = "time_embedding.linear_1"  # outside the numbered blocks
KEYS = (TEXT_KEY, ATTENTION_KEY, RESNET_KEY, OTHER_KEY)


def _module(pipe: Any, key: str) -> nn.Module:
    if key.startswith("text_encoder."):
        return pipe.text_encoder.get_submodule(key.removeprefix("text_encoder."))
    return pipe.unet.get_submodule(key)


def _adapter(pipe: Any, name: str = "style", seed: int = 0) -> Adapter:
    """A LoRA on one text-encoder layer and three denoiser layers in different kinds of block."""
    g = torch.Generator().manual_seed(seed)
    layers: dict[str, LowRank] = {}
    for key in KEYS:
        out_f, in_f = _module(pipe, key).weight.shape
        layers[key] = LowRank(torch.randn(2, in_f, generator=g) * 0.1, torch.randn(out_f, 2, generator=g) * 0.1)
    denoiser = {k: v for k, v in layers.items() if not k.startswith("text_encoder.")}
    return Adapter(name, "sd1", denoiser, {TEXT_KEY: layers[TEXT_KEY]})


def _scales(pipe: Any, adapter: Adapter) -> dict[str, float]:
    """Each layer's weight under the active composition, read from the merged update (0 where it is absent)."""
    merged = pipe.merged_updates()
    full = dict(adapter.all_layers())
    scales = {}
    for key in KEYS:
        if key not in merged:
            scales[key] = 0.0
            continue
        delta, unit = merged[key].delta(), full[key].delta()
        scales[key] = float((delta * unit).sum() / (unit * unit).sum())
        torch.testing.assert_close(delta, scales[key] * unit)
    return scales


@pytest.fixture
def pipe(tiny_sd: Any) -> Any:
    composable = make_composable(tiny_sd)
    composable.set_progress_bar_config(disable=True)
    return composable


def _latents(pipe: Any, steps: int = 4) -> torch.Tensor:
    args = {"num_inference_steps": steps, "height": 32, "width": 32, "output_type": "latent"}
    return pipe("a corgi", generator=torch.Generator().manual_seed(0), **args).images


def test_a_separate_text_encoder_weight_scales_only_the_text_encoders(pipe: Any) -> None:
    adapter = _adapter(pipe)
    pipe.add_adapter(adapter)
    pipe.set_composition({"style": LoraTag("style", 0.5, text_encoder_weight=1.5)}, fuse=False)
    assert _scales(pipe, adapter) == pytest.approx({TEXT_KEY: 1.5, ATTENTION_KEY: 0.5, RESNET_KEY: 0.5, OTHER_KEY: 0.5})


def test_a_text_encoder_only_request_leaves_every_denoiser_layer_alone(pipe: Any) -> None:
    adapter = _adapter(pipe)
    pipe.add_adapter(adapter)
    _, tags = extract_lora_tags("a corgi <lora:style:0.7:0>")  # A1111: te 0.7, unet 0
    pipe.set_composition(tags, fuse=False)
    assert _scales(pipe, adapter) == pytest.approx({TEXT_KEY: 0.7, ATTENTION_KEY: 0.0, RESNET_KEY: 0.0, OTHER_KEY: 0.0})


def test_block_weights_and_a_text_encoder_weight_multiply(pipe: Any) -> None:
    adapter = _adapter(pipe)
    pipe.add_adapter(adapter)
    pipe.set_composition([LoraTag("style", 0.5, text_encoder_weight=2.0, block_weights="OUTALL")], fuse=False)
    assert _scales(pipe, adapter) == pytest.approx({TEXT_KEY: 2.0, ATTENTION_KEY: 0.0, RESNET_KEY: 0.0, OTHER_KEY: 0.5})


def test_a_window_weights_only_its_steps(pipe: Any) -> None:
    pipe.add_adapter(_adapter(pipe))
    pipe.set_composition({"style": LoraTag("style", 0.8, start=0.5)}, fuse=False)
    table = pipe.composition_weights(4)
    assert table.adapters == ("style",)
    assert table.weights[0, table.groups.index("IN01")].tolist() == pytest.approx([0.0, 0.0, 0.8, 0.8])
    pipe.set_composition({"style": LoraTag("style", 0.8, start=2, stop=4)}, fuse=False)  # step numbers above 1
    table = pipe.composition_weights(6)
    assert table.weights[0, table.groups.index("IN01")].tolist() == pytest.approx([0, 0, 0.8, 0.8, 0, 0])
    assert pipe.composition["weights"] == {"style": {"weight": 0.8, "blocks": None, "steps": StepWindow(2, 4)}}


def test_a_window_over_the_whole_run_is_the_plain_weight_and_an_empty_one_is_the_base(pipe: Any) -> None:
    base = _latents(pipe)
    pipe.add_adapter(_adapter(pipe))
    pipe.set_composition({"style": 0.8}, fuse=False)
    plain = _latents(pipe)
    assert (plain - base).abs().max() > 1e-4
    pipe.set_composition({"style": LoraTag("style", 0.8, start=0.0, stop=1.0)}, fuse=False)
    torch.testing.assert_close(_latents(pipe), plain, atol=0, rtol=0)
    pipe.set_composition({"style": LoraTag("style", 0.8, start=1.0)}, fuse=False)
    torch.testing.assert_close(_latents(pipe), base, atol=0, rtol=0)


def test_a_keyframe_request_is_the_keyframe_spec(pipe: Any) -> None:
    pipe.add_adapter(_adapter(pipe))
    pipe.set_composition({"style": "0@0,1@1"})
    spec = _latents(pipe)
    pipe.set_composition([LoraTag("style", "0@0,1@1")])
    torch.testing.assert_close(_latents(pipe), spec, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("composition", "message"),
    [
        ({"style": LoraTag("style", "0@0,1@1", start=0.2)}, "either a keyframe schedule or start/stop"),
        ({"style": LoraTag("style", 1.0, block_weights="1,0")}, "block-weight vector"),
        ({"other": LoraTag("style", 1.0)}, "filed under another adapter's name"),
        ([LoraTag("style", 1.0), LoraTag("style", 0.5)], "requested twice"),
        (["style"], "holds requests"),
        ("style:0.8", "not str"),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(pipe: Any, composition: Any, message: str) -> None:
    pipe.add_adapter(_adapter(pipe))
    pipe.set_composition({"style": 0.5})
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(Exception, match=message) as raised:
        pipe.set_composition(composition)
    assert type(raised.value).__name__ == "CompositionError"
    assert pipe.composition["weights"] == {"style": 0.5}
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_the_facade_composes_a_tag_as_the_mixin_does(tmp_path: Path) -> None:
    composer = Composer(model="tiny-sd")
    pipe = composer.pipe
    adapter = _adapter(pipe)
    file = tmp_path / "style.safetensors"
    tensors = {}
    for key, kind in adapter.all_layers():
        prefix = key if key.startswith("text_encoder.") else f"unet.{key}"
        tensors[f"{prefix}.lora_A.weight"] = kind.down.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = kind.up.contiguous()
    save_file(tensors, str(file))
    tag = LoraTag(str(file), 0.5, text_encoder_weight=1.5, start=0.25)
    ran = composer.run("a corgi", loras=[tag], steps=4, seed=3, height=32, width=32)
    assert pipe.adapters == {}, "the facade unregisters what it registered"
    pipe.add_adapter_file(file, name="style")
    pipe.set_composition({"style": LoraTag("style", 0.5, text_encoder_weight=1.5, start=0.25)})
    call = {"num_inference_steps": 4, "height": 32, "width": 32, "num_images_per_prompt": 1}
    direct = pipe(prompt="a corgi", generator=torch.Generator(device="cpu").manual_seed(3), **call).images[0]
    pipe.clear_composition()
    base = pipe(prompt="a corgi", generator=torch.Generator(device="cpu").manual_seed(3), **call).images[0]
    assert ran.images[0].tobytes() == direct.tobytes()
    assert direct.tobytes() != base.tobytes()


def test_the_facade_generates_at_the_size_asked_for() -> None:
    result = Composer(model="tiny-sd").run("a corgi", steps=1, height=32, width=48)
    assert result.images[0].size == (48, 32)
