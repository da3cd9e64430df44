"""Frequency analysis: radial log-magnitude profiles and high-frequency scores against an independent NumPy version,
the radius cut of docs/methods.md#frequency-analysis, ΔH signs on images with and without fine detail, and the
latent guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusion.frequency import (
    delta_h,
    high_frequency_cut,
    high_frequency_score,
    latent_high_frequency_score,
    radial_profile,
    radius_map,
    to_grayscale,
)


def _numpy_score(image: np.ndarray, cutoff: float = 0.2) -> tuple[np.ndarray, float]:
    """The recipe of docs/methods.md#frequency-analysis written out with NumPy for one RGB image (3, H, W)."""
    gray = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    spectrum = np.log(np.maximum(np.abs(np.fft.fftshift(np.fft.fft2(gray))), 1e-8))
    h, w = gray.shape
    yy, xx = np.indices((h, w))
    r = np.rint(np.hypot(yy - h // 2, xx - w // 2)).astype(int)
    profile = np.bincount(r.ravel(), spectrum.ravel()) / np.bincount(r.ravel())
    profile = profile / profile.max()
    cut = int(cutoff * r.max())
    return profile, float(profile[cut:].mean())


def test_profile_and_score_match_a_numpy_reference() -> None:
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    radii, profile = radial_profile(images)
    scores = high_frequency_score(images)
    for b in range(3):
        expected_profile, expected_score = _numpy_score(images[b].double().numpy())
        assert profile.shape[1] == len(expected_profile)
        np.testing.assert_allclose(profile[b].numpy(), expected_profile, rtol=1e-4, atol=1e-5)
        assert abs(float(scores[b]) - expected_score) < 1e-4
    assert torch.equal(radii, torch.arange(len(expected_profile)))


def test_batched_scores_equal_one_at_a_time() -> None:
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    together = high_frequency_score(images)
    alone = torch.cat([high_frequency_score(images[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone)


def test_radius_cut_at_512_is_72_of_362() -> None:
    radii = radius_map(512, 512).reshape(-1).unique()
    assert int(radii.max()) == 362
    assert high_frequency_cut(radii) == 72


def test_profile_peaks_at_the_frequency_of_concentric_rings() -> None:
    y, x = torch.meshgrid(torch.arange(64.0) - 32, torch.arange(64.0) - 32, indexing="ij")
    rings = 0.5 + 0.4 * torch.cos(2 * torch.pi * 12 * torch.sqrt(x**2 + y**2) / 64)  # 12 cycles per image
    noise = 0.01 * torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    radii, profile = radial_profile(rings[None, None] + noise)
    assert torch.equal(radii, torch.arange(46))
    assert int(profile[0].argmax()) == 0
    assert float(profile[0, 0]) == pytest.approx(1.0)
    assert int(profile[0, 1:].argmax()) + 1 == 12
    assert float(profile[0, 12]) > float(profile[0, 20:].max()) + 0.1


def test_fine_detail_raises_the_score_and_blur_lowers_it() -> None:
    g = torch.Generator().manual_seed(2)
    smooth = F.avg_pool2d(torch.rand(2, 3, 64, 64, generator=g), 7, 1, 3)
    detailed = smooth + 0.2 * torch.rand(2, 3, 64, 64, generator=g)
    assert bool((delta_h(detailed, smooth) > 0.05).all())
    assert bool((delta_h(smooth, detailed) < -0.05).all())
    assert torch.equal(delta_h(smooth, smooth), torch.zeros(2))


def test_grayscale_uses_bt601_for_rgb_and_the_mean_for_latents() -> None:
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    assert float(to_grayscale(red)[0, 0, 0]) == pytest.approx(0.299)
    latent = torch.arange(16, dtype=torch.float32).reshape(1, 4, 2, 2)
    torch.testing.assert_close(to_grayscale(latent), latent.mean(1))


def test_latent_score_guard_refuses_small_or_degenerate_latents() -> None:
    g = torch.Generator().manual_seed(3)
    assert latent_high_frequency_score(torch.randn(2, 4, 4, 4, generator=g)) is None
    assert latent_high_frequency_score(torch.randn(2, 4, 8, 7, generator=g)) is None
    assert latent_high_frequency_score(torch.zeros(1, 4, 16, 16)) is None  # log floor everywhere: no positive peak
    noise = latent_high_frequency_score(torch.randn(2, 4, 16, 16, generator=g))
    assert noise is not None
    assert noise.shape == (2,)
    assert bool(torch.isfinite(noise).all())
    smooth = latent_high_frequency_score(F.avg_pool2d(torch.randn(2, 4, 16, 16, generator=g), 5, 1, 2) + 3.0)
    assert smooth is not None
    assert bool((smooth < noise).all())
