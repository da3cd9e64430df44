"""Pair synthesis: each degradation follows its model, is seeded, and make-pairs writes matching clean/degraded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from composer.cli import main
from composer.restoration.degrade import (
    DEGRADATIONS,
    DegradationError,
    DegradeOptions,
    degrade,
    gaussian_noise,
    haze,
    jpeg,
    line_kernel,
    load_rgb,
    low_light,
    make_pairs,
    rain_streaks,
    to_pil,
    to_tensor,
)
from composer.restoration.metrics import expected_noise_psnr, psnr


def _smooth(size: int = 64, seed: int = 0) -> torch.Tensor:
    """A smooth image in [0.25, 0.75] (noise is never clipped there)."""
    coarse = torch.rand((1, 3, 4, 4), generator=torch.Generator().manual_seed(seed))
    return 0.25 + 0.5 * torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[0]


@pytest.mark.parametrize("sigma", [15.0, 25.0, 50.0])
def test_gaussian_noise_hits_the_expected_psnr(sigma: float) -> None:
    clean = torch.full((3, 128, 128), 0.5)
    noisy = gaussian_noise(clean, sigma, generator=torch.Generator().manual_seed(0))
    measured = float(psnr(noisy, clean)[0])
    # clipping at σ=50 (|n| > 0.5 is 1.1% of draws) slightly raises the PSNR
    assert measured == pytest.approx(expected_noise_psnr(sigma), abs=0.15 if sigma < 50 else 0.3)
    again = gaussian_noise(clean, sigma, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)


def test_haze_follows_the_scattering_model() -> None:
    clean = _smooth()
    depth = torch.linspace(0, 1, 64)[None].expand(64, 64)
    hazy = haze(clean, beta=1.5, airlight=0.8, depth=depth)
    t = torch.exp(-1.5 * depth)
    assert torch.allclose(hazy, clean * t + 0.8 * (1 - t))
    assert torch.allclose(hazy[:, :, 0], clean[:, :, 0])  # depth 0: no haze
    synthetic = haze(clean, generator=torch.Generator().manual_seed(1))
    change = (synthetic - clean).abs()
    assert float(change[:, :8].mean()) > 2 * float(change[:, -8:].mean())  # far (top) is hazier than near (bottom)
    with pytest.raises(DegradationError, match="depth map shape"):
        haze(clean, depth=torch.zeros(4, 4))


def test_rain_adds_slanted_bright_streaks() -> None:
    clean = _smooth()
    rainy = rain_streaks(clean, density=0.01, angle=0.0, generator=torch.Generator().manual_seed(0))
    assert bool((rainy >= clean - 1e-6).all())  # screen blending only brightens
    changed = (rainy - clean).abs().sum(0) > 0.05
    assert 0.01 < float(changed.float().mean()) < 0.6
    kernel = line_kernel(7, 0.0)
    assert float(kernel.sum()) == pytest.approx(1.0)
    assert float(kernel[:, 3].sum()) == pytest.approx(1.0)  # angle 0: a vertical line through the centre column


def test_jpeg_and_low_light() -> None:
    clean = _smooth(seed=3) + 0.1 * torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    worse, better = jpeg(clean, quality=5), jpeg(clean, quality=90)
    assert float(psnr(worse, clean)[0]) < float(psnr(better, clean)[0])
    dark = low_light(clean, gamma=2.0, scale=0.3)
    assert torch.allclose(dark, 0.3 * clean.pow(2.0))
    assert float(dark.mean()) < 0.3 * float(clean.mean())
    with pytest.raises(DegradationError, match="unknown degradation"):
        degrade(clean, "blur")
    with pytest.raises(DegradationError, match="quality"):
        jpeg(clean, quality=0)


def test_tensor_image_round_trip() -> None:
    pixels = torch.randint(0, 256, (3, 5, 7), generator=torch.Generator().manual_seed(0)).float() / 255
    assert torch.equal(to_tensor(to_pil(pixels)), pixels)


def test_make_pairs_writes_matching_names_via_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        to_pil(_smooth(32, seed=i)).save(src / f"photo{i}.jpg", quality=95)
    out = tmp_path / "pairs"
    assert main(["make-pairs", str(src), "--degrade", "noise", "--sigma", "50", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 3
    clean = sorted(p.name for p in (out / "clean").iterdir())
    assert clean == sorted(p.name for p in (out / "degraded").iterdir()) == ["photo0.png", "photo1.png", "photo2.png"]
    with Image.open(src / "photo0.jpg") as original:
        assert torch.equal(load_rgb(out / "clean" / "photo0.png"), to_tensor(original))
    first = load_rgb(out / "degraded" / "photo0.png")
    assert float(psnr(first, load_rgb(out / "clean" / "photo0.png"))[0]) < 16.0
    for kind in DEGRADATIONS:
        pairs = make_pairs(src, tmp_path / kind, kind, DegradeOptions(), seed=5)
        again = make_pairs(src, tmp_path / f"{kind}-again", kind, DegradeOptions(), seed=5)
        assert torch.equal(load_rgb(pairs[1][1]), load_rgb(again[1][1])), kind
        assert not torch.equal(load_rgb(pairs[1][1]), load_rgb(pairs[1][0])), kind
