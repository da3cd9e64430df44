"""Fixtures the benchmarks share: seeded random LoRAs on a denoiser's attention projections, in our form and PEFT's."""

from __future__ import annotations

import torch
from torch import nn

from fusion.adapters import LowRank

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora(denoiser: nn.Module, seed: int, rank: int, scale: float = 0.01) -> dict[str, LowRank]:
    """A rank-``rank`` LoRA with seeded random factors on every attention projection (``Adapter.layers`` form)."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(ATTENTION_PROJECTIONS):
            down = torch.randn(rank, module.in_features, generator=generator) * scale
            up = torch.randn(module.out_features, rank, generator=generator) * scale
            layers[name] = LowRank(down=down, up=up)
    return layers


def peft_state_dict(layers: dict[str, LowRank], prefix: str = "unet.") -> dict[str, torch.Tensor]:
    """The same factors as a diffusers/PEFT LoRA state dict (what ``load_lora_weights`` takes)."""
    state = {f"{prefix}{key}.lora_A.weight": update.down.clone() for key, update in layers.items()}
    state |= {f"{prefix}{key}.lora_B.weight": update.up.clone() for key, update in layers.items()}
    return state
