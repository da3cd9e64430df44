"""The loss toy-sd and its concept adapters are trained with: v-prediction at uniformly drawn timesteps."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def v_prediction_loss(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    ids: torch.Tensor,
    latents: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the UNet's prediction and v = √ᾱ·ε − √(1−ᾱ)·x₀ (bf16 autocast on CUDA): the mean over the
    batch, or with ``sample_weights`` (B,) the weighted sum of each sample's mean.

    Noise and timesteps are drawn from ``generator`` (on CPU, so a seed reproduces a run on any device).
    """
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, alphas_cumprod.shape[0], (latents.shape[0],), generator=generator).to(device)
    alpha = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    target = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
    if sample_weights is None:
        return F.mse_loss(prediction.float(), target)
    per_sample = F.mse_loss(prediction.float(), target, reduction="none").mean((1, 2, 3))
    return (per_sample * sample_weights.to(device)).sum()
