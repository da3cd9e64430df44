"""Seeded random LoRAs for fusion tests (importable from test modules in this folder)."""

from __future__ import annotations

import torch
from torch import nn

from fusion.adapters import LowRank


def random_lora(unet: nn.Module, rank: int, seed: int, every: int, alpha: float | None = None) -> dict[str, LowRank]:
    """Random factors on every ``every``-th attention/feed-forward linear and resnet conv1 of the UNet."""
    g = torch.Generator().manual_seed(seed)
    layers: dict[str, LowRank] = {}
    targets = [
        (name, m)
        for name, m in unet.named_modules()
        if (isinstance(m, nn.Linear) and (".attn" in name or ".ff." in name))
        or (isinstance(m, nn.Conv2d) and name.endswith("conv1"))
    ]
    for i, (name, module) in enumerate(targets):
        if i % every:
            continue
        w = module.weight
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.3
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.3
        layers[name] = LowRank(down=down, up=up, alpha=alpha)
    return layers
