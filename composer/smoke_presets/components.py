"""The component configs of the smoke-test presets: one function per model shape, each returning
``{component: (kind, config)}``, where ``kind`` names a builder in :mod:`composer.smoke_presets.registry` and
``config`` is plain JSON, so a preset's configs can be fingerprinted."""

from __future__ import annotations

from typing import Any

from composer.smoke_presets.tokenizers import CLIP_VOCAB_SIZE, t5_vocab

Components = dict[str, tuple[str, dict[str, Any]]]
"""A preset's components: pipeline attribute -> (builder kind, JSON config)."""

SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
"""The SD 1.x/2.x DDIM schedule (scaled-linear betas, leading steps offset by one)."""
_SDXL_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}
_FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def _tiny_vae(latent_channels: int, scaling_factor: float, *, flux: bool = False) -> tuple[str, dict[str, Any]]:
    """A 4-level VAE (8× downsampling like the real ones) with 32 channels per level: cheap at 64²."""
    config: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [32, 32, 32, 32],
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": 32,
        "sample_size": 64,
        "scaling_factor": scaling_factor,
    }
    if flux:
        config |= {"shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}
    return "AutoencoderKL", config


def _clip_text(
    hidden: int, *, layers: int = 2, heads: int = 4, intermediate: int = 37, act: str = "quick_gelu"
) -> dict[str, Any]:
    """A CLIP text config with real CLIP token ids (vocab 49,408, BOS 49406, EOS 49407) and the given width."""
    return {
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }


def _unet(block_out_channels: list[int], down: list[str], up: list[str], **config: Any) -> tuple[str, dict[str, Any]]:
    """A UNet2DConditionModel with two layers per level and the given levels, block types and other settings."""
    levels = {"block_out_channels": block_out_channels, "down_block_types": down, "up_block_types": up}
    return "UNet2DConditionModel", {"layers_per_block": 2, **levels, **config}


def _tiny_unet(down: list[str], up: list[str], **config: Any) -> tuple[str, dict[str, Any]]:
    """A UNet as the tiny SD and SDXL presets have it: 8² latents, 4 channels, two levels of 32 and 64 channels with 2
    and 4 attention heads; ``down``/``up`` block types and ``config`` give the rest."""
    shared = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "attention_head_dim": [2, 4],
        "norm_num_groups": 32,
    }
    return _unet([32, 64], down, up, **config, **shared)


def tiny_sd() -> Components:
    """Tiny SD 1.x: two UNet levels (attention at the high-resolution level, like SD 1.5), CLIP text width 32."""
    return {
        "unet": _tiny_unet(
            ["CrossAttnDownBlock2D", "DownBlock2D"], ["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32
        ),
        "vae": _tiny_vae(4, 0.18215),
        "text_encoder": ("CLIPTextModel", _clip_text(32)),
        "tokenizer": ("clip-tokenizer", {}),
        "scheduler": ("DDIMScheduler", SD_SCHEDULER),
    }


def small_sd() -> Components:
    """Benchmark-sized SD 1.x: three UNet levels (64, 128, 256), cross-attention width 768 like SD 1.5."""
    return {
        "unet": _unet(
            [64, 128, 256],
            ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            sample_size=16,
            in_channels=4,
            out_channels=4,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        "vae": _tiny_vae(4, 0.18215),
        "text_encoder": ("CLIPTextModel", _clip_text(768, heads=12, intermediate=3072)),
        "tokenizer": ("clip-tokenizer", {}),
        "scheduler": ("DDIMScheduler", SD_SCHEDULER),
    }


def sd15_shapes() -> Components:
    """Real SD 1.5 component sizes (860M-parameter UNet, CLIP ViT-L/14 text encoder) with random weights."""
    return {
        "unet": _unet(
            [320, 640, 1280, 1280],
            ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        "vae": (
            "AutoencoderKL",
            {
                "block_out_channels": [128, 256, 512, 512],
                "down_block_types": ["DownEncoderBlock2D"] * 4,
                "up_block_types": ["UpDecoderBlock2D"] * 4,
                "layers_per_block": 2,
                "latent_channels": 4,
                "sample_size": 512,
            },
        ),
        "text_encoder": ("CLIPTextModel", _clip_text(768, layers=12, heads=12, intermediate=3072)),
        "tokenizer": ("clip-tokenizer", {}),
        "scheduler": ("DDIMScheduler", SD_SCHEDULER),
    }


def tiny_sdxl() -> Components:
    """Tiny SDXL: two CLIP encoders (the second with a projection) and text-time addition embeddings."""
    return {
        "unet": _tiny_unet(
            ["DownBlock2D", "CrossAttnDownBlock2D"],
            ["CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=[1, 2],
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64,
        ),
        "vae": _tiny_vae(4, 0.13025),
        "text_encoder": ("CLIPTextModel", _clip_text(32)),
        "text_encoder_2": ("CLIPTextModelWithProjection", _clip_text(32, act="gelu") | {"projection_dim": 32}),
        "tokenizer": ("clip-tokenizer", {}),
        "tokenizer_2": ("clip-tokenizer", {"pad_token": "!"}),
        "scheduler": ("EulerDiscreteScheduler", _SDXL_SCHEDULER),
    }


def tiny_flux() -> Components:
    """Tiny FLUX.1: two double-stream and two single-stream blocks, CLIP + T5 encoders, a 16-channel VAE."""
    return {
        "transformer": (
            "FluxTransformer2DModel",
            {
                "patch_size": 1,
                "in_channels": 64,
                "num_layers": 2,
                "num_single_layers": 2,
                "attention_head_dim": 16,
                "num_attention_heads": 2,
                "joint_attention_dim": 32,
                "pooled_projection_dim": 32,
                "guidance_embeds": True,
                "axes_dims_rope": [4, 6, 6],
            },
        ),
        "vae": _tiny_vae(16, 0.3611, flux=True),
        "text_encoder": ("CLIPTextModel", _clip_text(32)),
        "tokenizer": ("clip-tokenizer", {}),
        "text_encoder_2": (
            "T5EncoderModel",
            {
                "vocab_size": len(t5_vocab()),
                "d_model": 32,
                "d_kv": 8,
                "d_ff": 64,
                "num_layers": 2,
                "num_heads": 4,
                "relative_attention_num_buckets": 8,
                "feed_forward_proj": "gated-gelu",
                "is_encoder_decoder": False,
            },
        ),
        "tokenizer_2": ("t5-tokenizer", {}),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", _FLUX_SCHEDULER),
    }
