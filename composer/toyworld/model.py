"""The ``toy-sd`` model: stock diffusers/transformers components sized for the toy world, and its pipeline.

A ``StableDiffusionPipeline`` with a two-level ``AutoencoderKL`` (64² pixels ↔ 4×32² latents), a three-level
``UNet2DConditionModel`` and a four-layer ``CLIPTextModel`` over the real CLIP token ids (offline tokenizer). The
model predicts v with a zero-terminal-SNR noise schedule (sampled with trailing timesteps), which keeps the flat,
saturated colours of the world instead of drifting to grey. Because every class is stock, every reader, strategy
and interface of LoRA Composer runs on it unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from composer.smoke_presets.tokenizers import CLIP_VOCAB_SIZE

TEXT_WIDTH = 64

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
    "mid_block_add_attention": False,
    "scaling_factor": 1.0,
}

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [64, 128, 192],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": TEXT_WIDTH,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": TEXT_WIDTH,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "steps_offset": 1,
}

MAX_TOKENS = 32
"""Captions of the world are short: text is padded to this many tokens in training and at inference."""

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0

WEIGHTS_DIR = Path(__file__).with_name("weights") / "toy-sd"
"""Where the trained pipeline ships inside the package (a diffusers ``save_pretrained`` folder, fp16 weights)."""


def build_components() -> dict[str, Any]:
    """Fresh, untrained components of the toy model (random init), for training."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from composer.smoke_presets.tokenizers import build_clip_tokenizer

    return {
        "vae": AutoencoderKL(**VAE_CONFIG),
        "unet": UNet2DConditionModel(**UNET_CONFIG),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)),
        "tokenizer": build_clip_tokenizer(model_max_length=MAX_TOKENS),
        "scheduler": DDIMScheduler(**SCHEDULER_CONFIG),
    }


def assemble_pipeline(components: dict[str, Any]) -> Any:
    """A ``StableDiffusionPipeline`` from the toy components (no safety checker: the world is shapes)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def load_toy_pipeline(torch_dtype: Any = None, device: Any = None, folder: Path = WEIGHTS_DIR) -> Any:
    """The trained ``toy-sd`` pipeline from the weights shipped in the package (offline, well under a second).

    Weights are stored in fp16 and loaded as fp32 unless ``torch_dtype`` says otherwise; the tokenizer is the
    offline CLIP tokenizer (real CLIP ids), rebuilt rather than shipped. ``folder`` loads another trained copy
    (the training command's output) the same way.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    from composer.smoke_presets.tokenizers import build_clip_tokenizer
    from fusion.errors import PresetError

    if not (Path(folder) / "model_index.json").is_file():
        raise PresetError("the toy-sd weights are missing", path=Path(folder), hint="reinstall, or train them first")
    pipe = StableDiffusionPipeline.from_pretrained(
        folder,
        tokenizer=build_clip_tokenizer(model_max_length=MAX_TOKENS),
        dtype=torch_dtype or torch.float32,
        local_files_only=True,
    )
    return pipe.to(device) if device is not None else pipe
