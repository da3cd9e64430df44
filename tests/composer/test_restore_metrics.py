"""Restoration metrics against known values, the CLIP-IQA machinery, and `compose eval-restore`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from composer.cli import main
from composer.restoration.degrade import gaussian_noise, to_pil
from composer.restoration.metrics import (
    TINY_IQA_MODEL,
    ClipIQA,
    MetricError,
    evaluate_folders,
    expected_noise_psnr,
    psnr,
    ssim,
)
from composer.training.data import DatasetError
from fusion.warning_categories import MeaninglessScoreWarning


def _image(seed: int, size: int = 48) -> torch.Tensor:
    coarse = torch.rand((1, 3, 6, 6), generator=torch.Generator().manual_seed(seed))
    return 0.2 + 0.6 * torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[0]


def test_identical_images_give_inf_psnr_and_unit_ssim() -> None:
    image = _image(0)
    assert math.isinf(float(psnr(image, image)[0]))
    assert float(ssim(image, image)[0]) == pytest.approx(1.0, abs=1e-6)


def test_known_errors_give_the_expected_psnr() -> None:
    reference = _image(1)
    shifted = reference + 0.1  # MSE 0.01 → exactly 20 dB
    assert float(psnr(shifted, reference)[0]) == pytest.approx(20.0, abs=1e-4)
    noisy = gaussian_noise(reference, 25.0, generator=torch.Generator().manual_seed(0))
    assert float(psnr(noisy, reference)[0]) == pytest.approx(expected_noise_psnr(25.0), abs=0.25)
    assert expected_noise_psnr(25.0) == pytest.approx(20.172, abs=1e-3)


def test_ssim_falls_with_noise_and_batches_per_image() -> None:
    reference = torch.stack([_image(2), _image(3)])
    light = torch.stack([gaussian_noise(x, 5, generator=torch.Generator().manual_seed(0)) for x in reference])
    heavy = torch.stack([gaussian_noise(x, 50, generator=torch.Generator().manual_seed(0)) for x in reference])
    light_ssim, heavy_ssim = ssim(light, reference), ssim(heavy, reference)
    assert light_ssim.shape == (2,)
    assert bool((heavy_ssim < light_ssim).all())
    assert bool((light_ssim < 1).all())
    with pytest.raises(MetricError, match="differ in shape"):
        psnr(reference[0], reference[0, :, :8])


def test_clip_iqa_is_a_deterministic_probability() -> None:
    with pytest.warns(MeaninglessScoreWarning, match="random weights"):
        first = ClipIQA(TINY_IQA_MODEL)
    images = [to_pil(_image(4)), Image.new("RGB", (30, 50), (250, 10, 10))]
    scores = first.score(images)
    assert scores.shape == (2,)
    assert bool(((scores > 0) & (scores < 1)).all())
    with pytest.warns(MeaninglessScoreWarning):
        again = ClipIQA(TINY_IQA_MODEL)
    assert torch.allclose(scores, again.score(images))
    assert not first.pretrained
    with pytest.raises(MetricError, match="unknown open_clip"):
        ClipIQA("no-such-architecture")


def test_eval_restore_cli_reports_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    restored, reference = tmp_path / "restored", tmp_path / "reference"
    restored.mkdir()
    reference.mkdir()
    for i in range(2):
        to_pil(_image(10 + i)).save(reference / f"img{i}.png")
    to_pil(_image(10)).save(restored / "img0.png")  # perfect restoration
    to_pil(_image(11) + 0.1).save(restored / "img1.png")
    argv = ["eval-restore", "--restored", str(restored), "--reference", str(reference), "--json"]
    assert main([*argv, "--clip-model", TINY_IQA_MODEL]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 2
    rows = {row["name"]: row for row in report["images"]}
    assert rows["img0.png"]["psnr"] == "inf"
    assert rows["img0.png"]["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert rows["img1.png"]["psnr"] == pytest.approx(20.0, abs=0.1)
    assert report["mean"]["psnr"] == "inf"
    assert 0 < report["mean"]["clip_iqa"] < 1
    assert report["clip_iqa_pretrained"] is False
    assert main(["eval-restore", "--restored", str(restored), "--reference", str(reference), "--no-iqa"]) == 0
    assert "mean over 2" in capsys.readouterr().out
    (restored / "extra.png").write_bytes((restored / "img0.png").read_bytes())
    with pytest.raises(DatasetError, match="no reference image"):
        evaluate_folders(restored, reference)
