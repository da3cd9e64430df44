"""Frequency analysis of images and latents (docs/methods.md#frequency-analysis): radial log-magnitude profiles and
high-frequency scores.

For each image: grayscale → 2-D FFT → fftshift → log|F| → average over rings of equal integer radius around the
centre (the radially averaged profile, radius 0 … r_max) → divide by the profile's maximum. The high-frequency score
is the mean of that profile over radii ≥ ⌊cutoff · r_max⌋ (cutoff 0.2: radii 72 … 362 of a 512² image). An adapter's
ΔH = score(generated with it) − score(generated without it), on the same prompts and seeds: adapters that add fine
detail (style, character, clothing, object) raise it, background adapters lower it. CMLoRA orders adapters by ΔH and
uses the score of the latent itself to decide when denoising has left its high-frequency stage.

Every function takes a batch and returns one value (or one profile) per image, computed in float32.
"""

from __future__ import annotations

import torch

CUTOFF = 0.2
"""High-frequency band: radii ≥ ⌊CUTOFF · r_max⌋."""

MIN_SIDE = 8
"""Smallest side (in pixels or latent cells) whose spectrum has enough rings for a meaningful score."""

_LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights (what PIL's ``convert("L")`` uses)."""

_LOG_FLOOR = 1e-8
"""|F| is clamped here before the log, so exact zeros give a finite (very negative) value instead of −inf."""


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, H, W) → (B, H, W) float32: BT.601 luma for RGB, the channel mean for anything else
    (latents), the single channel as is."""
    if images.dim() == 3:
        return images.float()
    if images.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) or (B, H, W) images, got shape {tuple(images.shape)}")
    images = images.float()
    if images.shape[1] == 3:
        weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device)
        return torch.einsum("bchw,c->bhw", images, weights)
    return images.mean(dim=1)


def log_magnitude_spectrum(gray: torch.Tensor) -> torch.Tensor:
    """(B, H, W) → (B, H, W): log|F| of the centred 2-D spectrum (zero frequency at (H//2, W//2))."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(gray.float()), dim=(-2, -1))
    return torch.log(spectrum.abs().clamp_min(_LOG_FLOOR))


def radius_map(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """(H, W) long tensor: each cell's distance from the spectrum centre (H//2, W//2), rounded to an integer."""
    ys = torch.arange(height, device=device, dtype=torch.float32) - height // 2
    xs = torch.arange(width, device=device, dtype=torch.float32) - width // 2
    return torch.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2).round().long()


def ring_means(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(radii, means)``: the integer radii that occur (R,) (0 … r_max) and each image's mean log|F| over every
    ring (B, R), before normalisation."""
    spectrum = log_magnitude_spectrum(to_grayscale(images))
    batch, height, width = spectrum.shape
    radii = radius_map(height, width, spectrum.device).reshape(-1)
    counts = torch.bincount(radii)
    sums = torch.zeros(batch, counts.numel(), dtype=spectrum.dtype, device=spectrum.device)
    sums.index_add_(1, radii, spectrum.reshape(batch, -1))
    present = counts > 0
    means = sums[:, present] / counts[present].to(spectrum.dtype)
    return torch.arange(counts.numel(), device=spectrum.device)[present], means


def radial_profile(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised radially averaged log-magnitude profile of each image.

    Returns ``(radii, profile)``: ``radii`` (R,) the integer radii that occur (0 … r_max), ``profile`` (B, R) the mean
    log|F| over each ring divided by that image's largest ring mean.
    """
    radii, means = ring_means(images)
    return radii, means / means.max(dim=1, keepdim=True).values


def high_frequency_cut(radii: torch.Tensor, cutoff: float = CUTOFF) -> int:
    """The first radius of the high-frequency band: ⌊cutoff · r_max⌋."""
    return int(cutoff * int(radii.max()))


def high_frequency_score(images: torch.Tensor, cutoff: float = CUTOFF) -> torch.Tensor:
    """(B,) mean of each image's normalised radial profile over radii ≥ ⌊cutoff · r_max⌋."""
    radii, profile = radial_profile(images)
    band = radii >= high_frequency_cut(radii, cutoff)
    return profile[:, band].mean(dim=1)


def delta_h(with_adapter: torch.Tensor, without_adapter: torch.Tensor, cutoff: float = CUTOFF) -> torch.Tensor:
    """(B,) ΔH per image pair: score(with the adapter) − score(without), pairs matched by batch position."""
    if with_adapter.shape[0] != without_adapter.shape[0]:
        raise ValueError(
            f"ΔH needs matched pairs: {with_adapter.shape[0]} images with the adapter, "
            f"{without_adapter.shape[0]} without"
        )
    return high_frequency_score(with_adapter, cutoff) - high_frequency_score(without_adapter, cutoff)


def latent_high_frequency_score(latent: torch.Tensor, cutoff: float = CUTOFF) -> torch.Tensor | None:
    """(B,) high-frequency score of a (B, C, H, W) latent (channels averaged), or None when it cannot be trusted.

    The guard: a latent smaller than :data:`MIN_SIDE` on either side has too few rings above the cut (the reference
    code divides by an empty band there and gets NaN), and a spectrum whose largest ring mean is not positive cannot
    be normalised; both return None so the caller falls back to another rule.
    """
    if latent.dim() != 4 or min(latent.shape[-2:]) < MIN_SIDE:
        return None
    radii, means = ring_means(latent)
    peak = means.max(dim=1, keepdim=True).values
    if not bool(torch.isfinite(means).all()) or not bool((peak > 0).all()):
        return None
    band = radii >= high_frequency_cut(radii, cutoff)
    return (means / peak)[:, band].mean(dim=1)
