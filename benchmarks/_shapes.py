"""Pipelines with the denoiser shapes of SD 1.5, SDXL and FLUX.1 and seeded random weights, built on the device.

``shaped_pipeline(family, device, dtype)`` builds a complete pipeline (so ``load_lora_weights`` and a generation
work) whose denoiser has the real layer widths and attention layout, constructed directly on ``device`` and cast to
``dtype`` there (nothing in host memory, seconds on a GPU):

- ``sd15``: the ``sd15-shapes`` UNet (860M parameters);
- ``sdxl``: the SDXL base UNet (2.6B: widths 320/640/1280, 1/2/10 transformer layers, cross-attention 2048, text-time
  embeddings);
- ``flux``: FLUX.1 widths (3072 hidden, 24 heads of 128, joint attention 4096, pooled 768) at a depth of
  ``FLUX_DEPTH`` double- and single-stream blocks instead of 19 and 38 (2.7B instead of 12B parameters): each block
  is a real FLUX block, so per-layer costs and ratios carry over; absolute times scale with the depth.

Text encoders have the real hidden widths (768 / 1280 / T5 4096) but one layer, and the VAE is the tiny one of the
test presets: the benchmarks denoise to latents, so neither is timed. ``tiny_pipeline(family, ...)`` gives the tiny
test preset of the same family (the ``--quick`` stand-in).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from composer.presets import PRESETS, load_preset
from composer.smoke_presets.tokenizers import CLIP_VOCAB_SIZE, build_clip_tokenizer, build_t5_tokenizer, t5_vocab
from fusion.errors import PresetError

FAMILIES = ("sd15", "sdxl", "flux")
TINY_PRESETS = {"sd15": "tiny-sd", "sdxl": "tiny-sdxl", "flux": "tiny-flux"}
FLUX_DEPTH = (4, 8)
"""Double- and single-stream blocks of the FLUX-shaped transformer (FLUX.1 has 19 and 38)."""

SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "cross_attention_dim": 2048,
}
FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": FLUX_DEPTH[0],
    "num_single_layers": FLUX_DEPTH[1],
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}


def _clip(hidden: int, *, projection: int | None = None) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=1,
        num_attention_heads=hidden // 64,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **({"projection_dim": projection} if projection else {}),
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _tiny_vae(family: str) -> AutoencoderKL:
    _, config = PRESETS[TINY_PRESETS[family]].components()["vae"]
    return AutoencoderKL(**config)


@contextlib.contextmanager
def _building_on(device: torch.device, seed: int) -> Iterator[None]:
    """Modules created inside are allocated on ``device`` (fp32) and drawn from ``seed``."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        yield


def _models(family: str) -> dict[str, torch.nn.Module]:
    """The pipeline's modules (built inside :func:`_building_on`)."""
    if family == "sd15":
        _, unet_config = PRESETS["sd15-shapes"].components()["unet"]
        return {"vae": _tiny_vae(family), "text_encoder": _clip(768), "unet": UNet2DConditionModel(**unet_config)}
    if family == "sdxl":
        return {
            "vae": _tiny_vae(family),
            "text_encoder": _clip(768),
            "text_encoder_2": _clip(1280, projection=1280),
            "unet": UNet2DConditionModel(**SDXL_UNET),
        }
    t5 = T5Config(
        vocab_size=len(t5_vocab()),
        d_model=4096,
        d_kv=64,
        d_ff=1024,
        num_layers=1,
        num_heads=8,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
    )
    return {
        "vae": _tiny_vae(family),
        "text_encoder": _clip(768),
        "text_encoder_2": T5EncoderModel(t5),
        "transformer": FluxTransformer2DModel(**FLUX_TRANSFORMER),
    }


def shaped_pipeline(family: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """A pipeline of ``family`` (``sd15``, ``sdxl`` or ``flux``) with the real denoiser shapes, on ``device``."""
    if family not in FAMILIES:
        raise PresetError(f"unknown model family {family!r}", hint=f"use one of {FAMILIES}")
    tiny = PRESETS[TINY_PRESETS[family]].components()
    scheduler = {"sd15": DDIMScheduler, "sdxl": EulerDiscreteScheduler, "flux": FlowMatchEulerDiscreteScheduler}[
        family
    ](**tiny["scheduler"][1])
    with _building_on(device, seed):
        models = _models(family)
    for model in models.values():
        model.to(dtype).eval().requires_grad_(False)
    if family == "sd15":
        pipe = StableDiffusionPipeline(
            **models,
            tokenizer=build_clip_tokenizer(),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            **models,
            tokenizer=build_clip_tokenizer(),
            tokenizer_2=build_clip_tokenizer(pad_token="!"),
            scheduler=scheduler,
        )
    else:
        pipe = FluxPipeline(
            **models, tokenizer=build_clip_tokenizer(), tokenizer_2=build_t5_tokenizer(), scheduler=scheduler
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(family: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The tiny test preset of ``family`` (from the preset cache) on ``device`` in ``dtype``."""
    pipe = load_preset(TINY_PRESETS[family], torch_dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_parameters(pipe: Any) -> int:
    """Parameter count of the pipeline's denoiser."""
    denoiser = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
    return sum(p.numel() for p in denoiser.parameters())
