"""Write single-file checkpoints in the original layouts from diffusers models: the inverse of diffusers' key
conversion (LDM/SGM UNet and autoencoder, CLIP, OpenCLIP, T5, BFL FLUX), plus tiny seeded models to write.

Each writer is checked against diffusers' own forward converters (``single_file_utils``): converting what is written
must give back the model's state dict exactly, so the files are what diffusers reads as these layouts. Used by
the checkpoint benchmark and the checkpoint tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

Tensors = dict[str, torch.Tensor]

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _resnet(rest: str, names: tuple[tuple[str, str], ...] = _RESNET) -> str:
    for new, old in names:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def unet_to_ldm(unet: UNet2DConditionModel) -> Tensors:
    """A diffusers UNet's state dict in LDM names (``input_blocks.N.M.…``), without the ``model.diffusion_model.``."""
    layers = unet.config.layers_per_block
    per = layers + 1
    direct = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"] | DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]
    up_attention = ["CrossAttn" in t for t in unet.config.up_block_types]
    out: Tensors = {}
    for key, value in unet.state_dict().items():
        p = key.split(".")
        if key in direct:
            name = direct[key]
        elif p[0] == "down_blocks" and p[2] == "resnets":
            name = f"input_blocks.{1 + int(p[1]) * per + int(p[3])}.0.{_resnet('.'.join(p[4:]))}"
        elif p[0] == "down_blocks" and p[2] == "attentions":
            name = f"input_blocks.{1 + int(p[1]) * per + int(p[3])}.1.{'.'.join(p[4:])}"
        elif p[0] == "down_blocks" and p[2] == "downsamplers":
            name = f"input_blocks.{(int(p[1]) + 1) * per}.0.op.{p[-1]}"
        elif p[0] == "mid_block" and p[1] == "resnets":
            name = f"middle_block.{2 * int(p[2])}.{_resnet('.'.join(p[3:]))}"
        elif p[0] == "mid_block" and p[1] == "attentions":
            name = f"middle_block.1.{'.'.join(p[3:])}"
        elif p[0] == "up_blocks" and p[2] == "resnets":
            name = f"output_blocks.{int(p[1]) * per + int(p[3])}.0.{_resnet('.'.join(p[4:]))}"
        elif p[0] == "up_blocks" and p[2] == "attentions":
            name = f"output_blocks.{int(p[1]) * per + int(p[3])}.1.{'.'.join(p[4:])}"
        elif p[0] == "up_blocks" and p[2] == "upsamplers":
            slot = 2 if up_attention[int(p[1])] else 1
            name = f"output_blocks.{int(p[1]) * per + layers}.{slot}.conv.{p[-1]}"
        else:
            raise KeyError(key)
        out[name] = value
    return out


def vae_to_ldm(vae: AutoencoderKL) -> Tensors:
    """A diffusers autoencoder's state dict in LDM names (``encoder.down.N.block.M.…``, 1×1 conv attention)."""
    direct = DIFFUSERS_TO_LDM_MAPPING["vae"]
    levels = len(vae.config.block_out_channels)
    out: Tensors = {}
    for key, value in vae.state_dict().items():
        p = key.split(".")
        if key in direct:
            out[direct[key]] = value
            continue
        coder = p[0]
        if p[1] == "down_blocks" and p[3] == "resnets":
            name = f"{coder}.down.{p[2]}.block.{p[4]}.{_resnet('.'.join(p[5:]), (('conv_shortcut', 'nin_shortcut'),))}"
        elif p[1] == "down_blocks" and p[3] == "downsamplers":
            name = f"{coder}.down.{p[2]}.downsample.conv.{p[-1]}"
        elif p[1] == "up_blocks" and p[3] == "resnets":
            block = levels - 1 - int(p[2])
            name = f"{coder}.up.{block}.block.{p[4]}.{_resnet('.'.join(p[5:]), (('conv_shortcut', 'nin_shortcut'),))}"
        elif p[1] == "up_blocks" and p[3] == "upsamplers":
            name = f"{coder}.up.{levels - 1 - int(p[2])}.upsample.conv.{p[-1]}"
        elif p[1] == "mid_block" and p[2] == "resnets":
            name = f"{coder}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}"
        elif p[1] == "mid_block" and p[2] == "attentions":
            name = f"{coder}.mid.attn_1.{_resnet('.'.join(p[4:]), _VAE_ATTN)}"
            if value.dim() == 2:
                value = value[:, :, None, None]
        else:
            raise KeyError(key)
        out[name] = value
    return out


def clip_to_ldm(text_encoder: torch.nn.Module) -> Tensors:
    """A transformers CLIP text model's state dict as LDM checkpoints store it (``text_model.…`` names)."""
    out: Tensors = {}
    for key, value in text_encoder.state_dict().items():
        wrapped = key.startswith(("text_model.", "text_projection"))
        out[key if wrapped else f"text_model.{key}"] = value
    return out


def clip_to_open_clip(text_encoder: torch.nn.Module, extra_layer: bool = False, seed: int = 0) -> Tensors:
    """A CLIP text model in OpenCLIP names (``transformer.resblocks.N.attn.in_proj_weight``, transposed projection);
    ``extra_layer`` appends the final block SD 2.x checkpoints carry but the pipeline does not use."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out: Tensors = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T.contiguous()
    count = text_encoder.config.num_hidden_layers
    for i in range(count):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            out[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    if extra_layer:
        gen = torch.Generator().manual_seed(seed)
        last = f"transformer.resblocks.{count}."
        for name, value in list(out.items()):
            if name.startswith("transformer.resblocks.0."):
                out[last + name[len("transformer.resblocks.0.") :]] = torch.randn(value.shape, generator=gen)
    return out


def _swap(weight: torch.Tensor) -> torch.Tensor:
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def flux_to_bfl(transformer: FluxTransformer2DModel) -> Tensors:
    """A diffusers FLUX transformer's state dict in BFL names (``double_blocks.N.img_attn.qkv.…``)."""
    s = transformer.state_dict()
    out: Tensors = {}
    simple = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in",
        "x_embedder": "img_in",
        "proj_out": "final_layer.linear",
    }
    for new, old in simple.items():
        for kind in ("weight", "bias"):
            if f"{new}.{kind}" in s:
                out[f"{old}.{kind}"] = s[f"{new}.{kind}"]
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap(s[f"norm_out.linear.{kind}"])
    for i in range(transformer.config.num_layers):
        a, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        pairs = {
            "norm1.linear": "img_mod.lin",
            "norm1_context.linear": "txt_mod.lin",
            "ff.net.0.proj": "img_mlp.0",
            "ff.net.2": "img_mlp.2",
            "ff_context.net.0.proj": "txt_mlp.0",
            "ff_context.net.2": "txt_mlp.2",
            "attn.to_out.0": "img_attn.proj",
            "attn.to_add_out": "txt_attn.proj",
        }
        for kind in ("weight", "bias"):
            for new, old in pairs.items():
                out[f"{b}{old}.{kind}"] = s[f"{a}{new}.{kind}"]
            out[f"{b}img_attn.qkv.{kind}"] = torch.cat([s[f"{a}attn.to_{n}.{kind}"] for n in "qkv"])
            out[f"{b}txt_attn.qkv.{kind}"] = torch.cat([s[f"{a}attn.add_{n}_proj.{kind}"] for n in "qkv"])
        for new, old in {
            "attn.norm_q": "img_attn.norm.query_norm",
            "attn.norm_k": "img_attn.norm.key_norm",
            "attn.norm_added_q": "txt_attn.norm.query_norm",
            "attn.norm_added_k": "txt_attn.norm.key_norm",
        }.items():
            out[f"{b}{old}.scale"] = s[f"{a}{new}.weight"]
    for i in range(transformer.config.num_single_layers):
        a, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}modulation.lin.{kind}"] = s[f"{a}norm.linear.{kind}"]
            parts = [s[f"{a}attn.to_{n}.{kind}"] for n in "qkv"] + [s[f"{a}proj_mlp.{kind}"]]
            out[f"{b}linear1.{kind}"] = torch.cat(parts)
            out[f"{b}linear2.{kind}"] = s[f"{a}proj_out.{kind}"]
        out[f"{b}norm.query_norm.scale"] = s[f"{a}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = s[f"{a}attn.norm_k.weight"]
    return out


def prefixed(tensors: Tensors, prefix: str) -> Tensors:
    """``tensors`` with ``prefix`` before every name."""
    return {prefix + k: v for k, v in tensors.items()}


def save(tensors: Tensors, path: Path, dtype: torch.dtype | None = None, metadata: dict | None = None) -> Path:
    """Write ``tensors`` (floating ones cast to ``dtype``) as one safetensors file."""
    data = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).clone() for k, v in tensors.items()}
    save_file(data, str(path), metadata=metadata or {})
    return path


# --- tiny seeded models, sized so the architecture's unwritten rules (heads) give back the same model -----------


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
        for param in module.parameters():  # norms start at 1/0: randomise them too, so no weight is a default
            param.data.add_(torch.randn(param.shape) * 0.02)
    return module.eval()


def clip_text(hidden: int = 64, *, act: str = "quick_gelu", projection: int | None = None, seed: int = 1):
    """A tiny CLIP text encoder (64-wide heads, like every real CLIP/OpenCLIP tower)."""
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=hidden // 64,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=projection or hidden,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _seeded(seed, lambda: cls(config))


def tiny_unet(family: str, seed: int = 2) -> UNet2DConditionModel:
    """A tiny UNet of ``family`` (sd1: 8 heads; sd2/sdxl: 64-wide heads, linear projections)."""
    config: dict = {
        "sample_size": 8,
        "block_out_channels": [64, 128],
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 64,
        "attention_head_dim": 8,
    }
    if family in ("sd2", "sdxl"):
        config |= {"attention_head_dim": [1, 2], "use_linear_projection": True}
    if family == "sdxl":
        config |= {
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2],
            "cross_attention_dim": 128,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 64,
        }
    return _seeded(seed, lambda: UNet2DConditionModel(**config))


def tiny_vae(latent_channels: int = 4, *, flux: bool = False, seed: int = 3) -> AutoencoderKL:
    """A tiny two-level autoencoder (FLUX's has no quant convs)."""
    config: dict = {
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": 32,
    }
    if flux:
        config |= {"use_quant_conv": False, "use_post_quant_conv": False}
    return _seeded(seed, lambda: AutoencoderKL(**config))


def tiny_flux(seed: int = 4, guidance: bool = True) -> FluxTransformer2DModel:
    """A tiny FLUX transformer: 32-wide heads (rotary axes 4, 14, 14 as FLUX.1 splits 128 into 16, 56, 56)."""
    config = {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 1,
        "num_single_layers": 2,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 64,
        "guidance_embeds": guidance,
        "axes_dims_rope": [4, 14, 14],
    }
    return _seeded(seed, lambda: FluxTransformer2DModel(**config))


def tiny_t5(vocab: int, seed: int = 5) -> T5EncoderModel:
    """A tiny T5 encoder."""
    config = T5Config(
        vocab_size=vocab,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
    )
    return _seeded(seed, lambda: T5EncoderModel(config))
