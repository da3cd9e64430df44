"""Component configs for a single-file checkpoint: the shipped architecture config with its sizes read from the file.

A checkpoint stores weights, not a config. Every size a weight reveals (channels, levels, layers per block,
transformer depth, widths, layer counts, vocabulary) is read from the tensor shapes, so the shipped configs of the
real architectures also fit fine-tunes with other sizes and the tiny models tests write. What no weight reveals
follows the architecture's own rule: SD 1.x UNets use 8 attention heads, SD 2.x and SDXL UNets and CLIP/OpenCLIP
text encoders use 64-wide heads, FLUX's rotary axes split its head width as (16, 56, 56) splits 128. Shapes are
given without the component prefix, in the file's original naming (LDM, OpenCLIP, transformers, BFL).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from fusion.errors import PresetError

Shapes = Mapping[str, tuple[int, ...]]

HEAD_WIDTH = 64
"""Attention head width of SD 2.x / SDXL UNets and of CLIP / OpenCLIP text towers."""

SD1_UNET_HEADS = 8
"""SD 1.x UNets use 8 heads at every level (diffusers' ``attention_head_dim`` 8)."""

FLUX_ROPE_128 = (16, 56, 56)
"""FLUX.1's rotary axes for its 128-wide heads."""


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern``'s first group over the key names."""
    compiled = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := compiled.match(k))})


def _need(shapes: Shapes, key: str, part: str) -> tuple[int, ...]:
    """The shape of ``key``, or a typed error naming the part whose weights are incomplete."""
    if key not in shapes:
        raise PresetError(
            f"the checkpoint's {part} is incomplete: {key!r} is missing", hint="the file may be truncated"
        )
    return shapes[key]


def unet_config(base: dict[str, Any], shapes: Shapes, family: str, pooled_width: int | None) -> dict[str, Any]:
    """A UNet2DConditionModel config from LDM UNet shapes (``input_blocks.…``, ``label_emb.…``); ``pooled_width`` is
    SDXL's pooled text width (the second encoder's projection), used to split its size-conditioning input."""
    config = dict(base)
    conv_in = _need(shapes, "input_blocks.0.0.weight", "UNet")
    config["in_channels"], config["out_channels"] = conv_in[1], _need(shapes, "out.2.weight", "UNet")[0]
    inputs = _indices(shapes, r"input_blocks\.(\d+)\.")
    levels = len(_indices(shapes, r"input_blocks\.(\d+)\.0\.op\.weight")) + 1
    per_level = len(inputs) // levels
    layers = per_level - 1
    channels, depths, attention = [], [], []
    for level in range(levels):
        first = 1 + level * per_level
        channels.append(_need(shapes, f"input_blocks.{first}.0.out_layers.3.weight", "UNet")[0])
        blocks = _indices(shapes, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")
        attention.append(bool(blocks))
        depths.append(len(blocks) or 1)
    config["layers_per_block"] = layers
    config["block_out_channels"] = channels
    config["down_block_types"] = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    config["up_block_types"] = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    config["transformer_layers_per_block"] = depths
    cross = [s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")]
    if cross:
        config["cross_attention_dim"] = cross[0][1]
    config["use_linear_projection"] = any(k.endswith(".proj_in.weight") and len(s) == 2 for k, s in shapes.items())
    if family == "sd1":
        config["attention_head_dim"] = SD1_UNET_HEADS
    else:
        config["attention_head_dim"] = [max(1, c // HEAD_WIDTH) for c in channels]
    if "label_emb.0.0.weight" in shapes:
        width = _need(shapes, "label_emb.0.0.weight", "UNet")[1]
        config["addition_embed_type"] = "text_time"
        config["projection_class_embeddings_input_dim"] = width
        if pooled_width is not None and (width - pooled_width) % 6 == 0:
            config["addition_time_embed_dim"] = (width - pooled_width) // 6
    return config


def vae_config(base: dict[str, Any], shapes: Shapes) -> dict[str, Any]:
    """An AutoencoderKL config from LDM autoencoder shapes (``encoder.down.0.block.0.…``)."""
    config = dict(base)
    levels = _indices(shapes, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise PresetError("the autoencoder's weights are not in the LDM layout (encoder.down.N.block.M.…)")
    conv_in = _need(shapes, "encoder.conv_in.weight", "autoencoder")
    config["in_channels"] = conv_in[1]
    config["out_channels"] = _need(shapes, "decoder.conv_out.weight", "autoencoder")[0]
    config["latent_channels"] = _need(shapes, "decoder.conv_in.weight", "autoencoder")[1]
    config["block_out_channels"] = [
        _need(shapes, f"encoder.down.{i}.block.0.conv2.weight", "autoencoder")[0] for i in levels
    ]
    config["layers_per_block"] = len(_indices(shapes, r"encoder\.down\.0\.block\.(\d+)\."))
    config["down_block_types"] = ["DownEncoderBlock2D"] * len(levels)
    config["up_block_types"] = ["UpDecoderBlock2D"] * len(levels)
    config["use_quant_conv"] = "quant_conv.weight" in shapes
    config["use_post_quant_conv"] = "post_quant_conv.weight" in shapes
    return config


def clip_config(base: dict[str, Any], shapes: Shapes) -> dict[str, Any]:
    """A CLIPTextConfig (as a dict) from transformers-layout CLIP shapes (``text_model.encoder.layers.…``)."""
    config = dict(base)
    tokens = _need(shapes, "text_model.embeddings.token_embedding.weight", "CLIP text encoder")
    config["vocab_size"], config["hidden_size"] = tokens
    config["max_position_embeddings"] = _need(
        shapes, "text_model.embeddings.position_embedding.weight", "CLIP text encoder"
    )[0]
    config["num_hidden_layers"] = len(_indices(shapes, r"text_model\.encoder\.layers\.(\d+)\."))
    config["intermediate_size"] = _need(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", "CLIP text encoder")[0]
    config["num_attention_heads"] = max(1, tokens[1] // HEAD_WIDTH)
    if "text_projection.weight" in shapes:
        config["projection_dim"] = _need(shapes, "text_projection.weight", "CLIP text encoder")[0]
    return config


def open_clip_config(base: dict[str, Any], shapes: Shapes, *, drop_last: bool) -> dict[str, Any]:
    """A CLIPTextConfig (as a dict) from OpenCLIP shapes (``transformer.resblocks.…``); ``drop_last``: SD 2.x reads
    the penultimate layer, so its text encoder has one layer fewer than the file."""
    config = dict(base)
    tokens = _need(shapes, "token_embedding.weight", "OpenCLIP text encoder")
    config["vocab_size"], config["hidden_size"] = tokens
    config["max_position_embeddings"] = _need(shapes, "positional_embedding", "OpenCLIP text encoder")[0]
    config["num_hidden_layers"] = len(_indices(shapes, r"transformer\.resblocks\.(\d+)\.")) - int(drop_last)
    config["intermediate_size"] = _need(shapes, "transformer.resblocks.0.mlp.c_fc.weight", "OpenCLIP text encoder")[0]
    config["num_attention_heads"] = max(1, tokens[1] // HEAD_WIDTH)
    if "text_projection" in shapes and not drop_last:
        config["projection_dim"] = _need(shapes, "text_projection", "OpenCLIP text encoder")[1]
    return config


T5 = "T5 text encoder"


def t5_config(base: dict[str, Any], shapes: Shapes) -> dict[str, Any]:
    """A T5Config (as a dict) from transformers-layout T5 encoder shapes (``encoder.block.N.layer.…``)."""
    config = dict(base)
    config["vocab_size"], config["d_model"] = _need(shapes, "shared.weight", T5)
    config["num_layers"] = len(_indices(shapes, r"encoder\.block\.(\d+)\."))
    bias = _need(shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", T5)
    config["relative_attention_num_buckets"], config["num_heads"] = bias
    config["d_kv"] = _need(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight", T5)[0] // bias[1]
    config["d_ff"] = _need(shapes, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", T5)[0]
    return config


def flux_rope_axes(head_width: int) -> list[int]:
    """FLUX's rotary axes for heads ``head_width`` wide: (16, 56, 56) at 128, the same split scaled otherwise."""
    if head_width == sum(FLUX_ROPE_128):
        return list(FLUX_ROPE_128)
    first = head_width // 8
    rest = (head_width - first) // 2
    if first % 2 or rest % 2 or first + 2 * rest != head_width:
        raise PresetError(f"a FLUX head width of {head_width} has no rotary split like FLUX.1's (16, 56, 56)")
    return [first, rest, rest]


def flux_config(base: dict[str, Any], shapes: Shapes) -> dict[str, Any]:
    """A FluxTransformer2DModel config from BFL transformer shapes (``double_blocks.N.…``, ``img_in``, ``txt_in``)."""
    config = dict(base)
    img_in = _need(shapes, "img_in.weight", "FLUX transformer")
    inner, config["in_channels"] = img_in
    config["joint_attention_dim"] = _need(shapes, "txt_in.weight", "FLUX transformer")[1]
    config["pooled_projection_dim"] = _need(shapes, "vector_in.in_layer.weight", "FLUX transformer")[1]
    config["num_layers"] = len(_indices(shapes, r"double_blocks\.(\d+)\."))
    config["num_single_layers"] = len(_indices(shapes, r"single_blocks\.(\d+)\."))
    head = _need(shapes, "double_blocks.0.img_attn.norm.query_norm.scale", "FLUX transformer")[0]
    config["attention_head_dim"], config["num_attention_heads"] = head, inner // head
    config["guidance_embeds"] = "guidance_in.in_layer.weight" in shapes
    config["axes_dims_rope"] = flux_rope_axes(head)
    return config
