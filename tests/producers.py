"""Adapter files written by their real producers (LyCORIS, PEFT, diffusers) and the producer's own outputs.

The reference for every format test here is what the producer's forward pass computes, never our writers:

- :func:`lycoris_network` builds a LyCORIS network on a tiny pipeline (kohya names via ``lycoris.kohya``, or
  LyCORIS's standalone ``lycoris_…`` names via ``lycoris.create_lycoris``), perturbs every parameter so no module
  is a no-op, and applies it (LyCORIS replaces the wrapped modules' ``forward``);
- :func:`producer_deltas` reads each wrapped module's output difference (LyCORIS forward minus base forward) on
  random inputs, the ground truth a reader's per-layer ΔW must reproduce;
- :func:`pipeline_latents` runs the pipeline, whatever is applied to it, to a latent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

UNET_BLOCKS = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
UNET_NAMES = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
FLUX_BLOCKS = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
TEXT_BLOCKS = ["CLIPAttention", "CLIPMLP"]

PRESETS: dict[str, dict[str, Any]] = {
    "full": {"enable_conv": True, "unet_target_module": UNET_BLOCKS, "unet_target_name": UNET_NAMES},
    "attn": {"enable_conv": False, "unet_target_module": ["Attention"], "unet_target_name": []},
    "flux": {"enable_conv": False, "unet_target_module": FLUX_BLOCKS, "unet_target_name": []},
    "ia3": {
        "enable_conv": False,
        "unet_target_module": [],
        "text_encoder_target_module": [],
        "unet_target_name": ["*to_k", "*to_v", "*ff.net.2"],
        "text_encoder_target_name": ["*k_proj", "*v_proj", "*mlp.fc2"],
        "use_fnmatch": True,
        "name_algo_map": {"*ff.net.2": {"train_on_input": True}, "*mlp.fc2": {"train_on_input": True}},
    },
    "qv": {
        "enable_conv": False,
        "unet_target_module": [],
        "text_encoder_target_module": [],
        "unet_target_name": ["*attn1.to_q", "*attn1.to_v"],
        "text_encoder_target_name": ["*q_proj", "*v_proj"],
        "use_fnmatch": True,
    },
    "norm": {"enable_conv": False, "unet_target_module": ["Transformer2DModel"], "unet_target_name": []},
}
"""Target presets for diffusers models (LyCORIS's own presets name LDM/BFL classes, and its "full" preset collides
with diffusers' TimestepEmbedding)."""


def _quiet() -> None:
    import lycoris.logging

    lycoris.logging.logger.setLevel(logging.ERROR)


def _preset_file(name: str, folder: Path, text: bool) -> Path:
    import toml

    preset = {"text_encoder_target_module": TEXT_BLOCKS if text else [], "text_encoder_target_name": []}
    preset.update(PRESETS[name])
    if not text:
        preset["text_encoder_target_name"] = []
    path = folder / f"preset-{name}-{int(text)}.toml"
    path.write_text(toml.dumps(preset))
    return path


def _denoiser(pipe: Any) -> nn.Module:
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def lycoris_network(
    pipe: Any,
    algo: str,
    folder: Path,
    *,
    preset: str = "full",
    text: bool = True,
    dim: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
    **options: Any,
) -> nn.Module:
    """A LyCORIS kohya network with random non-zero parameters, applied to ``pipe``'s denoiser and CLIP encoder(s)."""
    from lycoris import kohya

    _quiet()
    kohya.LycorisNetworkKohya.MODULE_ALGO_MAP = {}
    kohya.LycorisNetworkKohya.NAME_ALGO_MAP = {}
    kohya.LycorisNetworkKohya.USE_FNMATCH = False
    kohya.LycorisNetworkKohya.TARGET_EXCLUDE_NAME = []
    encoders = [pipe.text_encoder]
    if type(getattr(pipe, "text_encoder_2", None)).__name__.startswith("CLIP"):
        encoders.append(pipe.text_encoder_2)
    text_encoder = encoders if len(encoders) > 1 else encoders[0]
    network = kohya.create_network(
        1.0,
        dim,
        alpha,
        None,
        text_encoder,
        _denoiser(pipe),
        algo=algo,
        preset=str(_preset_file(preset, folder, text)),
        **options,
    )
    network.apply_to(text_encoder, _denoiser(pipe), True, True)
    _perturb(network, seed)
    return network


def standalone_network(pipe: Any, algo: str, *, seed: int = 0, **options: Any) -> nn.Module:
    """LyCORIS's standalone wrapper (``create_lycoris``) on the denoiser's attention: ``lycoris_…`` names."""
    from lycoris import LycorisNetwork, create_lycoris

    _quiet()
    LycorisNetwork.apply_preset({"target_module": ["Attention"], "target_name": []})
    network = create_lycoris(_denoiser(pipe), 1.0, linear_dim=4, linear_alpha=2.0, algo=algo, **options)
    network.apply_to()
    _perturb(network, seed)
    return network


def _perturb(network: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.05
            if name.endswith("scalar"):
                param.fill_(1.0)
            param.add_(noise)


def save(network: nn.Module, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """The network's file as LyCORIS writes it."""
    network.save_weights(str(path), dtype, {})
    return path


def modules_of(network: nn.Module) -> list[nn.Module]:
    """The LyCORIS modules of a network (kohya or standalone)."""
    return list(getattr(network, "loras", None) or [])


def remove(network: nn.Module) -> None:
    """Undo ``apply_to``: every wrapped module gets its own forward (and, for full/diff, its weights) back."""
    for module in modules_of(network):
        module.restore()


def module_input(module: nn.Module, gen: torch.Generator) -> torch.Tensor:
    """A random input batch for a Linear / LayerNorm (…, C) or a Conv2d / GroupNorm (N, C, 6, 6)."""
    if isinstance(module, nn.Conv2d):
        return torch.randn(2, module.in_channels, 6, 6, generator=gen)
    if isinstance(module, nn.GroupNorm):
        return torch.randn(2, module.num_channels, 6, 6, generator=gen)
    if isinstance(module, nn.LayerNorm):
        return torch.randn(3, *module.normalized_shape, generator=gen)
    return torch.randn(3, module.in_features, generator=gen)


def apply_weight(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The module's operation with ``weight`` and no bias (for a norm: the normalised input times ``weight``)."""
    weight = weight.to(x.dtype)
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, weight, None)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, weight, None, module.eps)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, weight, None, module.eps)
    return F.linear(x, weight)


@torch.no_grad()
def producer_outputs(network: nn.Module, seed: int = 0) -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """LyCORIS module name → (wrapped module, input x, LyCORIS forward(x) − base(x)).

    Computed in float64 where LyCORIS allows it (each module and its base layer are cast there and back, which is
    exact for fp32), so the reference carries no fp32 cancellation error; OFT/BOFT force fp32 inside and stay fp32.
    """
    gen = torch.Generator().manual_seed(seed)
    found = {}
    for lyco in modules_of(network):
        org = lyco.org_module[0]
        x = module_input(org, gen)
        try:
            found[lyco.lora_name] = (org, x, _difference(lyco, org, x, torch.float64))
        except RuntimeError:
            found[lyco.lora_name] = (org, x, _difference(lyco, org, x, torch.float32))
    return found


def _difference(lyco: nn.Module, org: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    lyco.to(dtype)
    org.to(dtype)
    try:
        x = x.to(dtype)
        base = apply_weight(org, x, lyco.org_weight.to(dtype))
        return (lyco.forward(x) - base - _bias(org, lyco, x)).double()
    finally:
        lyco.float()
        org.float()


def _bias(module: nn.Module, lyco: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base layer's bias term (LyCORIS full/diff moves it into its own parameters)."""
    bias = getattr(lyco, "org_bias", None)
    bias = bias[0] if isinstance(bias, list) else getattr(module, "bias", None)
    if bias is None:
        return torch.zeros((), dtype=x.dtype)
    shape = (1, -1, 1, 1) if isinstance(module, (nn.Conv2d, nn.GroupNorm)) else (-1,)
    return bias.to(x.dtype).reshape(shape)


@torch.no_grad()
def pipeline_latents(pipe: Any, **extra: Any) -> torch.Tensor:
    """One denoising step at 32² from a fixed seed, as a latent (the denoiser and text encoders all run)."""
    kwargs: dict[str, Any] = {"num_inference_steps": 1, "height": 32, "width": 32, "output_type": "latent"}
    kwargs.update(extra)
    return pipe("a red fox", generator=torch.Generator().manual_seed(0), **kwargs).images


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64."""
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
